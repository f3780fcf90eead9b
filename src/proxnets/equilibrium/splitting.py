"""Peaceman-Rachford splitting for monotone equilibria ``0 in F(z) + N(z)`` (MON, Winston & Kolter 2020).

``F(z) = M z - c`` with ``M = I - W`` strongly monotone (``(M + M^T)/2 >= m I``) and ``N = d f`` the
subdifferential of the convex ``f`` whose proximal operator is the activation (ReLU: the indicator of
``z >= 0``, ``prox = relu`` for every step). With the resolvents ``R_F = (I + alpha M)^{-1}(. + alpha c)``
and ``R_N = prox_{alpha f}``, and the reflections ``C = 2 R - I``, the iteration

    u_{k+1} = C_F(C_N(u_k)),        z_k = R_N(u_k)

is a contraction for every ``alpha > 0`` (``C_F`` is one, since ``F`` is strongly monotone and Lipschitz;
``C_N`` is non-expansive), and its fixed point ``u*`` gives the equilibrium ``z* = R_N(u*)``. Unlike
forward-backward splitting (safe only for ``alpha < 2 m / L^2``) no step restriction exists; the price
is a linear solve with ``I + alpha M`` per iteration:

- :class:`DenseResolvent`: an LU factor of the dense ``I + alpha M``, computed once and reused until the
  matrix or ``alpha`` changes (the caller passes a ``key`` that changes with the weights);
- :class:`CircularResolvent`: ``M`` commutes with circular shifts (circular-padding convolutions), so the
  2-D FFT block-diagonalizes it into ``H W`` matrices ``C x C`` (``H (W // 2 + 1)`` of them
  with the real FFT); they are read off the impulse responses of
  ``M`` (no kernel-layout convention involved) and inverted once per weight change.
- :class:`IterativeResolvent`: any ``M`` given as a map and its adjoint (zero-padding convolutions, which no
  FFT diagonalizes and whose dense factor costs ``O(n^3)`` per weight change): conjugate gradient on the
  normal equations ``K^T K x = K^T y``, ``K = I + alpha M``, warm-started at an approximate resolvent
  (MON: the circular-padding one of the same kernels, exact away from the border). Its error is bounded:
  ``<v, K v> >= (1 + alpha m) |v|^2`` gives ``sigma_min(K) >= 1 + alpha m``, so CG's stop at
  ``|K^T (y - K x)| <= tol_in max(|x|, |x + r|)`` means ``|x - x*| <= tol_in max(|x|, |x + r|) / (1 + alpha m)^2``.
  With ``method="gmres"`` (:func:`gmres`, one ``K`` per iteration instead of ``K^T K``) the stop is
  ``|y - K x| <= tol_in |x| / (1 + alpha m)``, which gives the same bound ``tol_in |x| / (1 + alpha m)^2``.
  Every inner solve's flag is counted; :func:`peaceman_rachford` reports a run with an unconverged
  inner solve as not converged (:class:`SplittingInfo`).

The solve runs the shared :func:`proxnets.solvers.fixed_point` on ``u`` (its stopping rule, divergence
and finiteness checks and :class:`SolverInfo`); the residual is ``|u_{k+1} - u_k| / |u_{k+1}|``, which
bounds the change of ``z = R_N(u)`` (``R_N`` is 1-Lipschitz).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Sequence

import torch

from proxnets.solvers import FLOOR, SolverInfo, fixed_point, solve_linear
from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["DenseResolvent", "CircularResolvent", "IterativeResolvent", "SplittingInfo", "peaceman_rachford", "gmres"]


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


class DenseResolvent:
    """``y -> (I + alpha M)^{-1} y`` for a dense ``n x n`` matrix ``M`` acting on flattened rows (B, ...).

    ``update(matrix_fn, alpha, key)`` refactors only when ``key`` or ``alpha`` changed (LU with partial
    pivoting: ``M`` is not symmetric, ``B - B^T`` is skew)."""

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.refreshes = 0

    def update(self, matrix_fn: Callable[[], torch.Tensor], alpha: float, key: Hashable) -> "DenseResolvent":
        check_number("alpha", alpha, low=0.0, low_inclusive=False)
        if self.factors is None or self.key != (key, alpha):
            m = matrix_fn()
            check_tensor("matrix", m, ndim=2)
            if m.shape[0] != m.shape[1]:
                fail("matrix", "a square matrix", tuple(m.shape))
            eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            self.factors = torch.linalg.lu_factor(eye + alpha * m)
            self.key = (key, alpha)
            self.refreshes += 1
        return self

    def __call__(self, y: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``(I + alpha M)^{-1} y``, or ``(I + alpha M^T)^{-1} y`` with ``transpose`` (the adjoint solve)."""
        lu, piv = self.factors
        flat = y.reshape(y.shape[0], -1).T.to(lu.dtype)  # (n, B)
        return torch.linalg.lu_solve(lu, piv, flat, adjoint=transpose).T.reshape(y.shape).to(y.dtype)


