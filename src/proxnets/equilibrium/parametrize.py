"""A parametrization keeping the operator norm of a layer's weight below a target.

``operator_norm_bound(module, "weight", target=0.97)`` registers, through
``torch.nn.utils.parametrize``, the map

    W = V * min(1, target / sigma(V)),       sigma(V) = |A_V|_2 estimated by power iteration,

where ``A_V`` is the linear operator the module applies with weight ``V``: the matrix for
``nn.Linear``; for ``nn.Conv2d`` the convolution *with its padding and stride at the input size*
``in_shape = (C, H, W)`` (its norm differs from that of the reshaped kernel). The power-iteration
vector is a persistent buffer (:class:`proxnets.operators.OperatorNormEstimator`): in training mode
each access runs ``n_power_iterations`` warm-started iterations and as many from a fresh random
vector, and keeps the larger estimate; in eval mode the vector is frozen,
so the map is deterministic. ``sigma`` is differentiable in ``V`` (vector detached), as in spectral
normalization. :func:`refresh_operator_norm` runs the power iteration to convergence (do it before
certifying a bound). Since power iteration approaches ``|A_V|_2`` from below, the bound holds up to
the estimator's accuracy; the tests compare with the dense matrix of the operator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from proxnets.operators import LinearOperator, OperatorNormEstimator, conv2d_operator, linear_operator, power_iteration
from proxnets.utils.validation import check_int, check_number, fail

__all__ = ["OperatorNormBound", "operator_norm_bound", "refresh_operator_norm", "weight_operator"]


def _square(name: str, value) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    fail(name, "an int or a square pair", value)


def _operator_spec(module: nn.Module) -> dict:
    """The hyper-parameters that define the operator (no reference to the module itself)."""
    if isinstance(module, nn.Linear):
        return {"kind": "linear"}
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            fail("padding_mode", "'zeros' (the adjoint is a transposed convolution)", module.padding_mode)
        return {
            "kind": "conv2d",
            "stride": _square("stride", module.stride),
            "padding": _square("padding", module.padding),
            "dilation": _square("dilation", module.dilation),
            "groups": module.groups,
        }
    fail("module", "an nn.Linear or nn.Conv2d", type(module).__name__, TypeError)


def weight_operator(module: nn.Module, weight: torch.Tensor, in_shape: Sequence[int] | None = None) -> LinearOperator:
    """The operator ``module`` applies with ``weight`` (bias excluded); ``in_shape`` for convolutions."""
    return _build(_operator_spec(module), weight, in_shape)


def _build(spec: dict, weight: torch.Tensor, in_shape: Sequence[int] | None) -> LinearOperator:
    if spec["kind"] == "linear":
        return linear_operator(weight)
    if in_shape is None:
        fail("in_shape", "the input size (C, H, W) of the convolution", None)
    opts = {k: v for k, v in spec.items() if k != "kind"}
    return conv2d_operator(weight, in_shape, **opts)


class OperatorNormBound(nn.Module):
    """``V -> V * min(1, target / |A_V|_2)`` (see module docstring)."""

    def __init__(self, module: nn.Module, target: float, in_shape: Sequence[int] | None, n_power_iterations: int = 1):
        super().__init__()
        self.target = check_number("target", target, low=0.0, low_inclusive=False)
        check_int("n_power_iterations", n_power_iterations, low=1)
        if isinstance(module, nn.Linear):
            shape = (module.in_features,)
        elif isinstance(module, nn.Conv2d):
            if in_shape is None or len(in_shape) != 3 or int(in_shape[0]) != module.in_channels:
                fail("in_shape", f"(C={module.in_channels}, H, W), the convolution's input size", in_shape)
            shape = tuple(int(s) for s in in_shape)
        else:
            fail("module", "an nn.Linear or nn.Conv2d", type(module).__name__, TypeError)
        self.in_shape = shape
        self.spec = _operator_spec(module)
        self._generator = torch.Generator().manual_seed(0)
        self.estimator = OperatorNormEstimator(shape, cheap_iterations=n_power_iterations, exact_iterations=3000, tol=1e-12)
        with torch.no_grad():
            self.estimator.v.copy_(self.estimator.v.to(module.weight.dtype))

    def _operator(self, weight: torch.Tensor) -> LinearOperator:
        return _build(self.spec, weight, self.in_shape)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable estimate of ``|A_V|_2`` (updates the vector in training mode)."""
        op = self._operator(weight)
        if not self.training:
            return op.forward(self.estimator.v.to(weight.dtype)).norm()
        sigma = self.estimator(op, mode="cheap")
        # a fresh start as well: the top singular values of a convolution are clustered and
        # training shrinks W along the persistent vector while growing other directions, which
        # a few warm-started iterations alone do not catch (measured |W|_2 up to 1.2 x target)
        _, v, _ = power_iteration(op, None, iterations=self.estimator.cheap_iterations, generator=self._generator)
        sigma_fresh = op.forward(v).norm()
        if sigma_fresh > sigma:
            with torch.no_grad():
                self.estimator.v.copy_(v.reshape(self.in_shape))
            return sigma_fresh
        return sigma

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(weight)
        return weight * (self.target / torch.clamp(sigma, min=self.target))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # any V with |A_V|_2 <= target is its own preimage; larger ones are scaled by forward
        return weight


def operator_norm_bound(
    module: nn.Module,
    name: str = "weight",
    *,
    target: float = 0.97,
    in_shape: Sequence[int] | None = None,
    n_power_iterations: int = 1,
) -> nn.Module:
    """Constrain ``|A_W|_2 <= target`` on ``module.<name>`` in place; returns ``module``.

    ``in_shape`` (C, H, W) is required for ``nn.Conv2d``. Removal: ``parametrize.remove_parametrizations``.
    """
    if not hasattr(module, name) or not isinstance(getattr(module, name), torch.Tensor):
        fail("name", f"the name of a tensor attribute of {type(module).__name__}", name)
    bound = OperatorNormBound(module, target, in_shape, n_power_iterations)
    # the persistent vector starts from the converged singular vector of the initial weight
    bound.estimator(bound._operator(getattr(module, name).detach()), mode="exact")
    parametrize.register_parametrization(module, name, bound)
    return module


def refresh_operator_norm(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Run the power iteration of every ``OperatorNormBound`` on ``module.<name>`` to convergence.

    Returns the exact-mode estimate of ``|A_V|_2`` of the unconstrained weight ``V``.
    """
    if not parametrize.is_parametrized(module, name):
        fail("module", f"a module with a parametrized {name!r}", type(module).__name__)
    sigma = None
    for p in getattr(module.parametrizations, name):
        if isinstance(p, OperatorNormBound):
            with torch.no_grad():
                sigma = p.estimator(p._operator(getattr(module.parametrizations, name).original), mode="exact")
    if sigma is None:
        fail("module", f"an OperatorNormBound on {name!r}", "none registered")
    return sigma
