"""Capsule layers: convolutional primary capsules, routed capsule layer, reconstruction decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from proxnets.capsules.functional import _capsule_length
from proxnets.capsules.functional import _squash as squash  # unchecked: hot path
from proxnets.capsules.routing import BACKENDS, GRADIENT_MODES, ROUTING_MODES, RoutingInfo, dynamic_routing
from proxnets.capsules.votes import FactoredVotes
from proxnets.utils.validation import check_choice, check_int, check_labels, check_number, check_tensor, fail

__all__ = ["COUPLING_MODES", "PrimaryCapsules", "CapsuleLinear", "CapsuleLength", "ReconstructionDecoder",
           "conv_output_size"]

COUPLING_MODES = ("routing", "random")


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    """Spatial size after an unpadded convolution: ``floor((size - kernel) / stride) + 1``."""
    return (size - kernel_size) // stride + 1


class PrimaryCapsules(nn.Module):
    """Convolutional capsules: one convolution with ``channels * capsule_dim`` filters, regrouped.

    Output ``(B, channels * H' * W', capsule_dim)``, squashed; capsule ``(ch, y, x)`` is the vector
    of the ``capsule_dim`` filters of group ``ch`` at position ``(y, x)``.
    """

    def __init__(self, in_channels: int, channels: int = 32, capsule_dim: int = 8, kernel_size: int = 9, stride: int = 2):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("capsule_dim", capsule_dim),
                            ("kernel_size", kernel_size), ("stride", stride)):
            check_int(name, value, low=1)
        self.channels, self.capsule_dim = channels, capsule_dim
        self.conv = nn.Conv2d(in_channels, channels * capsule_dim, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, channels * dim, H', W')
        B, _, H, W = y.shape
        y = y.view(B, self.channels, self.capsule_dim, H, W).permute(0, 1, 3, 4, 2)  # (B, ch, H', W', dim)
        return squash(y.reshape(B, self.channels * H * W, self.capsule_dim))  # (B, M, dim)


class CapsuleLinear(nn.Module):
    """Routed capsule layer: ``M`` child capsules of ``in_dim`` -> ``N`` parents of ``out_dim``.

    Votes ``u_hat[b, i, j] = u[b, i] @ weight[j, i]`` with one ``in_dim x out_dim`` matrix per pair
    (``weight``: ``(N, M, in_dim, out_dim)``), then :func:`~proxnets.capsules.routing.dynamic_routing` on
    the factored votes (never materialized). ``bias=True`` adds the official code's learned per-parent
    bias ``beta (N, out_dim)`` to every ``s_j`` (initialized to ``bias_init``); the routing energy stays
    concave (``s_j`` is still affine in the couplings). ``routing="regularized"`` (with ``tau``, ``step``)
    routes by ``b <- (1 - lambda tau) b + lambda a`` (strictly convex for ``tau`` above the threshold;
    ``tau="auto"``: twice it, per sample).

    ``return_info=False`` makes ``forward`` return only ``v`` (so the layer sits in ``nn.Sequential``)
    and keeps the routing info on the module as ``last_info``. ``backend="compiled"`` runs untraced routing calls
    as one ``torch.compile`` graph (:mod:`proxnets.capsules.compiled`; opt-in, same results up to round-off).

    ``couplings="random"`` is the random-coupling baseline of Paik, Kwak & Kim (2019): no routing,
    each child's couplings ``softmax(z_i)`` with ``z_ij ~ N(0, 1)`` drawn afresh at every forward
    pass (from torch's global generator), ``v_j = squash(sum_i c_ij u_hat_ij)``. (Uniform couplings,
    the other baseline, are ``iterations=1``.) ``broken`` (``None``) selects a deliberately wrong
    routing procedure of :data:`~proxnets.capsules.routing.BROKEN_VARIANTS` (falsification tests).
    """

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        *,
        iterations: int = 3,
        gradient: str = "all",
        leaky: bool = False,
        init_std: float = 0.01,
        couplings: str = "routing",
        bias: bool = False,
        bias_init: float = 0.1,
        routing: str = "standard",
        tau: float | str | None = None,
        step: float | None = None,
        return_info: bool = True,
        backend: str = "eager",
    ):
        super().__init__()
        for name, value in (("in_capsules", in_capsules), ("in_dim", in_dim), ("out_capsules", out_capsules),
                            ("out_dim", out_dim)):
            check_int(name, value, low=1)
        self.iterations = check_int("iterations", iterations, low=0)
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)
        self.leaky = bool(leaky)
        self.couplings = check_choice("couplings", couplings, COUPLING_MODES)
        self.routing = check_choice("routing", routing, ROUTING_MODES)
        if routing == "regularized" and tau is None:
            tau = "auto"
        self.tau, self.step = tau, step
        self.return_info = bool(return_info)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.last_info: RoutingInfo | None = None
        self.broken: str | None = None
        self.weight = nn.Parameter(torch.randn(out_capsules, in_capsules, in_dim, out_dim)
                                   * check_number("init_std", init_std, low=0.0))
        self.bias = (nn.Parameter(torch.full((out_capsules, out_dim), check_number("bias_init", bias_init)))
                     if bias else None)
        # validates routing/tau/step once, on a tiny problem, so that a bad value fails at construction
        dynamic_routing(torch.zeros(1, 1, 1, 1), 1, routing=routing, tau=tau, step=step)

    def routing_options(self) -> dict:
        """Keyword arguments of :func:`dynamic_routing` that reproduce this layer's routing (bias included)."""
        return dict(gradient=self.gradient, leaky=self.leaky, bias=self.bias, routing=self.routing,
                    tau=self.tau, step=self.step, backend=self.backend, _broken=self.broken)

    def votes(self, u: torch.Tensor) -> FactoredVotes:
        """The layer's votes for child capsules ``u (B, M, in_dim)``."""
        _, M, K, _ = self.weight.shape
        check_tensor("u", u, shape=(None, M, K))
        return FactoredVotes(u, self.weight, validate=False)

    def forward(self, u: torch.Tensor, *, iterations: int | None = None, trace: bool = False,
                tol: float | None = None) -> tuple[torch.Tensor, RoutingInfo] | torch.Tensor:
        """Parent capsules ``(B, N, out_dim)`` and the routing info (only ``v`` with ``return_info=False``;
        the info is then ``self.last_info``); ``iterations`` overrides the layer's."""
        votes = self.votes(u)
        if self.couplings == "random":
            c = torch.softmax(torch.randn(votes.batch, votes.children, votes.parents, dtype=u.dtype,
                                          device=u.device), -1)  # (B, M, N), rows on the simplex
            s = votes.combine(c)
            v, info = squash(s if self.bias is None else s + self.bias), RoutingInfo(iterations=0, couplings=c)
        else:
            r = self.iterations if iterations is None else iterations
            v, info = dynamic_routing(votes, r, trace=trace, tol=tol, **self.routing_options())
        self.last_info = info
        return (v, info) if self.return_info else v

    def extra_repr(self) -> str:
        N, M, K, D = self.weight.shape
        return (f"{M}x{K} -> {N}x{D}, iterations={self.iterations}, gradient={self.gradient!r}, leaky={self.leaky}, "
                f"couplings={self.couplings!r}, bias={self.bias is not None}, routing={self.routing!r}"
                + (f", tau={self.tau!r}, step={self.step!r}" if self.routing == "regularized" else "")
                + (f", backend={self.backend!r}" if self.backend != "eager" else ""))


