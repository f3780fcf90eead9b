"""Baselines that users pick instead of bSQH for sparse CNNs.

- :func:`magnitude_prune`: global unstructured magnitude pruning (:mod:`torch.nn.utils.prune`) of
  all convolution/linear weights to a target density; the masks stay for fine-tuning.
- :class:`ProxSGD`: SGD with momentum followed by a proximal step on the weights of groups with
  ``prox`` set: ``"l1"`` soft-thresholds at ``lr * strength`` (proximal gradient for
  ``strength * |w|_1``); ``"iht"`` keeps the ``strength`` fraction of largest-magnitude weights over
  all such groups together (iterative hard thresholding at a fixed density).
- :func:`filter_prune`: structured magnitude pruning (whole filters by their L1/L2 norm) to a target
  fraction of multiply-adds, the baseline of the filter-level L0.
- :func:`strength_search`: the L1 strength at which a training run reaches a target density
  (bisection in log strength, a fixed number of probes), for "L1 then prune" at equal density.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from proxnets.pmp.regularizers import soft_threshold
from proxnets.pmp.sparsity import SPARSIFIABLE, sparsity_report
from proxnets.utils.validation import check_choice, check_int, check_number, check_probability, fail

__all__ = ["magnitude_prune", "filter_prune", "ProxSGD", "strength_search"]


def magnitude_prune(model: nn.Module, density: float) -> nn.Module:
    """Keep the ``density`` fraction of largest |w| over all conv/linear weights (in place; masks)."""
    density = check_probability("density", density)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, SPARSIFIABLE)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=1.0 - density)
    return model


def strength_search(density_at: Callable[[float], float], target: float, bracket: tuple[float, float],
                    probes: int, rtol: float) -> dict:
    """The regularization strength whose training run lands at density ``target`` (to ``rtol`` above it).

    ``density_at(strength)`` trains and returns the density reached (the fraction of nonzero weights of the
    training run: no test or validation data). The density is taken as non-increasing in the strength.
    Bisection in log strength inside ``bracket = (low, high)``: each probe is the geometric midpoint of the
    current bracket; a density above ``target * (1 + rtol)`` moves the lower end up, one below ``target``
    the upper end down, one in the band ``[target, target * (1 + rtol)]`` ends the search. At most
    ``probes`` calls of ``density_at``, so the bracket shrinks to ``(log10 high - log10 low) / 2**probes``
    decades. Pick: the probe in the band; else the sparsest probe at or above ``target`` (pruning then
    removes the fewest surviving weights); else the densest probe (all landed below ``target``).
    Returns ``dict(strength, density, within, probes=[(strength, density), ...])``; ``within`` says whether
    the picked probe's measured density lies in the band (never set otherwise).
    """
    target = check_number("target", target, low=0.0, high=1.0, low_inclusive=False)
    if (not isinstance(bracket, (tuple, list)) or len(bracket) != 2
            or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bracket)
            or not 0.0 < bracket[0] < bracket[1]):
        fail("bracket", "(low, high) with 0 < low < high", bracket)
    probes = check_int("probes", probes, low=1)
    rtol = check_number("rtol", rtol, low=0.0)
    lo, hi = math.log(bracket[0]), math.log(bracket[1])
    upper = target * (1.0 + rtol)
    seen: list[tuple[float, float]] = []
    for _ in range(probes):
        strength = math.exp((lo + hi) / 2)
        density = float(density_at(strength))
        if not math.isfinite(density):
            fail("density_at", f"a finite density at strength {strength:g}", density)
        seen.append((strength, density))
        if target <= density <= upper:
            break
        if density > upper:
            lo = math.log(strength)
        else:
            hi = math.log(strength)
    above = [p for p in seen if p[1] >= target]
    strength, density = min(above, key=lambda p: p[1]) if above else max(seen, key=lambda p: p[1])
    return dict(strength=strength, density=density, within=target <= density <= upper, probes=seen)


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


def filter_prune(model: nn.Module, mac_fraction: float, input_shape: tuple[int, ...], norm: str = "l2",
                 allocation: str = "uniform") -> nn.Module:
    """Structured magnitude pruning: zero whole filters until the kept multiply-adds are ``mac_fraction``.

    A filter (conv output channel, linear output row) of every :data:`SPARSIFIABLE` layer but the
    last (the classifier keeps its outputs) is scored by its size-normalized norm
    ``s_o = ||w_o||_p / n_o^(1/p)`` (``p`` = 1 for ``norm="l1"``, 2 for ``"l2"``; ``n_o`` its weight
    count), so that filters of different layers compare (Li et al. 2017 prune by the L1 norm within a
    layer). Removal order: ``allocation="uniform"`` interleaves the layers by the within-layer rank
    ``rank / n_filters`` (every layer loses about the same fraction, as in Li et al.); ``"mac"``
    sorts all filters by ``s_o / P_l`` (``P_l`` the layer's output positions: norm per multiply-add
    saved, so filters that cost compute go first, as bSQH's MAC price does). Walking that order, a filter is removed when the kept MACs (counted as
    :func:`~proxnets.pmp.sparsity.sparsity_report` does: nonzero weights x output positions) stay at
    or above ``mac_fraction`` of the dense MACs, so the result is at most one cheapest filter (an fc2
    row, 0.03% of LeNet-5's MACs) above the target. A layer keeps at least one filter. In place, with
    :mod:`torch.nn.utils.prune` masks (fine-tuning keeps the zeros); returns ``model``.
    """
    mac_fraction = check_probability("mac_fraction", mac_fraction)
    check_choice("norm", norm, ["l1", "l2"])
    check_choice("allocation", allocation, ["uniform", "mac"])
    p = 1 if norm == "l1" else 2
    rows = {r["layer"]: r for r in sparsity_report(model, input_shape)["layers"]}
    mods = [(n, m) for n, m in model.named_modules() if n in rows][:-1]  # the classifier keeps its outputs
    dense = sum(r["macs_dense"] for r in rows.values())
    kept = sum(r["macs_sparse"] for r in rows.values())
    order = []  # (key, layer index, filter, MACs of the filter's nonzero weights)
    for li, (name, m) in enumerate(mods):
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        positions = rows[name]["macs_dense"] // rows[name]["weights"]
        score = w.abs().pow(p).mean(1).pow(1.0 / p)
        rank = torch.argsort(score)  # ties: a stable order by index
        for r, o in enumerate(rank.tolist()):
            key = (r / len(rank), float(score[o])) if allocation == "uniform" else (float(score[o]) / positions, r)
            order.append((key, li, o, int((w[o] != 0).sum()) * positions))
    masks = [torch.ones(m.weight.shape[0], dtype=torch.bool) for _, m in mods]
    target = mac_fraction * dense
    for _, li, o, cost in sorted(order, key=lambda t: t[0]):
        if kept - cost >= target and masks[li].sum() > 1:
            masks[li][o] = False
            kept -= cost
    for (_, m), keep in zip(mods, masks):
        shape = (-1,) + (1,) * (m.weight.dim() - 1)
        mask = keep.to(m.weight.device, m.weight.dtype).reshape(shape).expand_as(m.weight).contiguous()
        if hasattr(m, "weight_mask"):
            mask = mask * m.weight_mask
            prune.remove(m, "weight")
        prune.custom_from_mask(m, "weight", mask)
    return model
