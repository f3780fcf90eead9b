"""Fixed-point solvers for ``z = T(z)``, one signature, one registry.

Every solver is called as

    z, info = solver(T, z0, *, tol, max_iter, objective=None, **options)

with ``T`` a map on batched tensors ``(B, ...) -> (B, ...)`` and ``objective`` an optional
``z -> (B,)`` (the convex objective ``G`` whose minimizers are the fixed points, see
:mod:`proxnets.equilibrium.layers`). It returns ``T`` applied to its last iterate, so the returned
point's residual is at most the last recorded one when ``T`` is nonexpansive.

Residual (all solvers): for the point ``z_k`` at which ``T`` was evaluated,

    r_k = max_i |T(z_k)_i - z_k_i| / (|T(z_k)_i| + 1e-9)            (i over the batch)

and a solver stops when ``r_k <= tol``. For OptEq, ``T(z) = prox_f(W^T W z + U x + b)`` is exactly a
proximal-gradient step of size 1 on ``G``, so ``r_k = 0`` is first-order optimality.

Solvers
-------
``fixed_point``  ``z_{k+1} = T(z_k)`` (proximal gradient on G; G non-increasing when |W|_2 <= 1).
``accelerated``  FISTA on the same step: ``z_{k+1} = T(y_k)``, ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``,
                 ``y_{k+1} = z_{k+1} + (t_k - 1) / t_{k+1} (z_{k+1} - z_k)``, with adaptive restart
                 (O'Donoghue & Candes 2015) per sample: ``restart="objective"`` restarts when
                 ``G(z_{k+1}) > G(z_k)`` and keeps ``z_k``, so the next step is a plain (descent)
                 step from ``z_k`` and G never increases (up to round-off),
                 ``restart="gradient"`` when ``<y_k - z_{k+1}, z_{k+1} - z_k> > 0`` (no objective needed).
``anderson``     Anderson acceleration with memory ``m``: with residuals ``g_j = T(x_j) - x_j`` of the
                 last ``n <= m`` iterates, ``alpha = argmin |sum_j alpha_j g_j|^2 + lam |alpha|^2``
                 subject to ``sum_j alpha_j = 1``, and
                 ``x_{k+1} = sum_j alpha_j (beta T(x_j) + (1 - beta) x_j)``.
``halpern``      anchored iteration ``z_{k+1} = beta_k a + (1 - beta_k) T(z_k)``, ``beta_k = 1 / (k + 2)``,
                 anchor ``a`` (default ``z0``): for nonexpansive T it converges to the fixed point
                 nearest the anchor, which selects one equilibrium when they are not unique.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from proxnets.utils.convergence import IterInfo
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "EquilibriumInfo",
    "relative_residual",
    "fixed_point",
    "accelerated",
    "anderson",
    "halpern",
    "conjugate_gradient",
    "SOLVERS",
    "ADJOINT_SOLVERS",
    "check_solver_options",
    "get_solver",
    "solve",
]

Map = Callable[[torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class EquilibriumInfo(IterInfo):
    """What a fixed-point solve reports.

    - ``solver`` (str): registry name.
    - ``iterations`` (int): evaluations of ``T``.
    - ``converged`` (bool): ``residuals[-1] <= tol``.
    - ``residuals`` (list[float], length ``iterations``): ``r_k`` of the module docstring.
    - ``objectives`` (list[float]): mean over the batch of ``G`` at the k-th iterate (empty
      without an objective or when not tracked).
    - ``final_residual`` (list[float], length B): per-sample relative residual of the last check.
    - ``restarts`` (int): momentum restarts (``accelerated``) or history resets (``anderson``).
    - ``tol`` (float): the stopping tolerance.
    - ``backward`` (EquilibriumInfo | None): the adjoint solve of the implicit backward pass,
      filled in when gradients flow.
    """

    solver: str = ""
    objectives: list[float] = dataclasses.field(default_factory=list)
    final_residual: list[float] = dataclasses.field(default_factory=list)
    restarts: int = 0
    tol: float = 0.0
    backward: "EquilibriumInfo | None" = None


def relative_residual(z: torch.Tensor, tz: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``|T(z) - z| / (|T(z)| + 1e-9)``, shape ``(B,)``.

    ``out`` (optional, shape of ``z``) receives ``z - T(z)``: the solvers reuse one buffer, since
    allocating a batch-sized tensor per iteration costs more than the arithmetic on a CPU.
    """
    diff = torch.sub(z, tz, out=out) if out is not None else z - tz
    num = torch.linalg.vector_norm(diff.reshape(z.shape[0], -1), dim=1)
    return num / (torch.linalg.vector_norm(tz.reshape(z.shape[0], -1), dim=1) + 1e-9)


