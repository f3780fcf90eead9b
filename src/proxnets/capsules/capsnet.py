"""CapsNet (Sabour, Frosst & Hinton 2017), readable top to bottom.

    x (B, C, H, W)
      -> Conv 9x9 (256) + ReLU                       (B, 256, H-8, W-8)
      -> PrimaryCapsules 9x9 stride 2, 32 x 8-D      (B, M, 8),  M = 32 * 6 * 6 = 1152 on 28x28
      -> CapsuleLinear + dynamic routing (3 passes)  (B, K, 16)  class capsules
      -> lengths |v_k| = class scores                (B, K)
    decoder: class capsule of the label (prediction at test time) -> FC 512 -> FC 1024 -> FC C*H*W

Loss = margin loss + 0.0005 * sum of squared reconstruction errors (:mod:`proxnets.capsules.losses`).
With the reference configuration on MNIST the model has 8,215,568 parameters (6,804,224 without
the decoder) as the paper counts them, plus the 160 of the official code's per-parent bias
(``bias=True``, the default; ``bias=False`` gives the paper's count). The defaults follow Sabour et al.'s
official code where it differs from the paper's text: gradients through every routing pass
(``gradient="all"``), the per-parent bias, the margin loss halved (``margin_scale=0.5``). ``backend="compiled"`` trains with the opt-in
``torch.compile`` routing of :mod:`proxnets.capsules.compiled` (default ``"eager"``). Any image size and channel count work by ``input_shape``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from proxnets.capsules.functional import capsule_length
from proxnets.capsules.layers import CapsuleLinear, PrimaryCapsules, ReconstructionDecoder, conv_output_size
from proxnets.capsules.losses import margin_loss, reconstruction_loss
from proxnets.capsules.routing import BACKENDS, RoutingInfo
from proxnets.utils.validation import check_choice, check_int, check_labels, check_number, check_tensor, fail

__all__ = [
    "CapsNetConfig", "CapsNet", "reference_config", "small_config", "capsnet_loss", "capsnet_scores", "random_shift",
    "routing_certificate",
]


@dataclasses.dataclass
class CapsNetConfig:
    """Hyper-parameters; the defaults are the paper's MNIST model."""

    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    conv_channels: int = 256  # Conv1: 256 filters 9x9, stride 1
    conv_kernel: int = 9
    primary_channels: int = 32  # 32 channels of 8-D capsules, 9x9 stride 2 -> 6x6x32 = 1152 capsules
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    class_dim: int = 16  # 16-D class capsules
    iterations: int = 3  # routing passes (Sabour et al.: 3)
    # Sabour et al.'s official code (each a switch; the paper's text is silent on the first two):
    gradient: str = "all"  # back-propagate through every routing pass (no stop-gradient); "last": final pass only
    bias: bool = True  # learned per-parent bias added to every s_j (the energy stays concave)
    margin_scale: float = 0.5  # the official code halves the margin loss; 1.0 is the paper's formula
    leaky: bool = False
    couplings: str = "routing"  # or "random": the random-coupling baseline of Paik et al. (no routing)
    routing: str = "standard"  # or "regularized": b <- (1 - lambda tau) b + lambda a (beyond the seed)
    tau: float | str | None = None  # regularized routing: entropic weight, "auto" = twice the convexity threshold
    step: float | None = None  # regularized routing: lambda (default 1 / tau)
    # routing kernel of the class-capsule layer: "compiled" = torch.compile graphs (docs/capsules.md; needs a
    # C++ compiler on CPU, Triton on CUDA; the toolchain is checked at the first untraced forward)
    backend: str = "eager"
    decoder_hidden: tuple[int, ...] = (512, 1024)
    reconstruction: bool = True  # decoder and its loss (0.25% vs 0.35% MNIST test error in the paper)
    reconstruction_scale: float = 5e-4  # times the *sum* of squared errors

    def __post_init__(self):
        shape = tuple(self.input_shape)
        if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
            fail("input_shape", "(C, H, W) of positive integers", self.input_shape)
        self.input_shape = shape
        self.decoder_hidden = tuple(self.decoder_hidden)
        check_int("num_classes", self.num_classes, low=2)
        check_number("reconstruction_scale", self.reconstruction_scale, low=0.0)
        check_number("margin_scale", self.margin_scale, low=0.0, low_inclusive=False)
        check_choice("backend", self.backend, BACKENDS)
        if min(self.primary_grid) < 1:
            fail("input_shape", "an image large enough for the two 9x9 convolutions", self.input_shape)

    @property
    def primary_grid(self) -> tuple[int, int]:
        _, H, W = self.input_shape
        h = conv_output_size(conv_output_size(H, self.conv_kernel, 1), self.primary_kernel, self.primary_stride)
        w = conv_output_size(conv_output_size(W, self.conv_kernel, 1), self.primary_kernel, self.primary_stride)
        return h, w

    @property
    def primary_capsules(self) -> int:
        h, w = self.primary_grid
        return self.primary_channels * h * w


def reference_config(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, **overrides) -> CapsNetConfig:
    """The paper's model (8,215,568 parameters on MNIST, + 160 for the official code's bias)."""
    return CapsNetConfig(input_shape=tuple(input_shape), num_classes=num_classes, **overrides)


