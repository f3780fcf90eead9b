"""Equilibrium solve with a choice of backward pass.

``equilibrium(T, z0, ...)`` returns ``z* = T(z*)`` with gradients defined by ``backward``:

``implicit``  implicit differentiation. With ``J = dT/dz`` at ``z*`` and an upstream gradient ``v``,
              the gradient with respect to ``z*`` is the solution ``g`` of the adjoint fixed point

                  g = J^T g + v,

              solved with the same solver registry (``backward_solver``, :mod:`proxnets.solvers`),
              then pushed through one application of ``T`` to the parameters and inputs:
              ``dL/dtheta = (dT/dtheta)^T g``. Memory does not grow with the forward iterations.
              The adjoint solve's info (converged, diverged, stop_reason) is stored in the forward
              info as ``info.backward`` when the gradient is computed, and its non-convergence goes
              through the same ``policy``.
``phantom``   the phantom gradient (Geng et al. 2021): ``k`` damped steps
              ``z <- (1 - lam) z + lam T(z)`` from ``z*`` recorded by autograd; cheap and inexact.
``unrolled``  plain iterations ``z <- T(z)`` from ``z0`` all recorded by autograd (exact gradient
              of the truncated iteration; memory grows with the iterations; a reference for tests):
              the shared :func:`proxnets.solvers.fixed_point` run with autograd on.

By default the recorded step is ``T(z*)`` and ``J^T g`` comes from autograd through it. A layer may
instead supply ``attach(z*) -> (z, adjoint)``: ``z`` one recorded application of ``T`` at ``z*`` and
``adjoint(v) -> (g, info)`` its own solver of the adjoint equation (OptEq solves a symmetrized,
convex form of it, see :meth:`proxnets.equilibrium.layers.OptEqBase.attach_implicit`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from proxnets.solvers import ADJOINT_SOLVERS, SolverInfo, check_solver_options, fixed_point, solve
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor

__all__ = ["BACKWARDS", "BackwardConfig", "equilibrium"]

BACKWARDS = ("implicit", "phantom", "unrolled")

Map = Callable[[torch.Tensor], torch.Tensor]


class BackwardConfig:
    """Settings of the backward pass (validated once, at construction).

    ``mode`` in :data:`BACKWARDS`; ``solver``/``tol``/``max_iter``/``options`` for the adjoint solve
    (``implicit``); ``phantom_steps`` and ``phantom_damping`` (``phantom``).
    """

    def __init__(
        self,
        mode: str = "implicit",
        *,
        solver: str = "anderson",
        tol: float = 1e-5,
        max_iter: int = 200,
        options: dict | None = None,
        phantom_steps: int = 5,
        phantom_damping: float = 0.8,
    ):
        self.mode = check_choice("backward", mode, BACKWARDS)
        self.solver = solver
        self.options = check_solver_options(solver, options or {}, ADJOINT_SOLVERS)
        self.tol = check_number("backward_tol", tol, low=0.0, low_inclusive=False)
        self.max_iter = check_int("backward_max_iter", max_iter, low=1)
        self.phantom_steps = check_int("phantom_steps", phantom_steps, low=1)
        self.phantom_damping = check_number("phantom_damping", phantom_damping, low=0.0, high=1.0, low_inclusive=False)


def _needs_grad(z: torch.Tensor) -> bool:
    return z.requires_grad


def _generic_adjoint(T: Map, z_star: torch.Tensor, backward: BackwardConfig):
    """``v -> g`` solving ``g = J^T g + v`` with ``J^T g`` by autograd through ``T`` at ``z*``."""
    if backward.solver in ("accelerated", "conjugate_gradient"):
        # both rest on a symmetric linear part; the generic adjoint J^T is not symmetric
        raise ValueError(
            "backward_solver: expected one of ['anderson', 'fixed_point', 'halpern'] for a map without a "
            f"symmetric adjoint, got {backward.solver!r}"
        )
    z_in = z_star.clone().requires_grad_()
    with torch.enable_grad():
        tz_in = T(z_in)

    def adjoint(v: torch.Tensor):
        def vjp(g: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(tz_in, z_in, g, retain_graph=True)[0]

        return solve(backward.solver, lambda g: vjp(g) + v, v, tol=backward.tol, max_iter=backward.max_iter,
                     **backward.options)

    return adjoint


def equilibrium(
    T: Map,
    z0: torch.Tensor,
    *,
    solver: str = "anderson",
    tol: float = 1e-4,
    max_iter: int = 200,
    solver_options: dict | None = None,
    objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backward: BackwardConfig | None = None,
    attach: Callable[[torch.Tensor], tuple[torch.Tensor, Callable]] | None = None,
    policy: str = "warn",
    what: str = "equilibrium solve",
) -> tuple[torch.Tensor, SolverInfo]:
    """Solve ``z = T(z)`` from ``z0`` and attach the chosen backward pass (module docstring).

    ``attach(z_star)`` (optional) returns the recorded step and the adjoint solver. Non-convergence of the
    forward or adjoint solve goes through ``policy`` (``"ignore" | "warn" | "raise"``).
    """
    check_tensor("z0", z0, ndim=tuple(range(1, 9)), nonempty=True)
    backward = backward or BackwardConfig()
    options = solver_options or {}
    z0 = z0.detach()
    grad_on = torch.is_grad_enabled()
    if backward.mode == "unrolled" and grad_on:
        z, info = fixed_point(T, z0, tol=tol, max_iter=max_iter)  # recorded by autograd
        info.solver = "unrolled"
        handle_nonconvergence(info, policy, what)
        return z, info

    with torch.no_grad():
        z_star, info = solve(solver, T, z0, tol=tol, max_iter=max_iter, objective=objective, **options)
    handle_nonconvergence(info, policy, what)
    if not grad_on:
        return z_star, info

    if backward.mode == "phantom":
        z = z_star
        lam = backward.phantom_damping
        for _ in range(backward.phantom_steps):
            z = (1 - lam) * z + lam * T(z)
        return z, info

    # implicit: one recorded application of T connects z* to parameters and inputs
    if attach is not None:
        z, adjoint = attach(z_star)
    else:
        z = T(z_star)
        adjoint = _generic_adjoint(T, z_star, backward)
    return attach_adjoint_hook(z, adjoint, info, policy, what), info


def attach_adjoint_hook(z: torch.Tensor, adjoint, info, policy: str, what: str) -> torch.Tensor:
    """Register the adjoint solve ``v -> (g, SolverInfo)`` as the gradient hook of the recorded step
    ``z``; its info lands in ``info.backward`` and its non-convergence is handled under ``policy``."""
    if not _needs_grad(z):
        return z

    def hook(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            g, binfo = adjoint(v)
        info.backward = binfo
        handle_nonconvergence(binfo, policy, f"{what} (adjoint)")
        return g

    z.register_hook(hook)
    return z