class CapsuleLength(nn.Module):
    """Capsule lengths ``|v_j|`` ``(B, N)`` from capsules ``(B, N, D)``: class scores in ``nn.Sequential``."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return _capsule_length(v)


class ReconstructionDecoder(nn.Module):
    """Image from the class capsules: keep the capsule of ``labels`` (zero the others) -> MLP -> sigmoid."""

    def __init__(self, num_classes: int, capsule_dim: int, out_shape: Sequence[int], hidden: Sequence[int] = (512, 1024)):
        super().__init__()
        check_int("num_classes", num_classes, low=1)
        check_int("capsule_dim", capsule_dim, low=1)
        self.out_shape = tuple(int(s) for s in out_shape)
        if len(self.out_shape) != 3 or min(self.out_shape) < 1:
            fail("out_shape", "(C, H, W) with positive sizes", out_shape)
        sizes = [num_classes * capsule_dim, *[check_int("hidden", h, low=1) for h in hidden], math.prod(self.out_shape)]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers[-1] = nn.Sigmoid()
        self.net = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_tensor("v", v, shape=(None, self.num_classes, None), like=self)
        check_labels("labels", labels, v.shape[0], self.num_classes)  # a length-1 vector is not broadcast
        mask = nn.functional.one_hot(labels, self.num_classes).to(v.dtype)  # (B, N)
        flat = (v * mask.unsqueeze(-1)).flatten(1)  # (B, N * D)
        return self.net(flat).view(-1, *self.out_shape)  # (B, C, H, W)
