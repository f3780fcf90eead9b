"""Fixed-point solvers of the equilibrium package: the shared core :mod:`proxnets.solvers`.

The solvers, their registry, residual and stopping rules (finiteness, divergence) live in
:mod:`proxnets.solvers`; this module keeps the names users import from ``proxnets.equilibrium``.
``EquilibriumInfo`` is :class:`proxnets.solvers.SolverInfo`.

For OptEq, ``T(z) = prox_f(W^T W z + U x + b)`` is exactly a proximal-gradient step of size 1 on ``G``,
so a zero relative residual is first-order optimality.
"""

from __future__ import annotations

from proxnets.solvers import (
    ADJOINT_SOLVERS,
    DIVERGENCE,
    FLOOR,
    SOLVERS,
    STOP_REASONS,
    SolverInfo,
    accelerated,
    anderson,
    check_solver_options,
    conjugate_gradient,
    fixed_point,
    get_solver,
    halpern,
    register_solver,
    relative_residual,
    solve,
    solve_linear,
)

EquilibriumInfo = SolverInfo  # the name this package has always used

__all__ = [
    "EquilibriumInfo",
    "SolverInfo",
    "relative_residual",
    "fixed_point",
    "accelerated",
    "anderson",
    "halpern",
    "conjugate_gradient",
    "solve_linear",
    "SOLVERS",
    "ADJOINT_SOLVERS",
    "STOP_REASONS",
    "FLOOR",
    "DIVERGENCE",
    "register_solver",
    "check_solver_options",
    "get_solver",
    "solve",
]
