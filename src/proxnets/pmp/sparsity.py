"""Sparse models after bSQH: which parameters to sparsify, freezing masks, reports, export.

- :func:`sparsity_param_groups`: weights of convolutions and linear maps in a group with ``rho``,
  everything else (biases, normalization) in a group with ``rho = 0``; named, for diagnostics.
- :func:`mac_param_groups`: one group per layer whose L0 price per weight is its output positions,
  so that ``R`` = the fraction of multiply-adds kept (structured sparsity that buys inference time).
- :func:`freeze_sparsity`: fixes the zero pattern with :mod:`torch.nn.utils.prune` masks, so any
  optimizer can fine-tune the remaining weights while the zeros stay exactly zero.
- :func:`sparsity_report`: remaining parameters and multiply-adds per layer, dense vs sparse.
  A layer's multiply-adds are ``nonzero weights x output positions`` (``H_out W_out`` for a 2-d
  convolution, 1 for a linear map), per example.
- :func:`export_sparse`: makes the masks permanent and returns a plain state dict (zeros exact).
- :func:`remove_zero_filters`: a LeNet-5 whose zero filters/rows are removed, with the matching
  input channels of the next layer: a dense, smaller model computing the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from proxnets.utils.validation import check_number

__all__ = ["SPARSIFIABLE", "weight_density", "sparsity_param_groups", "freeze_sparsity", "sparsity_report", "export_sparse",
           "remove_zero_filters", "mac_param_groups"]

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


def mac_param_groups(model: nn.Module, rho: float, input_shape: tuple[int, ...], structure: str = "filter",
                     **regularizer_options: Any) -> list[dict[str, Any]]:
    """Parameter groups pricing a weight by the multiply-adds it costs: ``R`` = kept MACs / all MACs.

    Layer ``l`` (``P_l`` output positions per example, ``H_out W_out`` or 1) gets
    ``SparseRegularizer(beta = P_l N / M, normalize="group", count=N)`` (``N`` weights and ``M``
    multiply-adds in all), so a weight of layer ``l`` costs ``P_l / M`` and ``R`` is the fraction of
    the dense multiply-adds still done. With ``structure="filter"`` a kept filter costs all its MACs;
    ``target_density`` is then a target on that fraction. The other parameters: one group at rho 0.
    """
    from proxnets.pmp.regularizers import SparseRegularizer

    check_number("rho", rho, low=0.0)
    layers = {r["layer"]: r for r in sparsity_report(model, input_shape)["layers"]}
    n = sum(r["weights"] for r in layers.values())
    macs = sum(r["macs_dense"] for r in layers.values())
    groups, used = [], set()
    for name, m in model.named_modules():
        if name in layers and m.weight.requires_grad:
            positions = layers[name]["macs_dense"] // layers[name]["weights"]
            reg = SparseRegularizer(**{"lam2": 1e-3, "bound": 1.0, **regularizer_options, "beta": positions * n / macs,
                                       "normalize": "group", "count": n, "structure": structure})
            groups.append(dict(params=[m.weight], param_names=[f"{name}.weight"], rho=rho, regularizer=reg))
            used.add(id(m.weight))
    rest = [(k, p) for k, p in model.named_parameters() if p.requires_grad and id(p) not in used]
    if rest:
        groups.append(dict(params=[p for _, p in rest], param_names=[k for k, _ in rest], rho=0.0))
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
    if not (isinstance(input_shape, (tuple, list)) and input_shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)):
        raise ValueError(f"input_shape: expected a non-empty tuple of positive integers, got {input_shape!r}")
    outputs: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, SPARSIFIABLE):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: outputs.__setitem__(name, tuple(out.shape))))
    was_training = model.training
    model.eval()
    p0 = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=p0.dtype, device=p0.device))
    except (ValueError, RuntimeError) as e:  # the model's own message names its argument "x", not ours
        raise ValueError(f"input_shape: expected the shape of one input of the model, got {tuple(input_shape)} ({e})") from e
    finally:
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


def remove_zero_filters(model: nn.Module, fold_constants: bool = True) -> nn.Module:
    """A new, smaller :class:`~proxnets.pmp.models.LeNet5` (or subclass) with the same outputs.

    A filter (conv output channel, linear output row) whose weights are all zero outputs the
    constant ``b`` (its bias) at every position; after the activation ``a`` and max-pooling, the
    constant ``v = a(b)``. The next layer ``y = W x + b'`` then receives ``v`` on that input
    channel, which adds ``v sum_{kernel} W[:, c]`` at every output position when that layer has no
    padding (conv2, and every linear layer: for fc1 the ``h2 w2`` flattened features of a conv2
    channel). So the channel is removed and that sum folded into ``b'``; with padding (not in
    LeNet-5) only channels with ``v = 0`` would be removable. The layers are processed in order,
    so a filter whose only nonzero weights read removed channels becomes zero and is removed too.
    The last layer keeps all its outputs; a layer keeps at least one filter. The result equals the
    input model up to floating-point rounding (the folded sums are added in another order).
    ``fold_constants=False`` drops the constants instead (wrong unless every removed channel
    outputs 0: the suite's broken variant ``no-bias-fold``).
    """
    from proxnets.pmp.models import LeNet5

    if not isinstance(model, LeNet5):
        raise TypeError(f"model: expected a LeNet5 (conv1, conv2, fc1, fc2, fc3), got {type(model).__name__}")
    if prune.is_pruned(model):
        raise ValueError("model: expected no pruning masks (call export_sparse first), got a pruned model")
    if model.conv2.padding not in ((0, 0), 0, "valid"):
        raise ValueError(f"model.conv2: expected padding 0, got {model.conv2.padding}")
    names = ("conv1", "conv2", "fc1", "fc2", "fc3")
    with torch.no_grad():
        w = {n: getattr(model, n).weight.detach().clone() for n in names}
        b = {n: getattr(model, n).bias.detach().clone() for n in names}
        positions = w["fc1"].shape[1] // w["conv2"].shape[0]  # h2 w2 flattened features per conv2 channel
        for cur, nxt in zip(names, names[1:]):
            alive = _groups_alive(w[cur])
            if not alive.any():
                alive[0] = True  # at least one filter (widths of 0 are not layers)
            dead = ~alive
            v = model.act(b[cur][dead])  # the dead channels' constant output after activation (and pooling)
            if not fold_constants:
                v = torch.zeros_like(v)
            wn = w[nxt]
            if nxt == "fc1":  # flattened (channel, h2, w2): channel c is the block c*positions ...
                wn = wn.reshape(wn.shape[0], -1, positions)
                b[nxt] += (wn[:, dead].sum(2) * v).sum(1)
                w[nxt] = wn[:, alive].reshape(wn.shape[0], -1)
            else:
                contrib = wn[:, dead]  # (out, dead) or (out, dead, kh, kw)
                if contrib.dim() > 2:
                    contrib = contrib.sum(dim=tuple(range(2, contrib.dim())))
                b[nxt] += (contrib * v).sum(1)
                w[nxt] = wn[:, alive]
            w[cur], b[cur] = w[cur][alive], b[cur][alive]
        widths = (w["conv1"].shape[0], w["conv2"].shape[0], w["fc1"].shape[0], w["fc2"].shape[0])
        out = LeNet5(model.input_shape, w["fc3"].shape[0], widths=widths).to(w["fc3"].dtype).to(w["fc3"].device)
        for n in names:
            getattr(out, n).weight.copy_(w[n])
            getattr(out, n).bias.copy_(b[n])
    out.train(model.training)
    return out


def _groups_alive(w: torch.Tensor) -> torch.Tensor:
    return (w.reshape(w.shape[0], -1) != 0).any(1)
