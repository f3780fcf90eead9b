"""The seed's layer Hamiltonian: the map **and** its activation/pooling (``layer="map+activation"``).

In the seed a layer is ``Lambda_l(x, u) = post_l(map_l(x, u))``: the convolution or linear map
followed by its activation and optional pooling. Its augmented Hamiltonian

    H_eps,l(v) = <p_{l+1}, Lambda_l(x_l, v)> - rho R_l(v) - eps |v - u_k|^2

(``p_{l+1} = -dL/dx_{l+1}``, the adjoint *after* the activation/pooling, batch-averaged) is then
nonlinear in the weights ``v``. :class:`LayerTape` records ``x_l`` and ``p_{l+1}`` during the
ordinary forward/backward sweep; :func:`maximize_layer` maximizes ``H_eps,l`` by a few cheap
layer-local steps, each the L0 closed form of the linearized Hamiltonian at the current iterate,

    v_{j+1} = prox_{t r}(u_k + grad_v h(v_j) / (2 eps)),   h(v) = <p_{l+1}, Lambda_l(x_l, v)>,

(the first step, at ``v_0 = u_k``, is exactly the linearized rule of :mod:`.hamiltonian`), with
the authors' safeguard: the *true* ``H_eps,l`` of a candidate is computed, and when it does not
exceed that of ``v_j`` the candidate is replaced by convex combinations ``lam^2 v + (1 - lam^2) v_j``,
``lam = 1/2, 1/4, ...``; when none improves, the iteration stops at ``v_j``. Hence
``H_eps,l(result) >= H_eps,l(u_k)`` always (tested; without the safeguard it fails).

How layers are found: every call of a leaf module during the recorded forward pass is taped. A
layer is one call of a module with parameters followed by the parameter-free leaf modules that are
applied *directly* to its output, in a chain (``ReLU``, ``MaxPool2d``, ``Flatten``, ...). A
functional op in between (``torch.relu(conv(x))``) ends the chain: that layer is then the map alone.
Post modules must be deterministic (no dropout in train mode) and not in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from proxnets.pmp.hamiltonian import LinearizedHamiltonianRule

__all__ = ["LayerCall", "LayerTape", "LayerParam", "maximize_layer", "augmented_layer_hamiltonian"]


@dataclasses.dataclass
class LayerCall:
    """One layer of the last recorded sweep: the map ``module`` on input ``x``, then ``post``; ``p`` the adjoint."""

    module: nn.Module
    x: torch.Tensor
    post: list[nn.Module]
    out: torch.Tensor | None = None  # output of the chain (the layer's x_{l+1}), grad-hooked
    p: torch.Tensor | None = None  # -dL/d out


class LayerTape:
    """Tapes the layers ``(module, x_l, post_l, p_{l+1})`` of the forward/backward sweeps while ``enabled``."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.enabled = False
        self.calls: list[LayerCall] = []
        self._handles = []
        for m in model.modules():
            if next(m.children(), None) is None:  # leaf module
                self._handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not self.enabled or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        owns = any(True for _ in module.parameters(recurse=False))
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if owns:
            if x is None or len(inputs) != 1:
                return
            self.calls.append(LayerCall(module, x.detach(), []))
        elif self.calls and x is not None and self.calls[-1].out is not None and x is self.calls[-1].out:
            self.calls[-1].post.append(module)  # applied directly to the chain's output: same layer
        else:
            return
        call = self.calls[-1]
        call.out = output
        if output.requires_grad:
            output.register_hook(self._grad_hook(call, output))

    @staticmethod
    def _grad_hook(call: LayerCall, output: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            if call.out is output:  # only the end of the chain carries the layer's adjoint
                call.p = -grad.detach()

        return hook

    def clear(self) -> None:
        self.calls = []

    def layers(self) -> list[LayerCall]:
        """The taped layers with their adjoints (a call whose module ran twice keeps both)."""
        return [c for c in self.calls if c.p is not None]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclasses.dataclass
class LayerParam:
    """One parameter of a layer as the maximization sees it (``w_k``, ``eps`` already divided by lr)."""

    name: str  # the parameter's attribute name on its module ("weight", "bias")
    w_k: torch.Tensor
    grad: torch.Tensor  # dL/dw at w_k (from the global sweep)
    eps: float
    rho: float
    reg: Any


def _smooth(call: LayerCall, values: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor]) -> torch.Tensor:
    """``h(v) = <p, post(map(x, v))>`` (sum over the batch; ``p`` carries the 1/|B| of the loss)."""
    from torch.func import functional_call  # imported here: torch.func pulls in functorch (seconds)

    out = functional_call(call.module, {**fixed, **values}, (call.x,))
    for m in call.post:
        out = m(out)
    return (call.p * out).sum()


