"""OptEq's operator-norm constraint: a thin user of :mod:`proxnets.constraints`.

``operator_norm_bound(module, "weight", target=0.97)`` registers the one operator-norm constraint
of the project with OptEq's choices,

    W = V * min(1, target / sigma(V))          (rescale="clip")

on the operator ``A_V`` the module applies (the matrix of ``nn.Linear``; for ``nn.Conv2d`` the
convolution with its padding and stride at ``in_shape = (C, H, W)``). Training: ``n_power_iterations``
warm-started iterations and as many from a fresh random vector, the larger kept
(``fresh_restart=True``); evaluation: the frozen vector (``evaluation="frozen"``), so the map is
deterministic. :func:`refresh_operator_norm` runs the power iteration to convergence. These are
estimates (a power iterate is a lower bound of the norm); the rigorous bound of the applied operator
is :func:`proxnets.norm_bounds.norm_bound` (``OperatorNormBound.certified_norm(V)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from proxnets.constraints import OperatorNormConstraint, constrain_operator_norm, module_operator
from proxnets.operators import LinearOperator
from proxnets.utils.validation import check_int, check_number, fail

__all__ = ["OperatorNormBound", "operator_norm_bound", "refresh_operator_norm", "weight_operator"]

# the former class name: the constraint OptEq registers is the shared one
OperatorNormBound = OperatorNormConstraint


def weight_operator(module: nn.Module, weight: torch.Tensor, in_shape: Sequence[int] | None = None) -> LinearOperator:
    """The operator ``module`` applies with ``weight`` (bias excluded); ``in_shape`` for convolutions."""
    return module_operator(module, weight, in_shape)


def operator_norm_bound(
    module: nn.Module,
    name: str = "weight",
    *,
    target: float = 0.97,
    in_shape: Sequence[int] | None = None,
    n_power_iterations: int = 1,
) -> nn.Module:
    """Constrain ``|A_W|_2 <= target`` on ``module.<name>`` in place (clip); returns ``module``.

    ``in_shape`` (C, H, W) is required for ``nn.Conv2d``. Removal: ``parametrize.remove_parametrizations``.
    """
    check_number("target", target, low=0.0, low_inclusive=False)
    check_int("n_power_iterations", n_power_iterations, low=1)
    # the persistent vector starts from the converged singular vector of the initial weight
    return constrain_operator_norm(
        module, in_shape, bound=target, rescale="clip", evaluation="frozen", name=name,
        warm_iterations=3000, warm_tol=1e-12, cheap_iterations=n_power_iterations, exact_iterations=3000, tol=1e-12,
        fresh_restart=True,
    )


def refresh_operator_norm(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Run the power iteration of every norm constraint on ``module.<name>`` to convergence.

    Returns the converged estimate (a lower estimate) of ``|A_V|_2`` of the unconstrained weight ``V``.
    """
    if not parametrize.is_parametrized(module, name):
        fail("module", f"a module with a parametrized {name!r}", type(module).__name__)
    sigma = None
    for p in getattr(module.parametrizations, name):
        if isinstance(p, OperatorNormConstraint):
            with torch.no_grad():
                sigma = p.norm.refresh(getattr(module.parametrizations, name).original)
    if sigma is None:
        fail("module", f"an OperatorNormBound on {name!r}", "none registered")
    return sigma
