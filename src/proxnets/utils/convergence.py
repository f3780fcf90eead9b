"""What every iterative routine returns beside its result.

Routing, equilibrium solvers, the dual solver and Plug-and-Play all return ``(result, info)``
where ``info`` is a dataclass deriving from :class:`IterInfo`. The base fields:

- ``iterations`` (int): iterations performed.
- ``converged`` (bool): the stopping tolerance was reached within the budget.
- ``residuals`` (list[float]): the method's residual after each iteration (its definition is
  written in the subclass docstring).

Subclasses that detect divergence (:class:`proxnets.solvers.SolverInfo`) add ``diverged`` and
``stop_reason``; :func:`handle_nonconvergence` names them in its message.

Non-convergence is never silent: :func:`handle_nonconvergence` applies a policy.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from proxnets.utils.validation import check_choice

__all__ = ["IterInfo", "NonConvergenceWarning", "NonConvergenceError", "handle_nonconvergence", "POLICIES"]

POLICIES = ("ignore", "warn", "raise")


class NonConvergenceWarning(RuntimeWarning):
    """An iterative method stopped at its budget before reaching its tolerance."""


class NonConvergenceError(RuntimeError):
    """Raised instead of the warning when the policy is ``"raise"``."""


@dataclasses.dataclass
class IterInfo:
    iterations: int = 0
    converged: bool = False
    residuals: list[float] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def handle_nonconvergence(info: IterInfo, policy: str, what: str) -> None:
    """Warn or raise (per ``policy``) when ``info.converged`` is false."""
    check_choice("policy", policy, POLICIES)
    if info.converged or policy == "ignore":
        return
    last = info.residuals[-1] if info.residuals else float("nan")
    msg = f"{what} did not converge in {info.iterations} iterations (last residual {last:.3e})"
    reason = getattr(info, "stop_reason", "")
    if getattr(info, "diverged", False):
        msg += f": diverged ({reason})" if reason else ": diverged"
    if policy == "raise":
        raise NonConvergenceError(msg)
    warnings.warn(msg, NonConvergenceWarning, stacklevel=3)
