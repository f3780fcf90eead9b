"""The project's one set of iterative solvers for ``z = T(z)`` (and SPD linear systems).

Every solver is called as

    z, info = solver(T, z0, *, tol, max_iter, callback=None, objective=None, divergence=1e4, **options)

with ``T`` a map on batched tensors ``(B, ...) -> (B, ...)`` (samples independent), ``objective`` an
optional ``z -> (B,)`` (e.g. the convex ``G`` whose minimizers are the fixed points, tracked in
``info.objectives``) and ``callback(k, z, info)`` called after the k-th evaluation of ``T`` with the
point the solver would return if it stopped there. It returns ``T`` applied to its last iterate (for a
nonexpansive ``T`` that point's residual is at most the last recorded one) and a :class:`SolverInfo`.

Residual (all solvers), for the point ``z_k`` at which ``T`` was evaluated, per sample ``i``:

    d_k,i = |T(z_k)_i - z_k,i|,     s_k,i = max(|T(z_k)_i|, |z_k,i|, FLOOR),     r_k = max_i d_k,i / s_k,i

and a run stops as converged when ``r_k <= tol``. The scale is never an overflowed norm: see the
stopping rules.

Stopping rules (checked in this order after each evaluation of ``T``; :attr:`SolverInfo.stop_reason`):

``"nonfinite"``  ``d``, ``|T(z_k)|`` or ``|z_k|`` is NaN or infinite for a sample (a NaN/inf entry or a
                 norm that overflowed): ``converged=False``, ``diverged=True``; the solver returns its
                 last finite iterate (the input of that evaluation), never the non-finite one.
``"tol"``        ``r_k <= tol``: ``converged=True``.
``"diverged"``   for some sample ``d_k > divergence * max(min_{j<=k} d_j, eps * s_k)`` (``divergence``
                 default 1e4, ``eps`` the dtype's machine epsilon, so round-off around a fixed point never
                 trips it): the residual grew 10^4-fold past the best the run had reached, which a
                 nonexpansive ``T`` with a fixed point cannot do for the plain iteration (its ``d_k`` is
                 non-increasing) and which accelerated methods do not do short of failing (a map that
                 grows geometrically, e.g. ``relu(1.5 z + 1)``, trips it in ~25 iterations whatever its
                 relative residual says). For :func:`conjugate_gradient` also a non-positive curvature
                 ``<p, (I - M) p> <= 0`` (``I - M`` is then not positive definite). ``converged=False``,
                 ``diverged=True``.
``"max_iter"``   the budget ran out: ``converged=False``, ``diverged=False``.

Limit (documented, not detected): a map without fixed point whose residual stays bounded while ``|z|``
grows (a translation ``T(z) = z + c``) has a relative residual that eventually falls below ``tol``.

Solvers (:data:`SOLVERS`; :data:`ADJOINT_SOLVERS` adds conjugate gradient for affine symmetric maps)
-------
``fixed_point``  ``z_{k+1} = T(z_k)`` (proximal gradient on G for OptEq: G non-increasing when |W|_2 <= 1).
``accelerated``  FISTA on the same step: ``z_{k+1} = T(y_k)``, ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``,
                 ``y_{k+1} = z_{k+1} + (t_k - 1) / t_{k+1} (z_{k+1} - z_k)``, with adaptive restart
                 (O'Donoghue & Candes 2015) per sample: ``restart="objective"`` restarts when
                 ``G(z_{k+1}) > G(z_k)`` and keeps ``z_k``, so the next step is a plain (descent)
                 step from ``z_k`` and G never increases (up to round-off),
                 ``restart="gradient"`` when ``<y_k - z_{k+1}, z_{k+1} - z_k> > 0`` (no objective needed).
``anderson``     Anderson acceleration with memory ``m``: with residuals ``g_j = T(x_j) - x_j`` of the
                 last ``n <= m`` iterates, ``alpha = argmin |sum_j alpha_j g_j|^2 + lam |alpha|^2``
                 subject to ``sum_j alpha_j = 1``, and
                 ``x_{k+1} = sum_j alpha_j (beta T(x_j) + (1 - beta) x_j)``. Where the system is singular
                 (``lam = 0``, dependent residuals: ``torch.linalg.solve_ex`` reports it) or the weights
                 are not finite, that sample takes the plain step ``x_{k+1} = T(x_k)`` (counted in
                 ``restarts``).
``safeguarded_anderson``  Anderson acceleration of the Krasnosel'skii-Mann (KM) step
                 ``S(x) = (1 - theta) x + theta T(x)`` with a residual safeguard: an Anderson candidate is
                 accepted only if its residual ``|T(y) - y|`` is at most ``rho`` times that of the last
                 accepted point, else the run takes the KM step from that point. For an
                 averaged ``T`` with a fixed point this keeps the KM guarantee ``|T(x_k) - x_k| -> 0``
                 (the argument is in :func:`safeguarded_anderson`; Zhang, O'Donoghue & Boyd 2020).
``halpern``      anchored iteration ``z_{k+1} = beta_k a + (1 - beta_k) T(z_k)``, ``beta_k = 1 / (k + 2)``,
                 anchor ``a`` (default ``z0``): for nonexpansive T it converges to the fixed point
                 nearest the anchor, which selects one equilibrium when they are not unique.
``conjugate_gradient``  CG on ``(I - M) z = c`` for an affine ``T(z) = M z + c`` with ``I - M`` symmetric
                 positive definite; :func:`solve_linear` is the same loop on ``A x = b``.

Fused bookkeeping (opt-in option ``fused=True`` of ``accelerated``, ``conjugate_gradient`` and
:func:`solve_linear`): the per-iteration dots, norms and axpys run as ``torch.compile``-d kernels (compiled
once per shape, dtype and device, seconds to a minute on a CPU; ``torch._dynamo``'s recompile limit applies
to many shapes), with a warning and the eager kernels where compilation fails. The loop, the monitor and the
flags are the eager path's; results agree to round-off (``_Bookkeeping``).

New solvers: :func:`register_solver` (their options are read from their signatures).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable

import torch

from proxnets.utils.convergence import IterInfo
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "SolverInfo",
    "relative_residual",
    "fixed_point",
    "accelerated",
    "anderson",
    "safeguarded_anderson",
    "halpern",
    "conjugate_gradient",
    "solve_linear",
    "SOLVERS",
    "ADJOINT_SOLVERS",
    "STOP_REASONS",
    "FLOOR",
    "DIVERGENCE",
    "register_solver",
    "solver_options",
    "check_solver_options",
    "get_solver",
    "solve",
]

Map = Callable[[torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor], torch.Tensor]

FLOOR = 1e-9  # the smallest scale of the relative residual (a fixed point at 0 is then an absolute test)
DIVERGENCE = 1e4  # default growth factor of the residual past its best that ends a run as diverged
STOP_REASONS = ("tol", "max_iter", "nonfinite", "diverged")


@dataclasses.dataclass
class SolverInfo(IterInfo):
    """What every solve reports (fields in order; the rules are in the module docstring).

    - ``iterations`` (int): evaluations of ``T`` that were checked.
    - ``converged`` (bool): ``r_k <= tol`` was reached (``stop_reason == "tol"``); never true of a
      diverged or non-finite run.
    - ``residuals`` (list[float], length ``iterations``): ``r_k``, the max over the batch of the relative
      residual.
    - ``solver`` (str): registry name.
    - ``objectives`` (list[float]): mean over the batch of ``objective`` at the k-th iterate (empty
      without an objective).
    - ``final_residual`` (list[float], length B): per-sample relative residual of the last check.
    - ``abs_residuals`` (list[float], length ``iterations``): ``max_i d_k,i``, the absolute residual
      (non-increasing for the plain iteration of an averaged map).
    - ``restarts`` (int): momentum restarts (``accelerated``) or plain-step fallbacks (``anderson``).
    - ``tol`` (float): the stopping tolerance.
    - ``diverged`` (bool): the run ended by the ``"nonfinite"`` or ``"diverged"`` rule.
    - ``stop_reason`` (str): one of :data:`STOP_REASONS` (``""`` before the run ended).
    - ``backward`` (SolverInfo | None): the adjoint solve of an implicit backward pass, filled in when
      gradients flow (:mod:`proxnets.equilibrium.implicit`).
    """

    solver: str = ""
    objectives: list[float] = dataclasses.field(default_factory=list)
    final_residual: list[float] = dataclasses.field(default_factory=list)
    abs_residuals: list[float] = dataclasses.field(default_factory=list)
    restarts: int = 0
    tol: float = 0.0
    diverged: bool = False
    stop_reason: str = ""
    backward: "SolverInfo | None" = None


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def relative_residual(z: torch.Tensor, tz: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``|T(z) - z| / max(|T(z)|, |z|, FLOOR)``, shape ``(B,)`` (NaN/inf where a norm is not finite).

    ``out`` (optional, shape of ``z``) receives ``z - T(z)``: the solvers reuse one buffer, since
    allocating a batch-sized tensor per iteration costs more than the arithmetic on a CPU.
    """
    check_tensor("z", z, ndim=tuple(range(1, 9)), finite=False)
    check_tensor("tz", tz, shape=tuple(z.shape), finite=False, like=z)
    diff = torch.sub(z, tz, out=out) if out is not None else z - tz
    return _norms(diff) / torch.maximum(_norms(tz), _norms(z)).clamp_min(FLOOR)