class CircularResolvent:
    """``y -> (I + alpha M)^{-1} y`` for a linear ``M`` on ``(B, C, H, W)`` that commutes with circular
    shifts: ``M = F^{-1} diag(M_hat(omega)) F`` with ``F`` the 2-D DFT, ``M_hat(omega)`` (C x C) column ``c``
    the DFT of ``M(delta_c)`` (the impulse response at the origin)."""

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.inverse: torch.Tensor | None = None  # (H, W // 2 + 1, C, C) complex
        self.size: tuple[int, int] = (0, 0)
        self.refreshes = 0

    def update(self, apply_m: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], alpha: float,
               key: Hashable, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> "CircularResolvent":
        check_number("alpha", alpha, low=0.0, low_inclusive=False)
        if self.inverse is None or self.key != (key, alpha):
            c, h, w = (int(s) for s in shape)
            delta = torch.zeros(c, c, h, w, dtype=dtype, device=device)
            delta[torch.arange(c), torch.arange(c), 0, 0] = 1.0
            with torch.no_grad():
                resp = apply_m(delta)  # (C_in, C_out, H, W): response to delta at channel c_in
            # real input: the half spectrum W // 2 + 1 suffices (the other half is its conjugate)
            m_hat = torch.fft.rfft2(resp).permute(2, 3, 1, 0)  # (H, W // 2 + 1, C_out, C_in)
            self.size = (h, w)
            eye = torch.eye(c, dtype=m_hat.dtype, device=m_hat.device)
            self.inverse = torch.linalg.inv(eye + alpha * m_hat)
            self.key = (key, alpha)
            self.refreshes += 1
        return self

    def __call__(self, y: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``(I + alpha M)^{-1} y``; with ``transpose`` ``(I + alpha M^T)^{-1} y`` (M real: M^T has the blocks
        ``M_hat(omega)^H``, so its inverse has the blocks of the inverse, conjugate-transposed)."""
        y_hat = torch.fft.rfft2(y).permute(2, 3, 1, 0)  # (H, W // 2 + 1, C, B)
        inv = self.inverse.mH if transpose else self.inverse
        x_hat = (inv @ y_hat).permute(3, 2, 0, 1).contiguous()  # (B, C, H, W // 2 + 1)
        return torch.fft.irfft2(x_hat, s=self.size).to(y.dtype)


def gmres(K: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, x0: torch.Tensor | None = None, *,
          tol: float = 1e-6, max_iter: int = 100, restart: int = 30, scale: float = 1.0) -> tuple[torch.Tensor, SolverInfo]:
    """Restarted GMRES on ``K x = y`` per sample (``K`` a map ``(B, ...) -> (B, ...)``, any nonsingular linear map).

    Arnoldi with modified Gram-Schmidt and Givens rotations (Saad & Schultz 1986), ``restart`` vectors per cycle;
    one ``K`` per iteration. Stopping rule, per sample: ``|y - K x| <= tol * max(|x|, FLOOR) / scale`` with the
    residual norm of the least-squares recurrence, and the *true* residual recomputed at the end of every cycle
    (only it decides ``converged``). With ``scale = 1 + alpha m <= sigma_min(K)`` (a strongly monotone ``M``) the
    rule gives ``|x - x*| <= |r| / sigma_min <= tol |x| / (1 + alpha m)^2``: the bound of the CG resolvent.
    ``|x|`` along a cycle is ``sqrt(|x0|^2 + 2 <x0, V c> + |c|^2)`` (the basis ``V`` is orthonormal).
    :class:`SolverInfo`: ``iterations`` = applications of ``K`` in the Arnoldi loops, ``residuals`` the largest
    relative residual ``|r| scale / max(|x|, FLOOR)`` per iteration, ``stop_reason`` ``"tol"`` / ``"max_iter"`` /
    ``"nonfinite"``, ``converged`` only when every sample's true residual meets the rule (one more ``K`` per cycle,
    not counted in ``iterations``).
    """
    check_tensor("y", y, ndim=tuple(range(1, 9)), nonempty=True)
    tol = check_number("tol", tol, low=0.0, low_inclusive=False)
    max_iter, restart = check_int("max_iter", max_iter, low=1), check_int("restart", restart, low=1)
    scale = check_number("scale", scale, low=0.0, low_inclusive=False)
    info = SolverInfo(solver="gmres", tol=tol)
    bsz, shape = y.shape[0], y.shape
    flat = lambda t: t.reshape(bsz, -1)  # noqa: E731
    x = torch.zeros_like(y) if x0 is None else check_tensor("x0", x0, shape=tuple(shape), like=y).clone()
    dt = torch.float64
    rel = None
    while True:
        r = y - K(x) if x0 is not None or info.iterations else y.clone()
        r_norm = _norms(r).to(dt)
        x_norm = _norms(x).to(dt)
        rel = r_norm * scale / x_norm.clamp_min(FLOOR)
        if not bool(torch.isfinite(rel).all()):
            info.stop_reason, info.diverged = "nonfinite", True
            break
        if bool((rel <= tol).all()):
            info.stop_reason, info.converged = "tol", True
            break
        if info.iterations >= max_iter:
            info.stop_reason = "max_iter"
            break
        k = min(restart, max_iter - info.iterations)
        V = [flat(r) / r_norm.clamp_min(1e-300).to(y.dtype)[:, None]]
        H = torch.zeros(bsz, k + 1, k, dtype=dt, device=y.device)
        cs = torch.zeros(bsz, k, dtype=dt, device=y.device)
        sn = torch.zeros_like(cs)
        g = torch.zeros(bsz, k + 1, dtype=dt, device=y.device)
        g[:, 0] = r_norm
        x0v = flat(x)
        x0_dots = [torch.linalg.vecdot(x0v, V[0]).to(dt)]
        xx0 = x_norm**2
        j_done = 0
        for j in range(k):
            w = flat(K(V[j].reshape(shape))).clone()
            info.iterations += 1
            for i in range(j + 1):  # modified Gram-Schmidt
                h = torch.linalg.vecdot(w, V[i])
                H[:, i, j] = h.to(dt)
                w.sub_(V[i] * h[:, None])
            hn = _norms(w).to(dt)
            H[:, j + 1, j] = hn
            ok = hn > 1e-300
            V.append(torch.where(ok[:, None], w / hn.clamp_min(1e-300).to(y.dtype)[:, None], torch.zeros_like(w)))
            x0_dots.append(torch.linalg.vecdot(x0v, V[-1]).to(dt))
            for i in range(j):  # the previous rotations on the new column
                a, b = H[:, i, j].clone(), H[:, i + 1, j].clone()
                H[:, i, j], H[:, i + 1, j] = cs[:, i] * a + sn[:, i] * b, -sn[:, i] * a + cs[:, i] * b
            a, b = H[:, j, j], H[:, j + 1, j]
            den = torch.sqrt(a * a + b * b).clamp_min(1e-300)
            cs[:, j], sn[:, j] = a / den, b / den
            H[:, j, j], H[:, j + 1, j] = den, 0.0
            g[:, j + 1] = -sn[:, j] * g[:, j]
            g[:, j] = cs[:, j] * g[:, j]
            j_done = j + 1
            # |x_j| from the least-squares coefficients c (V orthonormal): |x0|^2 + 2 <x0, V c> + |c|^2
            c = torch.linalg.solve_triangular(H[:, :j_done, :j_done], g[:, :j_done, None], upper=True).squeeze(2)
            xn = (xx0 + 2 * (torch.stack(x0_dots[:j_done], 1) * c).sum(1) + (c * c).sum(1)).clamp_min(0).sqrt()
            est = g[:, j + 1].abs() * scale / xn.clamp_min(FLOOR)
            m_est = float(est.max())
            info.residuals.append(m_est)
            info.abs_residuals.append(float(g[:, j + 1].abs().max()))
            if not math.isfinite(m_est) or m_est <= tol or info.iterations >= max_iter:
                break
        c = torch.linalg.solve_triangular(H[:, :j_done, :j_done], g[:, :j_done, None], upper=True).squeeze(2).to(y.dtype)
        upd = V[0] * c[:, :1]
        for i in range(1, j_done):
            upd.add_(V[i] * c[:, i : i + 1])
        x = x + upd.reshape(shape)
        x0 = x  # the true residual is recomputed at the top
    info.final_residual = rel.tolist() if rel is not None else []
    return x, info


class IterativeResolvent:
    """``y -> (I + alpha M)^{-1} y`` for ``M`` given as a map ``apply_m`` and its adjoint ``apply_mt`` on
    ``(B, ...)`` with ``(M + M^T)/2 >= m I``, ``m > 0`` (module docstring): CG on ``K^T K x = K^T y`` by the
    shared :func:`proxnets.solvers.solve_linear`, from ``x0 = start(y)`` (an approximate resolvent with the
    same ``transpose`` keyword, e.g. a :class:`CircularResolvent`) or 0; within a run (:meth:`reset`) from the
    previous solution corrected by ``start`` on the change of ``y``.

    ``tol`` and ``max_iter`` are the inner solve's; ``calls``, ``unconverged``, ``iterations`` (total CG
    iterations) and ``worst_residual`` accumulate over calls (read them before and after a run),
    ``last_info`` is the last call's :class:`SolverInfo`. ``error_bound_factor = 1 / (1 + alpha m)^2``: the
    relative error of a converged call is at most ``tol * error_bound_factor``."""

    def __init__(self, tol: float = 1e-5, max_iter: int = 100, method: str = "cg") -> None:
        if method not in ("cg", "gmres"):
            fail("method", "'cg' or 'gmres'", method)
        self.method = method
        self.tol = check_number("tol", tol, low=0.0, low_inclusive=False)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.apply_m = self.apply_mt = self.start = None
        self.alpha, self.m = 0.0, 0.0
        self.calls = self.unconverged = self.iterations = 0
        self.worst_residual = 0.0
        self.last_info: SolverInfo | None = None
        self.remember = False
        self._memory: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self, remember: bool) -> None:
        """Forget the last solve; with ``remember`` each call starts at ``x_prev + start(y - y_prev)`` from the
        previous call of the same shape and direction (:func:`peaceman_rachford` does this within one run:
        its successive right-hand sides differ less and less)."""
        self.remember, self._memory = remember, {}

    def update(self, apply_m: Callable[[torch.Tensor], torch.Tensor], apply_mt: Callable[[torch.Tensor], torch.Tensor],
               alpha: float, m: float, start: Callable[..., torch.Tensor] | None = None) -> "IterativeResolvent":
        self.alpha = check_number("alpha", alpha, low=0.0, low_inclusive=False)
        self.m = check_number("m", m, low=0.0, low_inclusive=False)
        self.apply_m, self.apply_mt, self.start = apply_m, apply_mt, start
        return self

    @property
    def error_bound_factor(self) -> float:
        return 1.0 / (1.0 + self.alpha * self.m) ** 2

    def state(self) -> tuple[int, int, int]:
        """``(calls, unconverged, iterations)`` so far (a run's own counts are the differences)."""
        return self.calls, self.unconverged, self.iterations

    def __call__(self, y: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``(I + alpha M)^{-1} y``; with ``transpose`` ``(I + alpha M^T)^{-1} y`` (``K^T`` in place of ``K``)."""
        if self.apply_m is None:
            fail("IterativeResolvent", "update(...) called before use", "no operator")
        fwd, adj = (self.apply_mt, self.apply_m) if transpose else (self.apply_m, self.apply_mt)
        alpha = self.alpha
        k = lambda v: v + alpha * fwd(v)  # noqa: E731
        kt = lambda v: v + alpha * adj(v)  # noqa: E731
        approx = (lambda v: torch.zeros_like(v)) if self.start is None else functools.partial(self.start, transpose=transpose)
        last = self._memory.get(transpose)
        if last is not None and last[0].shape == y.shape:  # x_prev + S (y - y_prev): exact where S is
            x0 = last[1] + approx(y - last[0])
        else:
            x0 = approx(y)
        if self.method == "gmres":  # one K per iteration; the same error bound (module docstring)
            x, info = gmres(k, y, x0, tol=self.tol, max_iter=self.max_iter, scale=1.0 + alpha * self.m)
        else:
            x, info = solve_linear(lambda v: kt(k(v)), kt(y), x0, tol=self.tol, max_iter=self.max_iter)
        if self.remember:
            self._memory[transpose] = (y, x)
        self.calls += 1
        self.iterations += info.iterations
        self.unconverged += not info.converged
        if info.residuals:
            self.worst_residual = max(self.worst_residual, info.residuals[-1])
        self.last_info = info
        return x


@dataclasses.dataclass
class SplittingInfo(SolverInfo):
    """A :func:`peaceman_rachford` run: every field of :class:`proxnets.solvers.SolverInfo`, plus the inner
    (resolvent) solves of the run when the resolvent is iterative: ``inner_calls``, ``inner_unconverged``,
    ``inner_iterations``. ``converged`` is true only if the outer rule stopped at ``tol`` *and* every inner
    solve met its own tolerance (``inner_unconverged == 0``); ``stop_reason`` is the outer rule's."""

    inner_calls: int = 0
    inner_unconverged: int = 0
    inner_iterations: int = 0


def peaceman_rachford(
    resolvent: Callable[[torch.Tensor], torch.Tensor],
    c: torch.Tensor,
    alpha: float,
    *,
    prox: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
    u0: torch.Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Solve ``0 in M z - c + d f(z)`` by ``u <- C_F(C_N(u))`` (module docstring).

    ``resolvent(y) = (I + alpha M)^{-1} y``; ``prox = prox_{alpha f}``. Returns ``(z*, u*, info)``, ``info`` a
    :class:`SplittingInfo` with ``info.solver == "peaceman_rachford"`` and ``info.converged`` only if
    ``|u_{k+1}-u_k|/|u_{k+1}| <= tol`` and (an :class:`IterativeResolvent`, or a ``resolvent`` whose
    ``__self__`` or partial's ``func`` is one) no inner solve of the run missed its tolerance.
    """
    check_tensor("c", c, ndim=tuple(range(1, 9)), nonempty=True)
    check_number("alpha", alpha, low=0.0, low_inclusive=False)
    shift = alpha * c

    def step(u: torch.Tensor) -> torch.Tensor:
        v = 2.0 * prox(u) - u  # C_N(u)
        return 2.0 * resolvent(v + shift) - v  # C_F(v), R_F(v) = (I + alpha M)^{-1}(v + alpha c)

    inner = _iterative(resolvent)
    before = inner.state() if inner is not None else (0, 0, 0)
    if inner is not None:
        inner.reset(remember=True)
    try:
        u, base = fixed_point(step, (torch.zeros_like(c) if u0 is None else u0), tol=tol, max_iter=max_iter)
    finally:
        if inner is not None:
            inner.reset(remember=False)
    info = SplittingInfo(**{f.name: getattr(base, f.name) for f in dataclasses.fields(SolverInfo)})
    info.solver = "peaceman_rachford"
    if inner is not None:
        info.inner_calls, info.inner_unconverged, info.inner_iterations = (
            now - was for now, was in zip(inner.state(), before))
        if info.inner_unconverged:  # the iterates rest on inexact resolvents: not a converged run
            info.converged = False
    return prox(u), u, info


def _iterative(resolvent) -> IterativeResolvent | None:
    """The :class:`IterativeResolvent` behind ``resolvent`` (itself, a bound method of it, or a wrapper
    or a ``functools.partial`` of it), else None."""
    for obj in (resolvent, getattr(resolvent, "__self__", None), getattr(resolvent, "func", None)):
        if isinstance(obj, IterativeResolvent):
            return obj
    return None