def _fresh(tz: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``tz`` itself unless it shares memory with a solver buffer (a map may return its input)."""
    return tz.clone() if any(tz.data_ptr() == t.data_ptr() for t in inputs) else tz


def _record(info: EquilibriumInfo, r: torch.Tensor) -> bool:
    info.iterations += 1
    rmax = float(r.max())
    info.residuals.append(rmax)
    info.final_residual = r.tolist()
    if rmax <= info.tol:
        info.converged = True
    return info.converged


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product ``(B,)`` without a batch-sized temporary."""
    return torch.linalg.vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


def fixed_point(
    T: Map, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 200, objective: Objective | None = None
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Plain iteration ``z_{k+1} = T(z_k)`` (see module docstring)."""
    info = EquilibriumInfo(solver="fixed_point", tol=tol)
    z = z0
    diff = torch.empty_like(z0)
    if objective is not None:
        info.objectives.append(float(objective(z).mean()))
    for _ in range(max_iter):
        tz = T(z)
        done = _record(info, relative_residual(z, tz, out=diff))
        z = tz
        if objective is not None:
            info.objectives.append(float(objective(z).mean()))
        if done:
            break
    return z, info


def accelerated(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    objective: Objective | None = None,
    restart: str = "gradient",
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """FISTA on the proximal-gradient step ``T`` with per-sample adaptive restart."""
    check_choice("restart", restart, ("objective", "gradient", "none"))
    if restart == "objective" and objective is None:
        fail("objective", 'a callable z -> (B,) when restart="objective"', None)
    info = EquilibriumInfo(solver="accelerated", tol=tol)
    z = y = z0
    y_buf, diff, d = torch.empty_like(z0), torch.empty_like(z0), torch.empty_like(z0)
    t = torch.ones(z0.shape[0], dtype=z0.dtype, device=z0.device)
    g_z = objective(z) if objective is not None else None
    forced = torch.zeros_like(t, dtype=torch.bool)  # samples whose step is a plain step from z_k
    if g_z is not None:
        info.objectives.append(float(g_z.mean()))
    for _ in range(max_iter):
        z_new = _fresh(T(y), y_buf)
        done = _record(info, relative_residual(y, z_new, out=diff))  # diff = y_k - z_{k+1}
        if done:
            z = z_new
            if objective is not None:
                info.objectives.append(float(objective(z).mean()))
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
        torch.sub(z_new, z, out=d)  # z_{k+1} - z_k
        if restart == "gradient":
            worse = _batch_dot(diff, d) > 0  # <y_k - z_{k+1}, z_{k+1} - z_k> > 0
        elif restart == "none":
            worse = torch.zeros_like(t, dtype=torch.bool)
        info.restarts += int(worse.sum())
        t = torch.where(worse, torch.ones_like(t), t)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        y = torch.addcmul(z_new, _expand((t - 1) / t_next, z), d, out=y_buf)  # z_{k+1} + mom (z_{k+1} - z_k)
        z, t = z_new, t_next
        if objective is not None:
            info.objectives.append(float((g_z if restart == "objective" else objective(z)).mean()))
    return z, info


def anderson(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    objective: Objective | None = None,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Anderson acceleration (type II, regularized normal equations; see module docstring)."""
    m = check_int("m", m, low=1)
    lam = check_number("lam", lam, low=0.0)
    beta = check_number("beta", beta, low=0.0, high=1.0, low_inclusive=False)
    info = EquilibriumInfo(solver="anderson", tol=tol)
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
    if objective is not None:
        info.objectives.append(float(objective(z0).mean()))
    fx = x
    diff = torch.empty_like(x)
    for k in range(max_iter):
        fx = _fresh(T(x.reshape(shape)).reshape(bsz, -1), *x_bufs)
        done = _record(info, relative_residual(x, fx, out=diff))
        if objective is not None:
            info.objectives.append(float(objective(fx.reshape(shape)).mean()))
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
        Hn = H[:, :n, :n]
        scale = Hn.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)  # (B,)
        reg = Hn + (lam * scale)[:, None, None] * torch.eye(n, dtype=Hn.dtype, device=x.device)
        ones = torch.ones(bsz, n, 1, dtype=Hn.dtype, device=x.device)
        sol = torch.linalg.solve(reg, ones).squeeze(2)  # (B, n)
        alpha = (sol / sol.sum(dim=1, keepdim=True)).to(x.dtype)
        bad = ~torch.isfinite(alpha).all(dim=1)  # (B,)
        if bool(bad.any()):  # a singular least-squares system: fall back to the plain step
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
    return fx.reshape(shape), info


def halpern(
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 2000,
    objective: Objective | None = None,
    anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Anchored iteration ``z_{k+1} = a / (k + 2) + (1 - 1 / (k + 2)) T(z_k)``."""
    a = z0 if anchor is None else check_tensor("anchor", anchor, shape=tuple(z0.shape))
    info = EquilibriumInfo(solver="halpern", tol=tol)
    z = z0
    tz = z
    if objective is not None:
        info.objectives.append(float(objective(z).mean()))
    for k in range(max_iter):
        tz = T(z)
        done = _record(info, relative_residual(z, tz))
        if done:
            break
        beta = 1.0 / (k + 2)
        z = beta * a + (1 - beta) * tz
        if objective is not None:
            info.objectives.append(float(objective(z).mean()))
    return tz, info


def conjugate_gradient(
    T: Map, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 200, objective: Objective | None = None
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Conjugate gradient on ``(I - M) z = c`` for an *affine* ``T(z) = M z + c`` with ``M`` symmetric
    and ``|M|_2 < 1`` (so ``I - M`` is positive definite), per sample of the batch.

    Uses only calls to ``T``: ``c = T(0)``, ``(I - M) p = p - (T(p) - c)``; the residual
    ``r = T(z) - z`` is updated by the CG recurrence. It is the optimal Krylov method for this
    system, and the symmetrized adjoint of OptEq (:meth:`OptEqBase.attach_implicit`) has exactly this
    form. Not for nonlinear T (not in :data:`SOLVERS`; in :data:`ADJOINT_SOLVERS`).
    """
    info = EquilibriumInfo(solver="conjugate_gradient", tol=tol)
    bsz = z0.shape[0]

    c = T(torch.zeros_like(z0))
    x = z0.clone()
    if bool((z0 == 0).all()):  # r = T(0) - 0 = c: no second evaluation
        r = c.clone()
    else:
        r = T(x)
        r.sub_(x)  # r = T(x) - x
    p = r.clone()
    rs = _batch_dot(r, r)
    for _ in range(max_iter):
        # |r| / |T(x)| with T(x) = x + r
        rel = rs.sqrt() / (torch.linalg.vector_norm((x + r).reshape(bsz, -1), dim=1) + 1e-9)
        if _record(info, rel):
            break
        ap = _fresh(T(p), p, x, r)
        ap.sub_(c).neg_().add_(p)  # (I - M) p = p - (T(p) - c)
        alpha = _expand(rs / _batch_dot(p, ap).clamp_min(1e-30), x)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        rs_new = _batch_dot(r, r)
        p.mul_(_expand(rs_new / rs.clamp_min(1e-30), p)).add_(r)
        rs = rs_new
    if objective is not None:
        info.objectives.append(float(objective(x + r).mean()))
    return x + r, info


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, EquilibriumInfo]]] = {
    "fixed_point": fixed_point,
    "accelerated": accelerated,
    "anderson": anderson,
    "halpern": halpern,
}

