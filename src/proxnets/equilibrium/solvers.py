"""Fixed-point solvers of the equilibrium package: the shared core :mod:`proxnets.solvers`.

The solvers, their registry, residual and stopping rules (finiteness, divergence) live in
:mod:`proxnets.solvers`; this module keeps the names users import from ``proxnets.equilibrium``.
``EquilibriumInfo`` is :class:`proxnets.solvers.SolverInfo`.

For OptEq, ``T(z) = prox_f(W^T W z + U x + b)`` is exactly a proximal-gradient step of size 1 on ``G``,
so a zero relative residual is first-order optimality.
"""

from __future__ import annotations

from proxnets import solvers as _core
from proxnets.solvers import *  # noqa: F401,F403  (the names this module has always exported)
from proxnets.solvers import SolverInfo

EquilibriumInfo = SolverInfo  # the name this package has always used

__all__ = ["EquilibriumInfo", *_core.__all__]
