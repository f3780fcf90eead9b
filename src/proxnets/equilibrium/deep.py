"""Deep OptEq: one joint equilibrium of L unit layers, with one objective and one certificate.

The state is ``z = (z_1, ..., z_L)``, ``z_l in R^{n_l}``, and the joint weight ``W`` is block lower
bidiagonal: ``(W z)_l = A_l z_l + B_l z_{l-1}`` (``B_1 = 0``). The joint equilibrium

    z* = prox_f( W^T W z* + inj(x) ),      inj(x) = (U x + b_1, b_2, ..., b_L),

is the minimizer of the one joint objective ``G(z; x) = sum f(z) + |z|^2/2 - |W z|^2/2 - <inj(x), z>``:
the coupling ``(W^T W)_{l,l-1} = A_l^T B_l`` carries the input from layer to layer, and
``(W^T W)_{l-1,l}`` (its transpose) feeds every layer back into the one before, so the L layers are
solved *together* (not one after the other). The output is ``z*_L``. ``|W|_2 <= target_norm < 1`` is
OptEq's norm parametrization applied to the masked joint matrix. :class:`SequentialOptEq` is the
other variant, L independent equilibria in sequence (each layer's input is the previous one's
output, no feedback); the classifier's ``blocks > 1`` is that variant.

The joint certificate (:func:`certify_equilibrium`, for this and any OptEq layer):

- ``operator_norm``: a rigorous bound ``w >= |W|_2`` of the applied operator (:func:`proxnets.norm_bounds.norm_bound`), ``< 1``.
- ``equilibrium_residual``: ``max_i |T(z) - z| / |T(z)|`` in float64 after a solve to ``tol / 2``.
- ``distance_to_minimizer``: ``T`` is a ``q = w^2``-contraction (``prox_f`` is nonexpansive,
  ``|W^T W|_2 = |W|_2^2``), so ``|z - z*| <= |T(z) - z| + q |z - z*|``, i.e. ``|z - z*| <= |T(z) - z| / (1 - q)``.
- ``objective_gap``: with ``y = T(z)``, ``g = W^T W (z - y)`` lies in ``dG(y)`` (prox optimality at y:
  ``W^T W z + inj - y in df(y)``), and G is ``mu = 1 - w^2`` strongly convex, so
  ``min G >= G(y) - |g|^2 / (2 mu)``: a certified lower bound of the optimal value. The gap
  ``G(y) - lower = |g|^2 / (2 mu)`` (relative to ``|G(y)|``) plays the role of a duality gap: it bounds
  the suboptimality ``G(y) - min G`` and can be checked without knowing ``min G``.

With equilibrium selection (``layer.eps > 0``, :mod:`proxnets.equilibrium.layers`) the same four are those of
``G_eps = G + eps/2 |z - a(x)|^2``: ``operator_norm`` must be ``<= 1`` (G convex, its equilibria may form a
set; at an active bound 1 the round-off margin of a rigorous bound keeps it from holding), ``strong_convexity``
``1 + eps - w^2 > 0`` is what the selected point needs, ``W^T W`` reads ``M = W^T W - eps I``, ``q = max(eps, w^2 - eps)``, ``mu = 1 + eps - w^2``, and the
distance is named ``distance_to_selected_equilibrium`` (to the unique minimizer of ``G_eps``; nothing is
claimed about the distance to the ``eps -> 0`` limit, the projection of ``a`` onto the equilibria).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from proxnets.certificates import Certificate
from proxnets.solvers import SolverInfo
from proxnets.equilibrium.layers import OptEq, OptEqBase, OptEqConv2d
from proxnets.equilibrium.prox import ProxActivation
from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["DeepOptEq", "DeepOptEqConv2d", "SequentialOptEq", "certify_equilibrium"]


class _BlockMask(nn.Module):
    """``V -> V * M`` with a fixed 0/1 mask (the block lower-bidiagonal pattern)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.mask.to(v.dtype)