# solvers of the adjoint equation: every fixed-point solver, plus CG where the adjoint map is
# affine with a symmetric linear part (OptEq's symmetrized adjoint)
ADJOINT_SOLVERS = {**SOLVERS, "conjugate_gradient": conjugate_gradient}

_OPTIONS = {
    "fixed_point": set(),
    "accelerated": {"restart"},
    "anderson": {"m", "lam", "beta"},
    "halpern": {"anchor"},
    "conjugate_gradient": set(),
}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, EquilibriumInfo]]:
    """The solver registered under ``name``."""
    check_choice("solver", name, sorted(SOLVERS))
    return SOLVERS[name]


def check_solver_options(name: str, options: dict, registry: dict | None = None) -> dict:
    """Unknown solvers and options raise (never silently ignored)."""
    check_choice("solver", name, sorted(registry or SOLVERS))
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        fail("solver_options", f"options of {name!r} among {sorted(_OPTIONS[name])}", sorted(unknown))
    return dict(options)


def solve(
    name: str,
    T: Map,
    z0: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    objective: Objective | None = None,
    registry: dict | None = None,
    **options,
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Validate, then run the solver ``name`` of ``registry`` (default :data:`SOLVERS`)."""
    registry = registry or SOLVERS
    check_solver_options(name, options, registry)
    check_number("tol", tol, low=0.0, low_inclusive=False)
    check_int("max_iter", max_iter, low=1)
    check_tensor("z0", z0, finite=False)  # a finiteness scan costs as much as an iteration; callers validate inputs
    if z0.ndim < 2:
        fail("z0", "a batched tensor (B, ...)", f"shape {tuple(z0.shape)}")
    return registry[name](T, z0, tol=tol, max_iter=max_iter, objective=objective, **options)
