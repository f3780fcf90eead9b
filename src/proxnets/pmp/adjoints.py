"""States and adjoints of a network seen as a discrete control system.

For layers ``x_{l+1} = Lambda_l(x_l, u_l)`` the adjoint (costate) is ``p_{l+1} = -dL/dx_{l+1}``:
the backward sweep of the PMP is back-propagation of minus the loss gradient. The
:class:`AdjointRecorder` reads them with hooks during an ordinary ``loss.backward()``:

- ``states[name]``: the output ``x_{l+1}`` of each recorded layer, ``(B, ...)``.
- ``adjoints[name]``: ``p_{l+1} = -dL/dx_{l+1}``, same shape.
- :meth:`AdjointRecorder.hamiltonian`: ``sum_l <p_{l+1}, x_{l+1}>`` (the smooth part of the
  Hamiltonian ``sum_l H_l = sum_l <p_{l+1}, Lambda_l(x_l, u_l)> - rho R``; with the batch-mean loss
  the adjoints carry the ``1/|B|`` factor, so this is the batch average).

Recorded layers default to the modules that own parameters directly (convolutions, linear maps):
the parameter-free maps between them (activations, pooling, reshapes) are layers without controls.
A module called twice in one forward pass keeps its last call.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AdjointRecorder", "control_layers"]


def control_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that own parameters directly (name -> module), in order."""
    return {
        name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))
    }


class AdjointRecorder:
    """Record ``x_{l+1}`` and ``p_{l+1} = -dL/dx_{l+1}`` of chosen layers (a context manager).

    ``layers``: names of submodules (default :func:`control_layers`). Recording happens only for
    forward passes with gradients enabled; ``enabled`` switches it off without removing hooks.
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None):
        modules = dict(model.named_modules())
        names = list(control_layers(model)) if layers is None else list(layers)
        for name in names:
            if name not in modules:
                raise ValueError(f"layers: expected names of submodules of the model, got {name!r}")
        self.layers = names
        self.enabled = True
        self.states: dict[str, torch.Tensor] = {}
        self.adjoints: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in names]

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.enabled or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            self.states[name] = output.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                self.adjoints[name] = -grad.detach()

            output.register_hook(grad_hook)

        return hook

    def clear(self) -> None:
        self.states.clear()
        self.adjoints.clear()

    def hamiltonian(self) -> float:
        """``sum_l <p_{l+1}, x_{l+1}>`` over the layers recorded in the last forward/backward pass."""
        total = 0.0
        for name, p in self.adjoints.items():
            total += float((p * self.states[name]).sum())
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "AdjointRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
