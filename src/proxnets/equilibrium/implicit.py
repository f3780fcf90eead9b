"""Equilibrium solve with a choice of backward pass.

``equilibrium(T, z0, ...)`` returns ``z* = T(z*)`` with gradients defined by ``backward``:

``implicit``  implicit differentiation. With ``J = dT/dz`` at ``z*`` and an upstream gradient ``v``,
              the gradient with respect to ``z*`` is the solution ``g`` of the adjoint fixed point

                  g = J^T g + v,

              solved with the same solver registry (``backward_solver``), then pushed through one
              application of ``T`` to the parameters and inputs: ``dL/dtheta = (dT/dtheta)^T g``.
              Memory does not grow with the forward iterations.
``phantom``   the phantom gradient (Geng et al. 2021): ``k`` damped steps
              ``z <- (1 - lam) z + lam T(z)`` from ``z*`` recorded by autograd; cheap and inexact.
``unrolled``  plain iterations ``z <- T(z)`` from ``z0`` all recorded by autograd (exact gradient
              of the truncated iteration; memory grows with the iterations; a reference for tests).

``adjoint_vjp`` may supply ``g -> J^T g`` in closed form (OptEq: ``W^T W (prox_f'(v) * g)``); by
default autograd computes it through one recorded ``T(z*)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from proxnets.equilibrium.solvers import EquilibriumInfo, check_solver_options, relative_residual, solve
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.utils.validation import check_choice, check_int, check_number

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
        if solver == "accelerated":
            # FISTA's guarantees rest on the objective of the forward problem; the adjoint system
            # is linear but not symmetric, so only generic fixed-point solvers apply
            raise ValueError("backward_solver: expected one of ['anderson', 'fixed_point', 'halpern'], got 'accelerated'")
        self.solver = solver
        self.options = check_solver_options(solver, options or {})
        self.tol = check_number("backward_tol", tol, low=0.0, low_inclusive=False)
        self.max_iter = check_int("backward_max_iter", max_iter, low=1)
        self.phantom_steps = check_int("phantom_steps", phantom_steps, low=1)
        self.phantom_damping = check_number("phantom_damping", phantom_damping, low=0.0, high=1.0, low_inclusive=False)


def _needs_grad(z: torch.Tensor) -> bool:
    return z.requires_grad


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
    adjoint_vjp: Callable[[torch.Tensor], Map] | None = None,
    policy: str = "warn",
    what: str = "equilibrium solve",
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Solve ``z = T(z)`` from ``z0`` and attach the chosen backward pass (module docstring).

    ``adjoint_vjp(z_star)`` returns ``g -> J^T g`` at ``z*`` (optional). Non-convergence of the
    forward or adjoint solve goes through ``policy`` (``"ignore" | "warn" | "raise"``).
    """
    backward = backward or BackwardConfig()
    options = solver_options or {}
    z0 = z0.detach()
    grad_on = torch.is_grad_enabled()
    if backward.mode == "unrolled" and grad_on:
        info = EquilibriumInfo(solver="unrolled", tol=tol)
        z = z0
        for _ in range(max_iter):
            tz = T(z)
            r = relative_residual(z.detach(), tz.detach())
            info.iterations += 1
            info.residuals.append(float(r.max()))
            info.final_residual = r.tolist()
            z = tz
            if info.residuals[-1] <= tol:
                info.converged = True
                break
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
    z = T(z_star)
    if not _needs_grad(z):
        return z, info
    if adjoint_vjp is not None:
        vjp = adjoint_vjp(z_star)
    else:
        z_in = z_star.clone().requires_grad_()
        tz_in = T(z_in)

        def vjp(g: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(tz_in, z_in, g, retain_graph=True)[0]

    def hook(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            g, binfo = solve(
                backward.solver,
                lambda g: vjp(g) + v,
                v,
                tol=backward.tol,
                max_iter=backward.max_iter,
                **backward.options,
            )
        info.backward = binfo
        handle_nonconvergence(binfo, policy, f"{what} (adjoint)")
        return g

    z.register_hook(hook)
    return z, info