class _Monitor:
    """The stopping rules of the module docstring, shared by every solver (one host sync per check)."""

    def __init__(self, solver: str, z0: torch.Tensor, tol: float, callback, divergence: float, max_iter: int = 1):
        # every solver's arguments are checked here, once (z0 is ``b`` for solve_linear)
        check_tensor("z0", z0, ndim=tuple(range(1, 9)), nonempty=True)
        tol = check_number("tol", tol, low=0.0)
        check_int("max_iter", max_iter, low=1)
        check_number("divergence", divergence, low=1.0)
        if callback is not None and not callable(callback):
            fail("callback", "a callable or None", type(callback).__name__, TypeError)
        self.info = SolverInfo(solver=solver, tol=tol)
        self.callback = callback
        self.divergence = divergence
        self.eps = torch.finfo(z0.dtype).eps if z0.is_floating_point() else 0.0
        self.best: torch.Tensor | None = None  # (B,) smallest d so far
        self.r: torch.Tensor | None = None
        self.tz_norm: torch.Tensor | None = None  # |T(z_k)| of the last check (= |z_{k+1}| for the plain step)

    def check(self, z: torch.Tensor, tz: torch.Tensor, out: torch.Tensor | None = None,
              z_norm: torch.Tensor | None = None, broke: torch.Tensor | None = None) -> bool:
        """Record the residual of ``T(z) = tz``; True when the run must stop."""
        with torch.no_grad():
            zd, tzd = z.detach(), tz.detach()
            diff = torch.sub(zd, tzd, out=out) if out is not None else zd - tzd
            tz_norm = _norms(tzd)
            return self.check_norms(_norms(diff), tz_norm, _norms(zd) if z_norm is None else z_norm, tz, broke)

    def check_norms(self, d: torch.Tensor, tz_norm: torch.Tensor, z_norm: torch.Tensor, estimate: torch.Tensor | None,
                    broke: torch.Tensor | None = None, exempt: torch.Tensor | None = None) -> bool:
        """``exempt`` (optional, bool ``(B,)``): samples whose point is not tested by the divergence rule and does
        not enter the best residual (a safeguarded solver's rejected candidates, which the run does not move to)."""
        info = self.info
        self.tz_norm = tz_norm
        scale = torch.maximum(tz_norm, z_norm).clamp_min_(FLOOR)
        r = d / scale
        # an exempt point is not one the run moved to: it neither sets the best residual nor counts as growth
        reached = d if exempt is None else d.masked_fill(exempt, math.inf)
        best = reached if self.best is None else torch.minimum(self.best, reached)
        growth = d / torch.maximum(best, scale * self.eps)  # d_k / max(min_j d_j, eps s_k)
        if exempt is not None:
            growth = growth.masked_fill(exempt, 0.0)
        # one host sync; amax propagates NaN, so a NaN/inf in d shows in max r, an inf scale in max s
        rmax, smax, dmax, gmax = torch.stack([r, scale, d, growth]).amax(dim=1).tolist()
        is_finite = math.isfinite(rmax) and math.isfinite(smax)
        has_grown = gmax > self.divergence or (broke is not None and bool(broke))
        self.best, self.r = best, r
        info.iterations += 1
        info.residuals.append(rmax)
        info.abs_residuals.append(dmax)
        stop = True
        if not is_finite:
            info.stop_reason, info.diverged = "nonfinite", True
        elif rmax <= info.tol:
            info.stop_reason, info.converged = "tol", True
        elif has_grown:
            info.stop_reason, info.diverged = "diverged", True
        else:
            stop = False
        if self.callback is not None and estimate is not None and info.stop_reason != "nonfinite":
            self.callback(info.iterations, estimate, info)
        return stop

    @property
    def nonfinite(self) -> bool:
        return self.info.stop_reason == "nonfinite"

    def finish(self) -> SolverInfo:
        info = self.info
        if not info.stop_reason:
            info.stop_reason = "max_iter"
        if self.r is not None:
            info.final_residual = self.r.tolist()
        return info


