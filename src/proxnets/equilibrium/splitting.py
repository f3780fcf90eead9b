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
  Every inner solve's flag is counted; :func:`peaceman_rachford` reports a run with an unconverged
  inner solve as not converged (:class:`SplittingInfo`).

The solve runs the shared :func:`proxnets.solvers.fixed_point` on ``u`` (its stopping rule, divergence
and finiteness checks and :class:`SolverInfo`); the residual is ``|u_{k+1} - u_k| / |u_{k+1}|``, which
bounds the change of ``z = R_N(u)`` (``R_N`` is 1-Lipschitz).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence

import torch

from proxnets.solvers import SolverInfo, fixed_point, solve_linear
from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["DenseResolvent", "CircularResolvent", "IterativeResolvent", "SplittingInfo", "peaceman_rachford"]


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

    def __init__(self, tol: float = 1e-5, max_iter: int = 100) -> None:
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