def _penalty(params: list[LayerParam], values: list[torch.Tensor]) -> float:
    total = 0.0
    for lp, v in zip(params, values):
        if lp.rho:
            total += lp.rho * float(lp.reg.value(v.detach()))
        d = v.detach() - lp.w_k
        total += lp.eps * float((d * d).sum())
    return total


def augmented_layer_hamiltonian(call: LayerCall, params: list[LayerParam], values: list[torch.Tensor]) -> float:
    """The true ``H_eps,l(v) = h(v) - sum rho R(v) - sum eps |v - w_k|^2`` of one layer (float64 sum)."""
    fixed = {n: p.detach() for n, p in call.module.named_parameters(recurse=False)}
    with torch.no_grad():
        h = float(_smooth(call, {lp.name: v for lp, v in zip(params, values)}, fixed))
    return h - _penalty(params, values)


def maximize_layer(call: LayerCall, params: list[LayerParam], steps: int = 2, backtracks: int = 2,
                   safeguard: bool = True, rule: Any = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Approximately maximize one layer's augmented Hamiltonian (see the module docstring).

    Returns the new values of ``params`` and ``dict(H_start, H_end, steps, backtracks, exact)``;
    a layer without activation/pooling (``post`` empty) has a linear ``h``: the closed form is then
    the exact maximizer and is returned without evaluations (``exact=True``, ``H`` not computed). With
    ``safeguard`` every accepted iterate strictly increases the true ``H_eps,l``; without it every
    candidate is taken (an ablation: the tests show ``H_eps,l`` can then decrease).
    """
    rule = LinearizedHamiltonianRule() if rule is None else rule
    fixed = {n: p.detach() for n, p in call.module.named_parameters(recurse=False)}
    names = [lp.name for lp in params]

    def evaluate(values: list[torch.Tensor], need_grad: bool) -> tuple[float, list[torch.Tensor] | None]:
        if not need_grad:
            with torch.no_grad():
                h = _smooth(call, dict(zip(names, values)), fixed)
            return float(h) - _penalty(params, values), None
        leaves = [v.detach().requires_grad_(True) for v in values]
        with torch.enable_grad():
            h = _smooth(call, dict(zip(names, leaves)), fixed)
            grads = torch.autograd.grad(h, leaves, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(values, grads)]
        return float(h.detach()) - _penalty(params, values), grads

    v = [lp.w_k for lp in params]
    if not call.post:
        # the map alone: h is linear in v and the closed form is the exact maximizer (no search)
        cand = [rule(lp.w_k, lp.grad, lp.eps, lp.rho, lp.reg) for lp in params]
        return cand, dict(H_start=math.nan, H_end=math.nan, steps=1, backtracks=0, exact=True)
    # h(u_k) is the recorded sweep's <p, x_{l+1}>: no forward needed
    h_v = float((call.p * call.out.detach()).sum()) - _penalty(params, v) if call.out is not None \
        else evaluate(v, need_grad=False)[0]
    h_start = h_v
    loss_grad = [lp.grad for lp in params]  # -grad_v h at v = w_k: the global sweep's gradient
    done = backs = 0
    for j in range(steps):
        cand = [rule(lp.w_k, g, lp.eps, lp.rho, lp.reg) for lp, g in zip(params, loss_grad)]
        if j > 0 and all(torch.equal(c, vv) for c, vv in zip(cand, v)):
            break  # a fixed point of the step (e.g. a layer without activation: h is linear)
        need_grad = j + 1 < steps
        accepted = None
        lam = 1.0
        for b in range(backtracks + 1):
            w = cand if b == 0 else [lam * lam * c + (1.0 - lam * lam) * vv for c, vv in zip(cand, v)]
            h_w, g_w = evaluate(w, need_grad)
            if not math.isfinite(h_w):
                h_w = -math.inf
            if not safeguard or h_w > h_v:
                accepted = (w, h_w, g_w)
                break
            backs += 1
            lam *= 0.5
        if accepted is None:
            break
        v, h_v, g_w = accepted
        done += 1
        if g_w is None:
            break
        loss_grad = [-g for g in g_w]
    return v, dict(H_start=h_start, H_end=h_v, steps=done, backtracks=backs, exact=False)