def _fresh(tz: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``tz`` itself unless it shares memory with a solver buffer (a map may return its input)."""
    return tz.clone() if any(tz.data_ptr() == t.data_ptr() for t in inputs) else tz


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product ``(B,)`` without a batch-sized temporary."""
    return torch.linalg.vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


def _track(info: SolverInfo, objective: Objective | None, z: torch.Tensor) -> None:
    if objective is not None:
        with torch.no_grad():
            info.objectives.append(float(objective(z).mean()))


# --- the per-iteration bookkeeping: eager kernels and their fused (torch.compile) twins ----------------
# What the solvers do per iteration besides evaluating T is a few memory-bound passes over batch-sized
# tensors (dots, norms, axpys). Run eagerly, each pass is one dispatched op that reads and writes the whole
# batch; ``fused=True`` runs the same arithmetic as compiled functions that do it in fewer passes. Only these
# kernels differ between the two paths: the loops that call them, the monitor (finiteness, convergence
# flags, divergence and stopping rules) and what is reported are one code. The fused twins compute the same
# quantities up to float round-off (sums in another order); the tests compare both paths on fixed problems.


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product in a form the compiler fuses (``vecdot`` is one opaque op)."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def _cg_norms(rs, xx, xr):
    """``(|r|, |x + r|, |x|)`` from ``<r, r>, <x, x>, <x, r>``: what the monitor checks (``T(x) = x + r``);
    ``|x + r|^2 = |x|^2 + 2 <x, r> + |r|^2``, without a batch-sized temporary."""
    return rs.sqrt(), (xx + 2 * xr + rs).clamp_min(0).sqrt(), xx.sqrt()


def _cg_update_with(dot):
    """One CG update (``x``, ``r`` in place) with the per-sample dot ``dot``: the eager and the fusable form differ
    only in how the dots are written."""

    def update(x, r, p, ap, rs):
        pap = dot(p, ap)
        alpha = _expand(rs / pap.clamp_min(1e-30), x)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        rs_new = dot(r, r)
        return (pap, rs_new) + _cg_norms(rs_new, dot(x, x), dot(x, r))

    return update


_cg_update_eager = _cg_update_with(_batch_dot)
_cg_update_fusable = _cg_update_with(_flat_dot)


def _cg_direction(p, r, rs_new, rs):
    # eager on both paths: one pass already, and compiled it is slower (the compiled call's guard checks cost
    # more than the pass; measured, docs/opteq.md); in one graph with the update above the CPU code generator
    # of torch 2.13 fails (a reduction read by an in-place write after another reduction)
    p.mul_(_expand(rs_new / rs.clamp_min(1e-30), p)).add_(r)


def _fista_norms_eager(y, z_new, z, diff, d, gradient: bool):
    """``|y - z_{k+1}|, |z_{k+1}|, |y|`` and, for the gradient restart, ``<y - z_{k+1}, z_{k+1} - z_k>``
    (writing ``d = z_{k+1} - z_k``, which the momentum step reads)."""
    torch.sub(y, z_new, out=diff)
    norms = (_norms(diff), _norms(z_new), _norms(y))
    if not gradient:
        return norms + (None,)
    torch.sub(z_new, z, out=d)
    return norms + (_batch_dot(diff, d),)


def _fista_norms_fusable(y, z_new, z, diff, d, gradient: bool):
    # |y - T(y)|, |T(y)|, |y| and <y - z_{k+1}, z_{k+1} - z_k> in one pass; like the eager form it leaves
    # d = z_{k+1} - z_k for the momentum step (diff, which nothing reads later, is not written)
    e = y - z_new
    norms = (_flat_dot(e, e).sqrt(), _flat_dot(z_new, z_new).sqrt(), _flat_dot(y, y).sqrt())
    if not gradient:
        return norms + (None,)
    step = z_new - z
    d.copy_(step)
    return norms + (_flat_dot(e, step),)


def _fista_t(t, worse):
    """``t`` reset to 1 where the sample restarts, ``t_{k+1} = (1 + sqrt(1 + 4 t^2)) / 2`` and the momentum
    coefficient ``(t - 1) / t_{k+1}``."""
    t = torch.where(worse, torch.ones_like(t), t)
    t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
    return t_next, (t - 1) / t_next


def _fista_momentum(z_new, z, t, worse, d, y_buf, d_ready: bool):
    # eager on both paths, like _cg_direction (one pass when d is ready; compiled it measured slower)
    t_next, coef = _fista_t(t, worse)
    if not d_ready:  # d = z_{k+1} - z_k was not written by the norms kernel (z_{k+1} may have been restarted)
        torch.sub(z_new, z, out=d)
    return torch.addcmul(z_new, _expand(coef, z), d, out=y_buf), t_next


class _Kernel:
    """One bookkeeping kernel: its eager form and the form compiled when ``fused`` (once per input shape,
    dtype and device: ``torch.compile(dynamic=False)`` caches the compiled code behind guards). If compiling
    or running the compiled code raises (no C++ compiler, a device the compiler does not support), the kernel
    warns once and uses its eager form from then on. Under autograd (an input that requires a gradient) the
    eager form runs: the compiled kernels write into their inputs in place."""

    def __init__(self, name: str, eager: Callable, fusable: Callable):
        self.name, self.eager, self.fusable = name, eager, fusable
        self.compiled: Callable | None = None
        self.failure: str | None = None

    def __call__(self, *args):
        if self.failure is not None or (torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return self.eager(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fusable, dynamic=False, fullgraph=True)
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 -- any compiler failure: fall back, loudly, once
            self.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"proxnets.solvers: fused=True, but torch.compile of the {self.name!r} kernel failed "
                          f"({self.failure}); the eager kernel runs instead (same results, unfused)",
                          RuntimeWarning, stacklevel=3)
            return self.eager(*args)


class _Bookkeeping:
    """The kernels a solver calls per iteration; :data:`_EAGER` or :data:`_FUSED` (``fused=True``). Compiled
    when fused: the multi-pass ones (the CG update: 4 dots and 2 axpys; FISTA's 3 norms and restart dot);
    the single-pass ones (``cg_direction``, ``fista_momentum``) are the same eager functions on both paths."""

    COMPILED = ("cg_update", "fista_norms")

    def __init__(self, fused: bool):
        forms = {"cg_update": (_cg_update_eager, _cg_update_fusable), "fista_norms": (_fista_norms_eager, _fista_norms_fusable)}
        for name, (eager, fusable) in forms.items():
            setattr(self, name, _Kernel(name, eager, fusable) if fused else eager)
        self.cg_direction, self.fista_momentum = _cg_direction, _fista_momentum


_EAGER = _Bookkeeping(False)
_FUSED = _Bookkeeping(True)


def _bookkeeping(fused: bool) -> _Bookkeeping:
    if not isinstance(fused, bool):
        fail("fused", "a bool", fused, TypeError)
    return _FUSED if fused else _EAGER


def fixed_point(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    callback: Callable | None = None,
    objective: Objective | None = None,
    divergence: float = DIVERGENCE,
) -> tuple[torch.Tensor, SolverInfo]:
    """Plain iteration ``z_{k+1} = T(z_k)`` (module docstring). Runs under autograd when it is enabled
    (the unrolled backward of :mod:`proxnets.equilibrium.implicit` records it)."""
    mon = _Monitor("fixed_point", z0, tol, callback, divergence, max_iter)
    z = z0
    diff = torch.empty_like(z0)
    _track(mon.info, objective, z)
    for _ in range(max_iter):
        tz = T(z)
        # |z_{k+1}| = |T(z_k)| was measured by the previous check
        done = mon.check(z, tz, out=diff, z_norm=mon.tz_norm)
        if mon.nonfinite:
            break  # keep the last finite iterate
        z = tz
        _track(mon.info, objective, z)
        if done:
            break
    return z, mon.finish()


def accelerated(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    callback: Callable | None = None,
    objective: Objective | None = None,
    divergence: float = DIVERGENCE,
    restart: str = "gradient",
    fused: bool = False,
) -> tuple[torch.Tensor, SolverInfo]:
    """FISTA on the proximal-gradient step ``T`` with per-sample adaptive restart (module docstring).

    ``fused=True`` (opt-in): the three residual norms and the restart test's dot run as one
    ``torch.compile``-d kernel (one pass over the batch instead of five); same loop, checks and flags
    (:func:`solve_linear` says what compiling costs)."""
    K = _bookkeeping(fused)
    check_choice("restart", restart, ("objective", "gradient", "none"))
    if restart == "objective" and objective is None:
        fail("objective", 'a callable z -> (B,) when restart="objective"', None)
    mon = _Monitor("accelerated", z0, tol, callback, divergence, max_iter)
    info = mon.info
    z = y = z0
    y_buf, diff, d = torch.empty_like(z0), torch.empty_like(z0), torch.empty_like(z0)
    t = torch.ones(z0.shape[0], dtype=z0.dtype, device=z0.device)
    g_z = objective(z) if objective is not None else None
    forced = torch.zeros_like(t, dtype=torch.bool)  # samples whose step is a plain step from z_k
    if g_z is not None:
        info.objectives.append(float(g_z.mean()))
    gradient = restart == "gradient"
    for _ in range(max_iter):
        z_new = _fresh(T(y), y_buf)
        # |y_k - z_{k+1}|, |z_{k+1}|, |y_k| and (gradient restart) <y_k - z_{k+1}, z_{k+1} - z_k>
        with torch.no_grad():
            dn, tzn, yn, gdot = K.fista_norms(y.detach(), z_new.detach(), z.detach(), diff, d, gradient)
        done = mon.check_norms(dn, tzn, yn, z_new)
        if mon.nonfinite:
            break  # z: the last finite iterate
        if done:
            z = z_new
            _track(info, objective, z)
            break
        if restart == "objective":
            g_new = objective(z_new)
            # a plain step after a restart is a descent step in exact arithmetic: accept it even
            # when round-off in G says otherwise, else the iteration could stall on noise
            worse = (g_new > g_z) & ~forced  # (B,)
            forced = worse
            # keep z_k where G went up: the next step is then a plain prox-gradient step from z_k
            z_new = torch.where(_expand(worse, z), z, z_new)
            g_z = torch.where(worse, g_z, g_new)
        if gradient:
            worse = gdot > 0  # <y_k - z_{k+1}, z_{k+1} - z_k> > 0
        elif restart == "none":
            worse = torch.zeros_like(t, dtype=torch.bool)
        info.restarts += int(worse.sum())
        # t restarted where worse, then y = z_{k+1} + (t_k - 1) / t_{k+1} (z_{k+1} - z_k)
        y, t = K.fista_momentum(z_new, z, t, worse, d, y_buf, gradient)
        z = z_new
        if objective is not None:
            info.objectives.append(float((g_z if restart == "objective" else objective(z)).mean()))
    return z, mon.finish()


def _anderson_weights(Hn: torch.Tensor, lam: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Type-II Anderson weights ``alpha = argmin |sum_j alpha_j g_j|^2 + lam s |alpha|^2, sum_j alpha_j = 1``.

    ``Hn`` is the (B, n, n) Gram matrix ``<g_i, g_j>`` in float64 and ``s`` its mean diagonal (so ``lam`` is
    scale-free). Returns ``alpha`` (B, n) in ``dtype`` and ``bad`` (B,): samples whose regularized system is
    singular or whose weights are not finite; the caller gives those the plain step.
    """
    bsz, n = Hn.shape[0], Hn.shape[1]
    scale = Hn.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)  # (B,)
    reg = Hn + (lam * scale)[:, None, None] * torch.eye(n, dtype=Hn.dtype, device=Hn.device)
    ones = torch.ones(bsz, n, 1, dtype=Hn.dtype, device=Hn.device)
    # solve_ex reports a singular system per sample (info > 0) instead of raising for the batch
    sol, singular = torch.linalg.solve_ex(reg, ones)
    sol = sol.squeeze(2)  # (B, n)
    alpha = (sol / sol.sum(dim=1, keepdim=True)).to(dtype)
    bad = (singular != 0) | ~torch.isfinite(alpha).all(dim=1)  # (B,)
    return alpha, bad


def anderson(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    callback: Callable | None = None,
    objective: Objective | None = None,
    divergence: float = DIVERGENCE,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> tuple[torch.Tensor, SolverInfo]:
    """Anderson acceleration (type II, regularized normal equations; module docstring)."""
    m = check_int("m", m, low=1)
    lam = check_number("lam", lam, low=0.0)
    beta = check_number("beta", beta, low=0.0, high=1.0, low_inclusive=False)
    mon = _Monitor("anderson", z0, tol, callback, divergence, max_iter)
    info = mon.info
    bsz = z0.shape[0]
    shape = z0.shape
    x = z0.reshape(bsz, -1)
    # ring buffers of the last m iterates: T(x_j) are kept by reference (T returns fresh tensors),
    # residuals g_j = T(x_j) - x_j are written into preallocated slots; x_j are kept only if beta < 1
    F: list[torch.Tensor | None] = [None] * m
    G = [torch.empty_like(x) for _ in range(m)]
    X = [torch.empty_like(x) for _ in range(m)] if beta < 1.0 else []
    H = torch.zeros(bsz, m, m, dtype=torch.float64, device=x.device)  # <g_i, g_j>, updated by one row
    x_bufs = (torch.empty_like(x), torch.empty_like(x))  # ping-pong storage of the mixed iterate
    _track(info, objective, z0)
    fx = x
    diff = torch.empty_like(x)
    for k in range(max_iter):
        fx = _fresh(T(x.reshape(shape)).reshape(bsz, -1), *x_bufs)
        done = mon.check(x, fx, out=diff)
        if mon.nonfinite:
            fx = x  # return the last finite iterate
            break
        _track(info, objective, fx.reshape(shape))
        if done:
            break
        slot = k % m
        F[slot] = fx
        torch.sub(fx, x, out=G[slot])
        if X:
            X[slot].copy_(x)
        n = min(k + 1, m)
        row = torch.stack([torch.linalg.vecdot(G[j], G[slot]) for j in range(n)], dim=1).double()  # (B, n)
        H[:, slot, :n], H[:, :n, slot] = row, row
        alpha, bad = _anderson_weights(H[:, :n, :n], lam, x.dtype)
        if bool(bad.any()):  # fall back to the plain step x_{k+1} = T(x_k) for those samples
            info.restarts += int(bad.sum())
            alpha = torch.where(bad[:, None], torch.zeros_like(alpha), alpha)
            alpha[bad, slot] = 1.0
        out = x_bufs[k % 2]
        # x_{k+1} = sum_j alpha_j (beta T(x_j) + (1 - beta) x_j), slot by slot (no (B, n, d) temporaries)
        torch.mul(F[0], alpha[:, :1] * beta, out=out)
        for j in range(1, n):
            out.addcmul_(F[j], alpha[:, j : j + 1] * beta)
        for j in range(n if X else 0):
            out.addcmul_(X[j], alpha[:, j : j + 1] * (1 - beta))
        x = out
    return fx.reshape(shape), mon.finish()


def safeguarded_anderson(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    callback: Callable | None = None,
    objective: Objective | None = None,
    divergence: float = DIVERGENCE,
    m: int = 5,
    lam: float = 1e-4,
    theta: float = 1.0,
    rho: float = 0.9,
) -> tuple[torch.Tensor, SolverInfo]:
    """Safeguarded Anderson acceleration of the Krasnosel'skii-Mann step, per sample of the batch.

    The KM step of ``T`` is ``S(x) = (1 - theta) x + theta T(x)``, ``theta`` in (0, 1] (``theta = 1``: the
    plain step, itself a KM step when ``T`` is averaged, e.g. OptEq's proximal-gradient map). Every iteration
    evaluates ``T`` at one point ``y_k``, which is either

    - a **KM point** ``y_k = S(x)`` of the last accepted point ``x`` (the first point ``z0``, the step after a
      rejection, and wherever the Anderson system is singular or its weights are not finite); it is always
      accepted, or
    - an **Anderson candidate** ``y_k = sum_j alpha_j ((1 - theta) y_j + theta T(y_j))`` over the last ``n <= m``
      evaluations, ``alpha = argmin |sum_j alpha_j g_j|^2 + lam |alpha|^2`` subject to ``sum_j alpha_j = 1``
      (``g_j = T(y_j) - y_j``; type II, as :func:`anderson`). It is accepted iff

          |g(y_k)| <= rho * |g(x)|,     x the last accepted point (KM point or candidate),

      (or its relative residual already meets ``tol``). A rejected candidate is not moved to: the next
      point is the KM point ``S(x)`` (cost: one evaluation of ``T``; counted in ``restarts``). Its
      evaluation still enters the Anderson history (a valid secant pair) and is exempt from the divergence
      rule and from the best residual (the run did not move there).

    Why the guarantee of KM survives (``T`` averaged with a fixed point, e.g. nonexpansive and ``theta < 1``,
    or ``theta = 1`` and ``T`` averaged): ``S`` is nonexpansive, so along KM points the residual does not
    grow: ``|g(S x)| = |S(S x) - S x| / theta <= |S x - x| / theta = |g(x)|``; an accepted candidate lowers it
    by the factor ``rho``. So the residuals of the accepted points never increase, and after j accepted
    candidates ``|g(x_k)| <= rho^j |g(z0)|``. Hence either infinitely many candidates are accepted and
    ``|g(x_k)| -> 0`` geometrically in j, or after the last one the run is the plain KM iteration of an
    averaged map, whose residual tends to 0 (Krasnosel'skii-Mann theorem,
    Bauschke & Combettes, *Convex Analysis and Monotone Operator Theory*, Thm. 5.15) and whose iterates
    converge to a fixed point. Either way ``r_k <= tol`` is reached in finitely many evaluations (at most
    twice the KM count: each rejection costs one). For a ``q``-contraction (OptEq with ``|W|_2 < 1``) the
    distance to the unique fixed point is at most ``|g(x)| / (1 - q)``, so the iterates converge too. For a
    merely nonexpansive ``T`` with many fixed points this rule guarantees ``|g| -> 0``, not that the
    accelerated iterates converge to one point (that needs the bounded-weight conditions of Zhang,
    O'Donoghue & Boyd).

    The safeguard is that of Zhang, O'Donoghue & Boyd, "Globally convergent type-I Anderson acceleration for
    nonsmooth fixed-point iterations", SIAM J. Optim. 30(4), 2020 (accept a candidate iff its residual is
    below a summable sequence times ``|g(z0)|``), here in the stricter monotone form (a decrease by ``rho``
    relative to the current point), which makes a rejection cost one evaluation and never a setback. What it
    does not do: make an unaveraged ``T`` converge; there the stopping rules of the module docstring report
    the run (``"diverged"``, ``"max_iter"``; e.g. ``relu(1.5 z + 1)`` ends at ``"max_iter"``).

    Returns ``T`` of the last evaluated point (the output object of that evaluation itself) and the
    :class:`SolverInfo`; ``converged`` only when ``r_k <= tol`` was reached at that point.
    """
    m = check_int("m", m, low=1)
    lam = check_number("lam", lam, low=0.0)
    theta = check_number("theta", theta, low=0.0, high=1.0, low_inclusive=False)
    rho = check_number("rho", rho, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    mon = _Monitor("safeguarded_anderson", z0, tol, callback, divergence, max_iter)
    info = mon.info
    bsz, shape = z0.shape[0], z0.shape
    y = z0.reshape(bsz, -1)
    dim, dt, dev = y.shape[1], y.dtype, y.device
    # history of the last m evaluations, (B, m, d): T(y_j) and g_j = T(y_j) - y_j (and y_j when theta < 1)
    Fb = torch.empty(bsz, m, dim, dtype=dt, device=dev)
    Gb = torch.empty(bsz, m, dim, dtype=dt, device=dev)
    Xb = torch.empty(bsz, m, dim, dtype=dt, device=dev) if theta < 1.0 else None
    H = torch.zeros(bsz, m, m, dtype=torch.float64, device=dev)  # <g_i, g_j>, updated by one row
    x = fx = ref = None  # last accepted point, T there, |g| of the last accepted candidate (or of z0)
    candidate = torch.zeros(bsz, dtype=torch.bool, device=dev)  # y_k is an Anderson candidate (else a KM point)
    _track(info, objective, z0)
    out = z0
    for k in range(max_iter):
        out = T(y.reshape(shape))  # returned as is (callers may rely on the object being T's output)
        fy = out.reshape(bsz, -1)
        slot = k % m
        g = torch.sub(fy, y, out=Gb[:, slot])
        d, fy_norm, y_norm = _norms(g), _norms(fy), _norms(y)
        if ref is None:
            ref = d
        met = d <= tol * torch.maximum(fy_norm, y_norm).clamp_min(FLOOR)  # this point already meets tol
        reject = candidate & (d > rho * ref) & ~met
        done = mon.check_norms(d, fy_norm, y_norm, out, exempt=reject)
        if mon.nonfinite:
            out = y.reshape(shape)  # the last finite iterate (the input of that evaluation)
            break
        _track(info, objective, out)
        if done:
            break
        Fb[:, slot].copy_(fy)
        if Xb is not None:
            Xb[:, slot].copy_(y)
        n = min(k + 1, m)
        # (B, 1, d) @ (B, d, n) with a transposed operand: ~10x faster on a CPU than (B, n, d) @ (B, d, 1)
        row = torch.bmm(g.unsqueeze(1), Gb[:, :n].transpose(1, 2)).squeeze(1).double()  # (B, n)
        H[:, slot, :n], H[:, :n, slot] = row, row
        n_rej = int(reject.sum())
        if n_rej:  # rejected samples stay at their last accepted point
            info.restarts += n_rej
            keep = reject[:, None]
            x, fx = torch.where(keep, x, y), torch.where(keep, fx, fy)
            ref = torch.where(reject, ref, d)
        else:
            x, fx, ref = y, fy, d
        alpha, bad = _anderson_weights(H[:, :n, :n], lam, dt)
        alpha = alpha.masked_fill(bad[:, None], 0.0)  # those samples take the KM point below
        y_new = torch.bmm(alpha.unsqueeze(1), Fb[:, :n]).squeeze(1)  # sum_j alpha_j T(y_j)
        if Xb is not None:  # sum_j alpha_j ((1 - theta) y_j + theta T(y_j))
            y_new.mul_(theta).add_(torch.bmm(alpha.unsqueeze(1), Xb[:, :n]).squeeze(1), alpha=1.0 - theta)
        km_mask = reject | bad
        if bool(km_mask.any()):
            km = fx if Xb is None else torch.lerp(x, fx, theta)  # S(x) = (1 - theta) x + theta T(x)
            y_new = torch.where(km_mask[:, None], km, y_new)
        candidate = ~km_mask
        y = y_new
    return out, mon.finish()


def halpern(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 2000,
    callback: Callable | None = None,
    objective: Objective | None = None,
    divergence: float = DIVERGENCE,
    anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolverInfo]:
    """Anchored iteration ``z_{k+1} = a / (k + 2) + (1 - 1 / (k + 2)) T(z_k)`` (module docstring)."""
    a = z0 if anchor is None else check_tensor("anchor", anchor, shape=tuple(z0.shape))
    mon = _Monitor("halpern", z0, tol, callback, divergence, max_iter)
    z = z0
    tz = z
    diff = torch.empty_like(z0)
    _track(mon.info, objective, z)
    for k in range(max_iter):
        tz = T(z)
        done = mon.check(z, tz, out=diff)
        if mon.nonfinite:
            tz = z  # return the last finite iterate
            break
        if done:
            break
        beta = 1.0 / (k + 2)
        z = beta * a + (1 - beta) * tz
        _track(mon.info, objective, z)
    return tz, mon.finish()


def _cg_loop(apply: Map, x: torch.Tensor, r: torch.Tensor, mon: _Monitor, max_iter: int, want_estimate: bool,
             fused: bool = False) -> torch.Tensor:
    """Conjugate gradient on ``A x = b`` from ``x`` with residual ``r = b - A x`` (``A = apply``, SPD).

    In fixed-point form ``T(x) = x + r`` (``d = |r|``, scale ``max(|x + r|, |x|)``), so the monitor's rules
    are those of every solver; ``<p, A p> <= 0`` (A not positive definite) ends the run as diverged.
    The one CG loop of the project: :func:`conjugate_gradient` and :func:`solve_linear` call it; ``fused``
    swaps the arithmetic kernels only (:class:`_Bookkeeping`).
    """
    K = _bookkeeping(fused)
    p = r.clone()
    rs = _batch_dot(r, r)
    norms = _cg_norms(rs, _batch_dot(x, x), _batch_dot(x, r))  # |r|, |x + r|, |x|
    broke = None
    for _ in range(max_iter):
        estimate = x + r if want_estimate else None
        if mon.check_norms(*norms, estimate, broke):
            break
        ap = _fresh(apply(p), p, x, r)
        # x += alpha p, r -= alpha A p (alpha = <r, r> / <p, A p>); the norms of the next check come with it
        pap, rs_new, *norms = K.cg_update(x, r, p, ap, rs)
        broke = ((pap <= 0) & (rs > 0)).any()  # p = 0 exactly where r = 0 (a solved sample)
        K.cg_direction(p, r, rs_new, rs)  # p = r + (<r_new, r_new> / <r, r>) p
        rs = rs_new
    return x


def conjugate_gradient(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    callback: Callable | None = None,
    objective: Objective | None = None,
    divergence: float = DIVERGENCE,
    fused: bool = False,
) -> tuple[torch.Tensor, SolverInfo]:
    """Conjugate gradient on ``(I - M) z = c`` for an *affine* ``T(z) = M z + c`` with ``M`` symmetric
    and ``I - M`` positive definite (e.g. ``|M|_2 < 1``), per sample of the batch.

    Uses only calls to ``T``: ``c = T(0)``, ``(I - M) p = p - (T(p) - c)``; the residual
    ``r = T(z) - z`` is updated by the CG recurrence (exact for affine ``T`` up to round-off; for a
    nonlinear ``T`` the recurrence is meaningless, so CG is only in :data:`ADJOINT_SOLVERS`). It is the
    optimal Krylov method for this system, and the symmetrized adjoint of OptEq
    (:meth:`proxnets.equilibrium.layers.OptEqBase.attach_implicit`) has exactly this form. ``fused=True``
    runs the per-iteration dots and axpys as compiled kernels (see :func:`solve_linear`).
    """
    _bookkeeping(fused)
    mon = _Monitor("conjugate_gradient", z0, tol, callback, divergence, max_iter)
    c = T(torch.zeros_like(z0))
    x = z0.clone()
    if bool((z0 == 0).all()):  # r = T(0) - 0 = c: no second evaluation
        r = c.clone()
    else:
        r = T(x)
        r.sub_(x)  # r = T(x) - x

    def apply(p: torch.Tensor) -> torch.Tensor:
        # (I - M) p = p - (T(p) - c), in place on T's output unless T handed back p or c itself
        return _fresh(T(p), p, c).sub_(c).neg_().add_(p)

    x = _cg_loop(apply, x, r, mon, max_iter, callback is not None, fused)
    _track(mon.info, objective, x + r)
    return x.add_(r), mon.finish()


def solve_linear(
    A: Map,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 200,
    callback: Callable | None = None,
    divergence: float = DIVERGENCE,
    fused: bool = False,
) -> tuple[torch.Tensor, SolverInfo]:
    """Solve ``A x = b`` per sample for a symmetric positive definite ``A`` (a map ``(B, ...) -> (B, ...)``)
    by conjugate gradient from ``x0`` (default 0): the fixed point of ``T(x) = x + b - A x``, with the
    stopping rules of every solver. Returns ``(x, info)``; ``info.solver == "conjugate_gradient"``.

    ``fused=True`` (opt-in): the per-iteration update (4 per-sample dots, 2 axpys) runs as one
    ``torch.compile``-d kernel instead of 6 eager passes; compiled once per shape, dtype and device
    (seconds to a minute on a CPU; a warning and the eager kernels where compilation is unavailable). The loop, its checks and
    its flags are the eager path's; only the arithmetic (round-off) differs."""
    _bookkeeping(fused)
    check_tensor("b", b, ndim=tuple(range(1, 9)), nonempty=True)
    if x0 is not None:
        check_tensor("x0", x0, shape=tuple(b.shape), like=b)
    mon = _Monitor("conjugate_gradient", b, tol, callback, divergence, max_iter)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - A(x)
    x = _cg_loop(A, x, r, mon, max_iter, callback is not None, fused)
    return x, mon.finish()


# --- the registry ------------------------------------------------------------------------------
SolverFn = Callable[..., tuple[torch.Tensor, SolverInfo]]

SOLVERS: dict[str, SolverFn] = {}
# solvers of adjoint equations: every fixed-point solver, plus those that need an affine map with a
# symmetric linear part (CG; OptEq's symmetrized adjoint)
ADJOINT_SOLVERS: dict[str, SolverFn] = {}
_COMMON = ("tol", "max_iter", "callback")
_SHARED = ("objective",)  # passed by solve() to every solver, not an option
_OPTIONS: dict[str, tuple[str, ...]] = {}


def solver_options(fn: SolverFn) -> tuple[str, ...]:
    """The options a solver accepts: its keyword-only parameters beyond ``tol, max_iter, callback, objective``."""
    params = inspect.signature(fn).parameters
    return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _COMMON + _SHARED)


def register_solver(name: str, fn: SolverFn, *, affine_only: bool = False) -> SolverFn:
    """Register ``fn`` under ``name``: in :data:`SOLVERS` and :data:`ADJOINT_SOLVERS`, or only in the
    latter when ``affine_only`` (a method valid only for affine symmetric maps, like CG).

    ``fn`` must take ``(T, z0, *, tol, max_iter, callback, objective, ...)`` and return ``(z, info)`` with
    ``info`` a :class:`SolverInfo`; its other keyword-only parameters are its options (validated by
    :func:`check_solver_options`). Returns ``fn`` (usable as a decorator through ``functools.partial``).
    """
    if not isinstance(name, str) or not name:
        fail("name", "a non-empty str", name, TypeError)
    if not callable(fn):
        fail("fn", "a callable (T, z0, *, tol, max_iter, callback, objective, ...)", type(fn).__name__, TypeError)
    params = inspect.signature(fn).parameters
    positional = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    missing = [n for n in _COMMON + _SHARED if n not in params]
    if len(positional) < 2 or missing:
        fail("fn", "a callable (T, z0, *, tol, max_iter, callback, objective, ...)",
             f"{getattr(fn, '__name__', fn)}{inspect.signature(fn)}", TypeError)
    _OPTIONS[name] = solver_options(fn)
    ADJOINT_SOLVERS[name] = fn
    if not affine_only:
        SOLVERS[name] = fn
    return fn


for _name, _fn in (("fixed_point", fixed_point), ("accelerated", accelerated), ("anderson", anderson),
                   ("safeguarded_anderson", safeguarded_anderson), ("halpern", halpern)):
    register_solver(_name, _fn)
register_solver("conjugate_gradient", conjugate_gradient, affine_only=True)


def get_solver(name: str, registry: dict | None = None) -> SolverFn:
    """The solver registered under ``name`` (in :data:`SOLVERS` unless ``registry`` is given)."""
    registry = SOLVERS if registry is None else registry
    check_choice("solver", name, sorted(registry))
    return registry[name]


def check_solver_options(name: str, options: dict, registry: dict | None = None) -> dict:
    """Unknown solvers and options raise ``ValueError`` listing the valid ones (never silently ignored)."""
    get_solver(name, registry)
    if not isinstance(options, dict):
        fail("solver_options", "a dict", type(options).__name__, TypeError)
    valid = _OPTIONS[name]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        fail("solver_options", f"options of {name!r} among {sorted(valid)}", unknown)
    return dict(options)


def solve(
    name: str,
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    callback: Callable | None = None,
    objective: Objective | None = None,
    registry: dict | None = None,
    **options,
) -> tuple[torch.Tensor, SolverInfo]:
    """Validate, then run the solver ``name`` of ``registry`` (default :data:`SOLVERS`)."""
    registry = SOLVERS if registry is None else registry
    check_solver_options(name, options, registry)
    check_number("tol", tol, low=0.0, low_inclusive=False)
    check_int("max_iter", max_iter, low=1)
    check_tensor("z0", z0, finite=False)  # a finiteness scan costs as much as an iteration; the monitor sees non-finite norms
    if z0.ndim < 2:
        fail("z0", "a batched tensor (B, ...)", f"shape {tuple(z0.shape)}")
    return registry[name](T, z0, tol=tol, max_iter=max_iter, callback=callback, objective=objective, **options)
