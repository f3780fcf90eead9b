"""Baselines that users pick instead of bSQH for sparse CNNs.

- :func:`magnitude_prune`: global unstructured magnitude pruning (:mod:`torch.nn.utils.prune`) of
  all convolution/linear weights to a target density; the masks stay for fine-tuning.
- :class:`ProxSGD`: SGD with momentum followed by a proximal step on the weights of groups with
  ``prox`` set: ``"l1"`` soft-thresholds at ``lr * strength`` (proximal gradient for
  ``strength * |w|_1``); ``"iht"`` keeps the ``strength`` fraction of largest-magnitude weights over
  all such groups together (iterative hard thresholding at a fixed density).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from proxnets.pmp.regularizers import soft_threshold
from proxnets.pmp.sparsity import SPARSIFIABLE
from proxnets.utils.validation import check_choice, check_number, check_probability

__all__ = ["magnitude_prune", "ProxSGD"]


def magnitude_prune(model: nn.Module, density: float) -> nn.Module:
    """Keep the ``density`` fraction of largest |w| over all conv/linear weights (in place; masks)."""
    density = check_probability("density", density)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, SPARSIFIABLE)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=1.0 - density)
    return model


class ProxSGD(torch.optim.SGD):
    """SGD (momentum) + proximal step: ``prox="l1"`` (strength = L1 weight) or ``"iht"`` (strength = density).

    Groups without a ``prox`` key are plain SGD (e.g. biases).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, prox: str | None = None, strength: float = 0.0):
        if prox is not None:
            check_choice("prox", prox, ["l1", "iht"])
            if prox == "iht":
                check_probability("strength", strength)
            else:
                check_number("strength", strength, low=0.0)
        super().__init__(params, lr=lr, momentum=momentum)
        for group in self.param_groups:
            group.setdefault("prox", prox)
            group.setdefault("strength", strength)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        iht = [g for g in self.param_groups if g["prox"] == "iht"]
        for group in self.param_groups:
            if group["prox"] == "l1":
                for p in group["params"]:
                    p.copy_(soft_threshold(p, group["lr"] * group["strength"]))
        if iht:
            params = [p for g in iht for p in g["params"]]
            flat = torch.cat([p.detach().abs().reshape(-1) for p in params])
            k = int(round(iht[0]["strength"] * flat.numel()))
            if k < flat.numel():
                threshold = torch.kthvalue(flat, flat.numel() - k).values if k > 0 else flat.max()
                for p in params:
                    p.mul_((p.abs() > threshold).to(p.dtype))
        return loss
