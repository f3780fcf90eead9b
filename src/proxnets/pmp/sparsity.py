"""Sparse models after bSQH: which parameters to sparsify, freezing masks, reports, export.

- :func:`sparsity_param_groups`: weights of convolutions and linear maps in a group with ``rho``,
  everything else (biases, normalization) in a group with ``rho = 0``; named, for diagnostics.
- :func:`freeze_sparsity`: fixes the zero pattern with :mod:`torch.nn.utils.prune` masks, so any
  optimizer can fine-tune the remaining weights while the zeros stay exactly zero.
- :func:`sparsity_report`: remaining parameters and multiply-adds per layer, dense vs sparse.
  A layer's multiply-adds are ``nonzero weights x output positions`` (``H_out W_out`` for a 2-d
  convolution, 1 for a linear map), per example.
- :func:`export_sparse`: makes the masks permanent and returns a plain state dict (zeros exact).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from proxnets.utils.validation import check_number

__all__ = ["SPARSIFIABLE", "weight_density", "sparsity_param_groups", "freeze_sparsity", "sparsity_report", "export_sparse"]

SPARSIFIABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_density(model: nn.Module) -> float:
    """Fraction of nonzero :data:`SPARSIFIABLE` weights (pruning masks applied)."""
    nnz = total = 0
    for m in model.modules():
        if isinstance(m, SPARSIFIABLE):
            nnz += int((m.weight != 0).sum())
            total += m.weight.numel()
    return nnz / total if total else 1.0


def sparsity_param_groups(model: nn.Module, rho: float, **group_options: Any) -> list[dict[str, Any]]:
    """Two named parameter groups: weights of :data:`SPARSIFIABLE` layers (``rho``), the rest (``rho=0``)."""
    check_number("rho", rho, low=0.0)
    sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, SPARSIFIABLE)}
    reg, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (reg if id(p) in sparse_ids else rest).append((name, p))
    groups = [dict(params=[p for _, p in reg], param_names=[n for n, _ in reg], rho=rho, **group_options)]
    if rest:
        groups.append(dict(params=[p for _, p in rest], param_names=[n for n, _ in rest], rho=0.0, **group_options))
    return groups


def freeze_sparsity(model: nn.Module) -> nn.Module:
    """Fix every :data:`SPARSIFIABLE` weight's zero pattern with a pruning mask (in place; returns model)."""
    for m in model.modules():
        if isinstance(m, SPARSIFIABLE):
            weight = m.weight_orig * m.weight_mask if prune.is_pruned(m) and hasattr(m, "weight_mask") else m.weight
            mask = (weight.detach() != 0).to(weight.dtype)
            if hasattr(m, "weight_mask"):
                prune.remove(m, "weight")
            prune.custom_from_mask(m, "weight", mask)
    return model


def export_sparse(model: nn.Module) -> dict[str, torch.Tensor]:
    """Make pruning masks permanent (in place) and return the state dict (exact zeros kept)."""
    for m in model.modules():
        if isinstance(m, SPARSIFIABLE) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sparsity_report(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Per layer: weights, nonzero weights, dense and sparse multiply-adds per example; totals.

    ``input_shape``: one example's shape ``(C, H, W)``; one forward pass finds output sizes.
    """
    outputs: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, SPARSIFIABLE):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: outputs.__setitem__(name, tuple(out.shape))))
    was_training = model.training
    model.eval()
    p0 = next(model.parameters())
    with torch.no_grad():
        model(torch.zeros((1, *input_shape), dtype=p0.dtype, device=p0.device))
    model.train(was_training)
    for h in handles:
        h.remove()
    layers, totals = [], dict(weights=0, nonzero=0, macs_dense=0, macs_sparse=0)
    for name, m in model.named_modules():
        if not isinstance(m, SPARSIFIABLE) or name not in outputs:
            continue
        w = m.weight.detach()
        positions = 1
        if not isinstance(m, nn.Linear):
            for s in outputs[name][2:]:
                positions *= s
        nnz = int((w != 0).sum())
        row = dict(layer=name, weights=w.numel(), nonzero=nnz, density=nnz / w.numel(),
                   macs_dense=w.numel() * positions, macs_sparse=nnz * positions)
        layers.append(row)
        for k in totals:
            totals[k] += row[k]
    totals["density"] = totals["nonzero"] / totals["weights"] if totals["weights"] else 0.0
    return dict(layers=layers, total=totals)
