"""The OptEq unit layer ``u -> W^T sigma(W u + b)``, its two variable forms, and the decomposition
of a feed-forward network into unit layers with the output unchanged.

**The unit layer.** For ``sigma = prox_f`` (:mod:`proxnets.equilibrium.prox`) let
``F = (f + |.|^2/2)^*``, so ``F' = sigma`` and, for every y, ``F(y) = y sigma(y) - f(sigma(y)) - sigma(y)^2/2``
(the supremum is attained at ``sigma(y)``). Then

    unit(u) = W^T sigma(W u + b) = grad phi(u),      phi(u) = sum F(W u + b)   (convex),

and ``grad phi`` is ``|W|_2^2``-Lipschitz (``0 <= sigma' <= 1``). For ``|W|_2 <= 1`` it is the gradient of a
convex function and nonexpansive, hence (Moreau) the proximal operator of the convex
``g = phi^* - |.|^2/2``: the unit layer is a prox (the seed's v1 reads it as a gradient, v3 as a prox).

**Its equilibrium in two variables** (:class:`UnitOptEq`), with the input entering through ``b = U x + b0``:

- u-form: ``u* = W^T sigma(W u* + b)``, the minimizer of ``P(u) = |u|^2/2 - sum F(W u + b)``
  (Hessian ``I - W^T diag(sigma') W >= (1 - |W|_2^2) I``);
- h-form: ``h* = sigma(W W^T h* + b)``, the minimizer of ``G(h) = sum f(h) + |h|^2/2 - |W^T h|^2/2 - <b, h>``:
  the OptEq layer of :mod:`proxnets.equilibrium.layers` with its weight ``W^T``.

They are one problem: ``u* = W^T h*``, ``h* = sigma(W u* + b)``, and ``min P = min G`` (both are
``min_{u,h} |u|^2/2 - <h, W u + b> + f(h) + |h|^2/2``, jointly convex for ``|W|_2 <= 1``: minimizing over h
first gives P, over u first gives G). The network output is ``u*`` in both forms.

**Decomposition** (:func:`decompose`). A layer ``x -> sigma(A x + b)`` (``A`` a linear map or a
convolution, bias ``b``) is, with ``c > sqrt(|A|_2^2 + 1)`` and the unit layer of weight
``V = [A, I] / c`` on ``u = (x', y)``,

    sigma(A x + b) = c * (unit((c x, 0)))_y,

since ``V (c x, 0) = A x`` and ``V^T s = (A^T s, s) / c``; ``|V|_2 = sqrt(|A|_2^2 + 1) / c < 1``. So a
feed-forward ``nn.Sequential`` of (linear/conv, prox activation) pairs equals a chain of unit layers
joined by fixed linear maps (embed ``x -> (c x, 0)``, read the ``y`` slot, scale), output unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.equilibrium.implicit import BackwardConfig, equilibrium
from proxnets.equilibrium.layers import OptEq
from proxnets.equilibrium.prox import (
    BoxClamp,
    IdentityProx,
    IncreasingProx,
    LeakyReLUProx,
    ProxActivation,
    ReLUProx,
    SoftsignProx,
    TanhProx,
    get_activation,
)
from proxnets.utils.validation import check_tensor, fail

__all__ = ["conjugate_potential", "UnitLayer", "UnitChain", "UnitOptEq", "decompose", "prox_of_module"]


def conjugate_potential(act: ProxActivation, y: torch.Tensor) -> torch.Tensor:
    """``sum F(y)`` per sample, ``F = (f + |.|^2/2)^*``: ``F(y) = y s - f(s) - s^2/2`` at ``s = sigma(y)``, ``(B,)``."""
    s = act.prox(y)
    bsz = y.shape[0]
    return (y * s - 0.5 * s * s).reshape(bsz, -1).sum(1) - act.value(s)


class UnitLayer(nn.Module):
    """``u (B, n + m) -> W^T sigma(W u + b)`` with ``W = [A, I] / c`` on ``u = (x, y)`` (module docstring).

    ``linear`` is an ``nn.Linear`` or ``nn.Conv2d`` giving ``A`` and ``b`` (its bias); ``in_shape`` the shape of
    ``x`` without the batch axis; ``scale`` is ``c``. ``A^T`` is the adjoint by autograd (exact for any
    stride and padding). The weight is read from ``linear`` at each call (no copy).
    """

    def __init__(self, linear: nn.Module, activation: ProxActivation | str, in_shape: Sequence[int], scale: float):
        super().__init__()
        if not isinstance(linear, (nn.Linear, nn.Conv2d)):
            fail("linear", "an nn.Linear or nn.Conv2d", type(linear).__name__, TypeError)
        self.linear = linear
        self.activation = get_activation(activation)
        self.in_shape = tuple(in_shape)
        with torch.no_grad():
            p = next(linear.parameters())
            self.out_shape = tuple(linear(torch.zeros(1, *self.in_shape, dtype=p.dtype)).shape[1:])
        self.n, self.m = math.prod(self.in_shape), math.prod(self.out_shape)
        self.scale = float(scale)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` (bias excluded), ``(B, *in_shape) -> (B, *out_shape)``."""
        if isinstance(self.linear, nn.Linear):
            return F.linear(x, self.linear.weight)
        c = self.linear
        return F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups)

    def At(self, s: torch.Tensor) -> torch.Tensor:
        """``A^T s`` by autograd (the exact adjoint of :meth:`A`)."""
        with torch.enable_grad():
            x = torch.zeros(s.shape[0], *self.in_shape, dtype=s.dtype, device=s.device, requires_grad=True)
            return torch.autograd.grad(self.A(x), x, s, create_graph=torch.is_grad_enabled())[0]

    def bias(self, like: torch.Tensor) -> torch.Tensor:
        b = self.linear.bias
        if b is None:
            return torch.zeros_like(like)
        return b.reshape(1, -1, *([1] * (like.ndim - 2))) if like.ndim > 2 else b

    def pre(self, u: torch.Tensor) -> torch.Tensor:
        """``W u + b = (A x + y) / c + b``, shape ``(B, *out_shape)``."""
        bsz = u.shape[0]
        x = u[:, : self.n].reshape(bsz, *self.in_shape)
        y = u[:, self.n:].reshape(bsz, *self.out_shape)
        wu = (self.A(x) + y) / self.scale
        return wu + self.bias(wu)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        check_tensor("u", u, shape=(None, self.n + self.m), finite=False)
        s = self.activation.prox(self.pre(u))  # (B, *out_shape)
        return torch.cat([self.At(s).flatten(1), s.flatten(1)], dim=1) / self.scale  # W^T s

    def potential(self, u: torch.Tensor) -> torch.Tensor:
        """``phi(u) = sum F(W u + b)`` per sample: the convex function whose gradient this layer is."""
        return conjugate_potential(self.activation, self.pre(u))