class _Injection(nn.Module):
    """``x -> (U x + b_1, b_2, ..., b_L)``: the input enters the first layer only."""

    def __init__(self, in_features: int, first: int, rest: int):
        super().__init__()
        self.first = nn.Linear(in_features, first)
        self.rest_bias = nn.Parameter(torch.zeros(rest))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.rest_bias.expand(x.shape[0], -1)], dim=1)


class _JointBlocks:
    """What the dense and the convolutional joint layer share: the blocks of the state, the norm refresh."""

    sizes: tuple[int, ...]
    starts: list[int]

    def block(self, z: torch.Tensor, l: int) -> torch.Tensor:
        """``z_l`` of a joint state (``(B, sum n)``, or ``(B, sum C, H, W)`` for the convolutional layer)."""
        return z[:, self.starts[l]:self.starts[l + 1]]

    def train(self, mode: bool = True):
        was_training = self.training
        nn.Module.train(self, mode)
        if was_training and not mode:  # converge the norm's power iteration on the *masked* operator
            plist = self.W.parametrizations.weight
            masked = plist[0](plist.original)
            with torch.no_grad():
                plist[1].norm.refresh(masked)
        return self

    def joint(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """The joint equilibrium ``z* = (z*_1, ..., z*_L)``, concatenated along dimension 1."""
        return OptEqBase.forward(self, x, z0)

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(self.joint(x, z0), len(self.sizes) - 1)


def _starts(sizes: Sequence[int]) -> list[int]:
    return [0, *torch.cumsum(torch.tensor(sizes), 0).tolist()]


class DeepOptEq(_JointBlocks, OptEq):
    """``x (B, in_features) -> z*_L (B, features[-1])``: one joint equilibrium of ``len(features)`` layers
    (module docstring). Every OptEq keyword applies to the joint solve."""

    def __init__(self, in_features: int, features: Sequence[int], *, activation: str | ProxActivation = "relu",
                 target_norm: float = 0.97, solver: str = "accelerated", tol: float = 1e-4, max_iter: int = 200,
                 backward: str = "implicit", policy: str = "warn", power_iterations: int = 16):
        if not (isinstance(features, (list, tuple)) and features and all(isinstance(n, int) and n > 0 for n in features)):
            fail("features", "a non-empty sequence of positive ints", features)
        self.sizes = tuple(features)
        total = sum(self.sizes)
        super().__init__(in_features, total, width=total, activation=activation, target_norm=target_norm,
                         solver=solver, tol=tol, max_iter=max_iter, backward=backward, policy=policy,
                         power_iterations=power_iterations)
        self.U = _Injection(self.in_features, self.sizes[0], total - self.sizes[0])
        mask = torch.zeros(total, total)
        starts = _starts(self.sizes)
        for l, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            mask[a:b, a:b] = 1.0  # A_l
            if l > 0:
                mask[a:b, starts[l - 1]:a] = 1.0  # B_l: z_{l-1} -> row block l
        self.starts = starts
        # the norm constraint acts on the masked matrix: rebuild W as mask, then OptEq's bound
        from proxnets.equilibrium.parametrize import operator_norm_bound

        lin = nn.Linear(total, total, bias=False)
        with torch.no_grad():
            lin.weight.mul_(mask)
        parametrize.register_parametrization(lin, "weight", _BlockMask(mask))
        self.W = operator_norm_bound(lin, target=self.target_norm, n_power_iterations=self.power_iterations)

    # W z, W^T y and the weight gradient block by block: only the 2L - 1 nonzero blocks are multiplied
    # (the dense masked product would cost (sum n)^2 per sample, L times a layer's share)
    def _blocks(self):
        s = self.starts
        return [(s[l], s[l + 1], s[l - 1] if l > 0 else None) for l in range(len(self.sizes))]

    def apply_w(self, z, w):
        """``(W z)_l = A_l z_l + B_l z_{l-1}``."""
        outs = []
        for a, b, p in self._blocks():
            o = F.linear(z[:, a:b], w[a:b, a:b])
            if p is not None:
                o = o.add_(F.linear(z[:, p:a], w[a:b, p:a]))
            outs.append(o)
        return torch.cat(outs, dim=1)

    def apply_wt(self, y, w):
        """``(W^T y)_l = A_l^T y_l + B_{l+1}^T y_{l+1}``."""
        blocks = self._blocks()
        outs = []
        for l, (a, b, _) in enumerate(blocks):
            o = y[:, a:b] @ w[a:b, a:b]
            if l + 1 < len(blocks):
                c = blocks[l + 1][1]
                o = o.add_(y[:, b:c] @ w[b:c, a:b])
            outs.append(o)
        return torch.cat(outs, dim=1)

    def weight_grad(self, z, wz, q, w):
        # d/dw <W q, W z> on the nonzero blocks (the mask zeroes the others' gradient anyway):
        # block (l, k): (W z)_l^T q_k + (W q)_l^T z_k, k in {l, l - 1}
        wq = self.apply_w(q, w)
        grad = torch.zeros_like(w)
        for a, b, p in self._blocks():
            grad[a:b, a:b] = wz[:, a:b].T @ q[:, a:b] + wq[:, a:b].T @ z[:, a:b]
            if p is not None:
                grad[a:b, p:a] = wz[:, a:b].T @ q[:, p:a] + wq[:, a:b].T @ z[:, p:a]
        return grad



class _ConvInjection(nn.Module):
    """``x -> (U x + b_1, b_2, ..., b_L)`` per pixel: the input enters the first layer only (``b_l`` one bias
    per channel of layer ``l``, the same at every pixel)."""

    def __init__(self, in_channels: int, first: int, rest: int, kernel_size: int):
        super().__init__()
        self.first = nn.Conv2d(in_channels, first, kernel_size, padding=kernel_size // 2)
        self.rest_bias = nn.Parameter(torch.zeros(rest))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.first(x)
        rest = self.rest_bias.view(1, -1, 1, 1).expand(u.shape[0], -1, *u.shape[2:])
        return torch.cat([u, rest], dim=1)


class DeepOptEqConv2d(_JointBlocks, OptEqConv2d):
    """Convolutional deep OptEq: ``x (B, in_channels, H, W) -> z*_L (B, channels[-1], H, W)``, one joint
    equilibrium of ``L = len(channels)`` convolutional unit layers (module docstring, with convolutions).

    The state is ``z = (z_1, ..., z_L)`` concatenated along the channels, ``(B, sum C_l, H, W)``, and the joint
    weight is one ``sum C -> sum C`` convolution (zero padding) whose kernel is block lower bidiagonal in the
    channels: ``(W z)_l = A_l * z_l + B_l * z_{l-1}`` (``A_l``: ``C_l -> C_l``, ``B_l``: ``C_{l-1} -> C_l``, a fixed
    0/1 mask on the kernel's channel pairs). Everything of :class:`OptEqConv2d` then applies to the joint
    operator unchanged: ``z* = prox_f(W^T W z* + inj(x))`` minimizes the one joint objective ``G``, the norm
    bound ``|W|_2 <= target_norm < 1`` is that of the masked convolution at ``spatial``
    (:func:`proxnets.norm_bounds.norm_bound` certifies it), the adjoint is conjugate gradient, and
    :func:`certify_equilibrium` gives the joint certificate. ``W z``, ``W^T y`` and the weight gradient are
    applied layer by layer on the nonzero blocks only (one convolution per layer over its two input blocks),
    so a joint application costs the ``2L - 1`` nonzero blocks, not the ``L^2`` of the masked kernel."""

    def __init__(self, in_channels: int, channels: Sequence[int], spatial: Sequence[int], *, kernel_size: int = 3,
                 activation: str | ProxActivation = "relu", target_norm: float = 0.97,
                 solver: str = "safeguarded_anderson", tol: float = 1e-4, max_iter: int = 200,
                 backward: str = "implicit", policy: str = "warn", power_iterations: int = 16, eps: float = 0.0,
                 anchor: str | nn.Module = "linear"):
        if not (isinstance(channels, (list, tuple)) and channels and all(isinstance(n, int) and n > 0 for n in channels)):
            fail("channels", "a non-empty sequence of positive ints", channels)
        self.sizes = tuple(channels)
        total = sum(self.sizes)
        # eps > 0: equilibrium selection on the joint state (G + eps/2 |z - a(x)|^2, a(x) of all L layers' channels)
        super().__init__(in_channels, total, spatial, kernel_size=kernel_size, activation=activation,
                         target_norm=target_norm, solver=solver, tol=tol, max_iter=max_iter, backward=backward,
                         policy=policy, power_iterations=power_iterations, eps=eps, anchor=anchor)
        self.U = _ConvInjection(self.in_channels, self.sizes[0], total - self.sizes[0], self.kernel_size)
        starts = _starts(self.sizes)
        mask = torch.zeros(total, total, 1, 1)
        for l, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            mask[a:b, a:b] = 1.0  # A_l
            if l > 0:
                mask[a:b, starts[l - 1]:a] = 1.0  # B_l: z_{l-1} -> layer l
        self.starts = starts
        from proxnets.equilibrium.parametrize import operator_norm_bound

        conv = nn.Conv2d(total, total, self.kernel_size, padding=self._pad, bias=False)
        with torch.no_grad():
            conv.weight.mul_(mask)
        parametrize.register_parametrization(conv, "weight", _BlockMask(mask))
        self.W = operator_norm_bound(conv, target=self.target_norm, in_shape=(total, *self.spatial),
                                     n_power_iterations=self.power_iterations)

    def _rows(self):
        """Per layer l: its channels ``a:b`` and the input channels ``p:b`` of its row (``p`` = start of l - 1)."""
        s = self.starts
        return [(s[l], s[l + 1], s[max(l - 1, 0)]) for l in range(len(self.sizes))]

    def apply_w(self, z, w):
        """``(W z)_l = A_l * z_l + B_l * z_{l-1}``: one convolution of the channels of layers l - 1 and l."""
        return torch.cat([F.conv2d(z[:, p:b], w[a:b, p:b], padding=self._pad) for a, b, p in self._rows()], dim=1)

    def apply_wt(self, y, w):
        """``(W^T y)_l = A_l^T * y_l + B_{l+1}^T * y_{l+1}``: one transposed convolution of layers l and l + 1."""
        rows = self._rows()
        outs = []
        for l, (a, b, _) in enumerate(rows):
            c = rows[l + 1][1] if l + 1 < len(rows) else b
            outs.append(F.conv_transpose2d(y[:, a:c], w[a:c, a:b], padding=self._pad))
        return torch.cat(outs, dim=1)

    def weight_grad(self, z, wz, q, w):
        # d/dw <W q, W z> on the nonzero row blocks (the mask zeroes the others' gradient anyway)
        wq = self.apply_w(q, w)
        grad = torch.zeros_like(w)
        for a, b, p in self._rows():
            shape = w[a:b, p:b].shape
            grad[a:b, p:b] = (torch.nn.grad.conv2d_weight(q[:, p:b], shape, wz[:, a:b], padding=self._pad)
                              + torch.nn.grad.conv2d_weight(z[:, p:b], shape, wq[:, a:b], padding=self._pad))
        return grad


class SequentialOptEq(nn.Sequential):
    """The other deep variant: ``OptEq(in, n_1) -> OptEq(n_1, n_2) -> ...``, L independent equilibria in
    sequence (no feedback from later layers); the keywords go to every layer."""

    def __init__(self, in_features: int, features: Sequence[int], *, activation: str | ProxActivation = "relu",
                 target_norm: float = 0.97, solver: str = "accelerated", tol: float = 1e-4, max_iter: int = 200,
                 policy: str = "warn"):
        dims = [check_int("in_features", in_features, low=1), *features]
        super().__init__(*[OptEq(a, b, activation=activation, target_norm=target_norm, solver=solver, tol=tol,
                                 max_iter=max_iter, policy=policy) for a, b in zip(dims[:-1], dims[1:])])


def certify_equilibrium(layer: OptEqBase, x: torch.Tensor, *, z: torch.Tensor | None = None, tol: float = 1e-4,
                        max_iter: int = 2000, distance_tol: float = 1e-2, gap_tol: float = 1e-5) -> list[Certificate]:
    """The certificate of one (joint) equilibrium layer on inputs ``x`` (module docstring): ``operator_norm``,
    ``equilibrium_residual``, ``distance_to_minimizer`` and ``objective_gap`` (with ``G`` in its details).

    ``z`` (optional, the layer's full state, e.g. ``DeepOptEq.joint(x)``): certify that point; by default an
    Anderson solve to ``tol / 2`` provides it."""
    from proxnets.equilibrium.models import _block_norm, _distance_name, _operator_norm_certificates, _residual_certificates
    from proxnets.solvers import solve

    if not isinstance(layer, OptEqBase):
        fail("layer", "an OptEq layer (OptEqBase)", type(layer).__name__, TypeError)
    check_number("gap_tol", gap_tol, low=0.0, low_inclusive=False)
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            norm, rigorous, method, why = _block_norm(layer)
            certs = _operator_norm_certificates("", layer, norm, rigorous, method, why)
            inj = layer.injection(x)
            w = layer.W.weight.detach()
            T = layer.fixed_point_map(inj, w)
            if z is None:
                z, info = solve("anderson", T, torch.zeros_like(inj), tol=tol / 2, max_iter=max_iter)
            else:
                check_tensor("z", z, shape=tuple(inj.shape), finite=False)
                z = z.detach()
                info = SolverInfo(solver="given point", converged=True, iterations=0, tol=tol, stop_reason="tol")
            inj64, w64 = inj.double(), w.double()
            T64 = layer.fixed_point_map(inj64, w64)
            q, mu = layer.contraction(norm), layer.strong_convexity(norm)
            certs += _residual_certificates("", T64, z, info, tol, q, rigorous, distance_tol,
                                            "the certificate's anderson solve", _distance_name(layer))
            z64 = z.double()
            y = T64(z64.clone())
            g = layer.linear_part(z64 - y, w64)  # in dG(y) (dG_eps(y) with selection)
            bsz = y.shape[0]
            G = layer.objective(y, inj=inj64, w=w64)  # (B,)
            if mu > 0:
                gap = g.reshape(bsz, -1).pow(2).sum(1) / (2 * mu)
                rel = gap / G.abs().clamp_min(1e-12)
                value = float(rel.max()) if bool(torch.isfinite(rel).all()) else math.inf
                why_g = "" if rigorous else f"the norm bound is not rigorous: {why}"
            else:
                value, why_g = math.inf, f"1 + eps - |W|_2^2 = {mu:.3g} <= 0: G is not strongly convex, no lower bound"
            certs.append(Certificate(
                "objective_gap", value, gap_tol, "<=", rigorous=not why_g, why=why_g,
                method="(G(y) - [G(y) - |M (z - y)|^2 / (2 mu)]) / |G(y)|, y = T(z), M = W^T W - eps I, "
                       "mu = 1 + eps - |W|^2, float64",
                details={"objective_mean": float(G.mean()), "objective_max": float(G.max()),
                         "lower_bound_mean": float((G - gap).mean()) if mu > 0 else -math.inf}))
    finally:
        layer.train(was_training)
    return certs