def small_config(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, **overrides) -> CapsNetConfig:
    """A CPU-sized model (1,280,720 parameters on MNIST, 705,728 without decoder): same structure, fewer channels, smaller decoder."""
    base = dict(conv_channels=64, primary_channels=8, decoder_hidden=(256, 512))
    base.update(overrides)
    return CapsNetConfig(input_shape=tuple(input_shape), num_classes=num_classes, **base)


class CapsNet(nn.Module):
    def __init__(self, config: CapsNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or CapsNetConfig()
        C = cfg.input_shape[0]
        self.conv = nn.Conv2d(C, cfg.conv_channels, cfg.conv_kernel)
        self.primary = PrimaryCapsules(cfg.conv_channels, cfg.primary_channels, cfg.primary_dim,
                                       cfg.primary_kernel, cfg.primary_stride)
        self.classes = CapsuleLinear(cfg.primary_capsules, cfg.primary_dim, cfg.num_classes, cfg.class_dim,
                                     iterations=cfg.iterations, gradient=cfg.gradient, leaky=cfg.leaky,
                                     couplings=cfg.couplings, bias=cfg.bias, routing=cfg.routing, tau=cfg.tau,
                                     step=cfg.step, backend=cfg.backend)
        self.decoder = (ReconstructionDecoder(cfg.num_classes, cfg.class_dim, cfg.input_shape, cfg.decoder_hidden)
                        if cfg.reconstruction else None)

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(None, *self.config.input_shape), finite=False)
        h = torch.relu(self.conv(x))  # (B, conv_channels, H-8, W-8)
        return self.primary(h)  # (B, M, primary_dim)

    def forward(self, x: torch.Tensor, *, iterations: int | None = None, trace: bool = False) -> tuple[torch.Tensor, RoutingInfo]:
        """Class capsules ``(B, K, class_dim)`` and the routing info (``iterations`` overrides the config)."""
        check_tensor("x", x, shape=(None, *self.config.input_shape), like=self)
        u = self.primary_capsules(x)  # (B, M, 8)
        return self.classes(u, iterations=iterations, trace=trace)  # (B, K, 16)

    def reconstruct(self, v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output ``(B, C, H, W)`` from the capsule of ``labels`` (predicted class when None)."""
        if self.decoder is None:
            raise RuntimeError("reconstruct: expected a model built with reconstruction=True, got reconstruction=False")
        if labels is None:
            labels = capsule_length(v).argmax(1)
        return self.decoder(v, labels)

    def num_parameters(self, decoder: bool = True) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if decoder or not name.startswith("decoder."))


def capsnet_scores(model: CapsNet, x: torch.Tensor) -> torch.Tensor:
    """Class scores = class capsule lengths ``(B, K)``."""
    v, _ = model(x)
    return capsule_length(v)


def capsnet_loss(model: CapsNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """``margin_scale`` x margin loss + scaled reconstruction loss (decoder fed the true class), with both parts."""
    check_tensor("x", x, ndim=4, nonempty=True)
    check_labels("y", y, x.shape[0], model.config.num_classes)
    v, _ = model(x)  # (B, K, D)
    lengths = capsule_length(v)  # (B, K)
    margin = model.config.margin_scale * margin_loss(lengths, y)
    parts = {"margin": float(margin.detach())}
    loss = margin
    if model.decoder is not None and model.config.reconstruction_scale > 0:
        rec = reconstruction_loss(model.reconstruct(v, y), x, scale=model.config.reconstruction_scale)
        parts["reconstruction"] = float(rec.detach())
        loss = loss + rec
    return loss, parts


@torch.no_grad()
def routing_certificate(model: CapsNet, x: torch.Tensor, passes: int | None = None) -> dict[str, float | bool]:
    """A summary dict of the model's own (float32) routing on ``x``: energy, entropy, monotonicity.

    Kept for callers of the former API; the certificate of the protocol (``list[Certificate]``, float64
    re-routing with a derived round-off tolerance, used by the ``capsnet*`` Trainables and ``proxnets
    eval``) is :func:`proxnets.capsules.certify.certificate`. ``energy_non_increasing`` here uses a
    relative float32 tolerance of 1e-5; ``passes`` defaults to the model's routing passes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, info = model(x.to(device), iterations=passes, trace=True)
    model.train(was_training)
    e = info.energy.double()  # (T, B)
    rise = float(((e[1:] - e[:-1]) / e[:-1].abs().clamp_min(1e-12)).max()) if len(e) > 1 else 0.0
    summary = info.summary()
    return {
        "passes": info.iterations,
        "energy_first": summary["energy"][0],
        "energy_last": summary["energy"][-1],
        "max_relative_energy_increase": rise,
        "energy_non_increasing": rise <= 1e-5,
        "entropy_first": summary["entropy"][0],
        "entropy_last": summary["entropy"][-1],
        "max_coupling_last": summary["max_coupling"][-1],
    }


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """The paper's augmentation: shift each image by up to ``max_shift`` pixels, zero padding."""
    check_tensor("x", x, ndim=4)
    check_int("max_shift", max_shift, low=0)
    B, _, H, W = x.shape
    p = max_shift
    padded = nn.functional.pad(x, (p, p, p, p))  # (B, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * p + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None]).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(W)[None]).to(x.device)  # (B, W)
    idx = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
