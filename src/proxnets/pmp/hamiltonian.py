"""The layerwise maximization of the augmented Hamiltonian (the library's rule).

Layers are time steps ``x_{l+1} = Lambda_l(x_l, u_l)``; the Hamiltonian of layer ``l`` is

    H_l(x_l, p_{l+1}, u) = <p_{l+1}, Lambda_l(x_l, u)> - rho R_l(u),

with the adjoint ``p_{l+1} = -dL/dx_{l+1}`` (back-propagation of minus the loss gradient,
batch-averaged). The augmented Hamiltonian adds ``-eps |u - u_k|^2``.

**Rule implemented (linearized Hamiltonian).** Linearizing ``Lambda_l`` in ``u`` at ``u_k``,
``<p_{l+1}, Lambda_l(x_l, u)> ~ const + <g, u - u_k>`` with ``g = -dL/du_l`` (the chain rule:
``sum_s (dLambda_l/du)^T p_{s,l+1} = -dL/du_l``). Weight by weight the maximization is then

    max_w  g (w - w_k) - rho r(w) - eps (w - w_k)^2
        =  prox_{t r}(z),   z = w_k + g / (2 eps),  t = rho / (2 eps),

solved in closed form by the regularizer (:class:`~proxnets.pmp.regularizers.SparseRegularizer`).
With the pure L0 cost this is hard thresholding of a gradient step of length ``1/(2 eps)`` at the
level ``sqrt(rho beta / eps)``; the accept/reject test of the optimizer makes it safe.

Rules are swappable: anything with the signature of :class:`LinearizedHamiltonianRule.__call__`.
"""

from __future__ import annotations

import torch

from proxnets.pmp.regularizers import Regularizer, SparseRegularizer
from proxnets.utils.validation import check_number, check_tensor, fail

__all__ = ["LinearizedHamiltonianRule", "augmented_hamiltonian_1d"]


def augmented_hamiltonian_1d(
    w: torch.Tensor, w_k: torch.Tensor, g: torch.Tensor, eps: float, rho: float, reg: Regularizer
) -> torch.Tensor:
    """Per-weight linearized augmented Hamiltonian ``g (w - w_k) - rho r(w) - eps (w - w_k)^2``.

    Elementwise over broadcast ``w, w_k, g``; ``r`` is evaluated weight by weight. Used by the
    tests as the brute-force objective.
    """
    for name, t in (("w", w), ("w_k", w_k), ("g", g)):
        check_tensor(name, t)
    check_number("eps", eps, low=0.0, low_inclusive=False)
    check_number("rho", rho, low=0.0)
    try:
        w, w_k, g = torch.broadcast_tensors(w, w_k, g)
    except RuntimeError:
        fail("w", f"a shape broadcasting with w_k {tuple(w_k.shape)} and g {tuple(g.shape)}", f"shape {tuple(w.shape)}")
    r = torch.stack([reg.value(v.reshape(1)) for v in w.reshape(-1)]).reshape(w.shape) if w.numel() else w
    return g * (w - w_k) - rho * r - eps * (w - w_k) ** 2


class LinearizedHamiltonianRule:
    """``u_new = argmax_u <-dL/du, u - u_k> - rho R(u) - eps |u - u_k|^2`` (closed form, exact zeros).

    ``__call__(w_k, grad, eps, rho, reg)`` returns the new weights (a new tensor); ``eps`` is a
    positive float or a tensor broadcasting against ``w_k``.
    """

    name = "linearized"

    def __call__(
        self, w_k: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor, rho: float, reg: Regularizer
    ) -> torch.Tensor:
        # the maximizer without regularizer, w_k - grad / (2 eps) (one fused pass for a float eps)
        z = torch.add(w_k, grad, alpha=-0.5 / eps) if isinstance(eps, float) else w_k - grad / (2.0 * eps)
        if rho == 0.0:
            return z
        return reg.prox(z, rho / (2.0 * eps))

    def into(
        self, out: torch.Tensor, w_k: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor, rho: float,
        reg: Regularizer, z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``__call__``'s maximizer written into ``out`` (the parameter: no new tensor, no copy) and returned,
        bit for bit the same values. ``z``: the point ``w_k - grad / (2 eps)`` when the caller has it already
        (the target-density price search computes it with the same operation); ``out`` must not alias
        ``w_k`` or ``grad``. A subclass that overrides ``__call__`` (e.g. the suite's broken ascent rule) is
        called as it is: its values are copied into ``out``."""
        if not isinstance(eps, float) or type(self).__call__ is not LinearizedHamiltonianRule.__call__:
            return out.copy_(self(w_k, grad, eps, rho, reg))
        if z is None:
            z = torch.add(w_k, grad, alpha=-0.5 / eps, out=out)  # the same fused pass as __call__'s
        if rho == 0.0:
            return z if z is out else out.copy_(z)
        t = rho / (2.0 * eps)
        if isinstance(reg, SparseRegularizer):
            return reg.prox(z, t, out=out)
        return out.copy_(reg.prox(z, t))