class UnitChain(nn.Module):
    """A feed-forward network as unit layers joined by fixed linear maps (:func:`decompose`)."""

    def __init__(self, units: Sequence[UnitLayer], out_shape: Sequence[int]):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.out_shape = tuple(out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz = x.shape[0]
        for unit in self.units:
            x = x.reshape(bsz, *unit.in_shape)  # an nn.Flatten between layers is this reshape
            u = torch.cat([unit.scale * x.flatten(1), x.new_zeros(bsz, unit.m)], dim=1)  # embed (c x, 0)
            x = unit.scale * unit(u)[:, unit.n:]  # read the y slot, undo 1/c
        return x.reshape(bsz, *self.out_shape)


def prox_of_module(module: nn.Module) -> ProxActivation:
    """The :class:`ProxActivation` of a torch activation module (raises for one that is no prox)."""
    if isinstance(module, nn.ReLU):
        return ReLUProx()
    if isinstance(module, nn.Tanh):
        return TanhProx()
    if isinstance(module, nn.Softsign):
        return SoftsignProx()
    if isinstance(module, nn.Identity):
        return IdentityProx()
    if isinstance(module, nn.Hardtanh):
        return BoxClamp(module.min_val, module.max_val)
    if isinstance(module, nn.LeakyReLU) and 0 < module.negative_slope <= 1:
        return LeakyReLUProx(module.negative_slope)
    if isinstance(module, nn.Sigmoid):
        return IncreasingProx(torch.sigmoid, name="sigmoid (unshifted)")
    fail("activation", "nn.ReLU, Tanh, Softsign, Identity, Hardtanh, Sigmoid or LeakyReLU(0 < slope <= 1) "
         "(a prox: non-decreasing, slope <= 1)", type(module).__name__)


def decompose(seq: nn.Sequential, in_shape: Sequence[int]) -> UnitChain:
    """``seq`` (``nn.Linear``/``nn.Conv2d`` each followed by a prox activation or by nothing, ``nn.Flatten``
    between, nested ``nn.Sequential`` read in order) as a :class:`UnitChain` with the same output (module docstring).

    Each scale is ``c = 1.0001 * sqrt(B^2 + 1)`` with ``B`` a rigorous bound of ``|A|_2``
    (:func:`proxnets.norm_bounds.norm_bound` at the layer's input size: the Fourier-symbol bound for
    stride-1 convolutions, else the tightest affordable; kept as ``unit.norm_bound_A``), so every unit weight has
    ``|W|_2 < 1`` and every unit layer is the prox of a convex function.
    """
    from proxnets.norm_bounds import norm_bound

    if not isinstance(seq, nn.Sequential):
        fail("seq", "an nn.Sequential", type(seq).__name__, TypeError)
    def leaves(s: nn.Sequential) -> list[nn.Module]:  # nested Sequentials are read in order
        return [m for child in s for m in (leaves(child) if isinstance(child, nn.Sequential) else [child])]

    mods = leaves(seq)
    units, shape, i = [], tuple(in_shape), 0
    while i < len(mods):
        mod = mods[i]
        if isinstance(mod, nn.Flatten):
            shape, i = (math.prod(shape),), i + 1
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            fail(f"seq[{i}]", "nn.Linear, nn.Conv2d or nn.Flatten (each linear map optionally followed by a prox activation)",
                 type(mod).__name__, TypeError)
        act: ProxActivation = IdentityProx()
        if i + 1 < len(mods) and not isinstance(mods[i + 1], (nn.Linear, nn.Conv2d, nn.Flatten)):
            act, i = prox_of_module(mods[i + 1]), i + 1
        # c needs an upper bound only: the cheap Fourier-symbol bound where it applies (stride-1 convolutions)
        cheap = isinstance(mod, nn.Conv2d) and mod.stride == (1, 1) and mod.dilation == (1, 1) and mod.groups == 1
        nb = norm_bound(mod, shape if isinstance(mod, nn.Conv2d) else None, method="fourier" if cheap else "auto")
        if not nb.rigorous:
            fail(f"seq[{i}]", "a layer whose norm has a rigorous bound", nb.why)
        unit = UnitLayer(mod, act, shape, 1.0001 * math.sqrt(float(nb.value) ** 2 + 1.0))
        unit.norm_bound_A = float(nb.value)  # the rigorous bound B >= |A|_2 the scale was built from
        units.append(unit)
        shape, i = unit.out_shape, i + 1
    if not units:
        fail("seq", "at least one nn.Linear or nn.Conv2d", "none")
    return UnitChain(units, shape)


class UnitOptEq(OptEq):
    """The equilibrium of a dense unit layer with input: ``x (B, in_features) -> u* (B, features)``.

    ``W`` is the unit weight ``(hidden, features)``; the OptEq weight of the h-form (module docstring) is
    ``W^T`` (``hidden -> features``), kept ``|W|_2 <= target_norm`` by OptEq's parametrization. ``form="h"`` solves ``h* = sigma(W W^T h* + U x + b)``
    (OptEq's solver and implicit backward) and returns ``u* = W^T h*``; ``form="u"`` solves
    ``u* = W^T sigma(W u* + U x + b)`` directly (autograd adjoint). Objectives: :meth:`objective_u` (P),
    :meth:`objective` (G, in h).
    """

    def __init__(self, in_features: int, features: int, hidden: int, *, form: str = "h",
                 activation: str | ProxActivation = "relu", target_norm: float = 0.97, solver: str = "anderson",
                 tol: float = 1e-4, max_iter: int = 200, policy: str = "warn"):
        # OptEq(in, features=hidden, width=features): z = h (hidden), its W maps hidden -> features (= W_unit^T)
        super().__init__(in_features, hidden, width=features, activation=activation, target_norm=target_norm,
                         solver=solver, tol=tol, max_iter=max_iter, policy=policy)
        if form not in ("h", "u"):
            fail("form", "'h' or 'u'", form)
        self.form, self.unit_features, self.hidden = form, features, hidden
        self.u_info = None

    def unit_weight(self) -> torch.Tensor:
        """``W`` of the unit layer, ``(hidden, features)`` (the transpose of the OptEq weight)."""
        return self.W.weight.T

    def unit_map(self, inj: torch.Tensor, w: torch.Tensor):
        """``T_u(u) = W^T sigma(W u + inj)`` (a ``|W|_2^2``-contraction)."""
        return lambda u: self.apply_w(self.activation.prox(self.apply_wt(u, w) + inj), w)

    def objective_u(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``P(u; x) = |u|^2/2 - sum F(W u + U x + b)`` per sample."""
        pre = self.apply_wt(u, self.W.weight) + self.injection(x)
        return 0.5 * u.pow(2).sum(1) - conjugate_potential(self.activation, pre)

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        if self.form == "h":
            h = super().forward(x, z0)
            return self.apply_w(h, self.W.weight)  # u* = W^T h*
        inj, w = self.injection(x), self.W.weight
        u0 = torch.zeros(inj.shape[0], self.unit_features, dtype=inj.dtype, device=inj.device) if z0 is None else z0
        u, info = equilibrium(self.unit_map(inj, w), u0, solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                              backward=BackwardConfig("implicit", solver="anderson", tol=self.tol, max_iter=self.max_iter),
                              policy=self.policy, what="UnitOptEq forward (u-form)")
        self.last_info = info
        return u
