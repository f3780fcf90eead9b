"""Reference models of seed 004, readable top to bottom, with an unconstrained baseline each.

Classifier (the seed's CIFAR-10 shape; ``ClassifierConfig`` defaults): a norm-1 1x1 lift
``C_in -> width``, ``stages`` stages of ``blocks_per_stage`` blocks at constant shape, each stage
followed by a norm-1 1x1 conv doubling the channels and a 1-Lipschitz 2x2 average pooling, then a
1-Lipschitz global mean (or, ``head="flatten"``, the isometric flattening: small nets keep the
positions) and a norm-1 linear layer to the logits. Every piece is 1-Lipschitz, so
``lipschitz_bound(model) <= 1``. :class:`ResNetClassifier` has the same layout with plain layers
and ResNet blocks ``x + B sigma(A x)``.

Denoiser: lift ``C -> width`` by zero channels, ``depth`` averaged blocks, keep the first ``C``
channels. With ``P`` the lift (an isometry) and ``P^T`` the selection, ``P^T N P`` is
``alpha``-averaged when ``N`` is (``P^T P = I``). Baseline :class:`DnCNN`: ``x - R(x)`` with ``R``
a plain conv stack.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from proxnets.stable.blocks import MONOTONE_ACTIVATIONS, NonExpansiveBlock, ResNetBlock
from proxnets.stable.glue import (
    ChannelSelect, MaxMin, PairReflection, ScaledAvgPool2d, ScaledGlobalAvgPool, SpaceToDepth, ZeroChannelPad, lipschitz_conv2d, lipschitz_linear, orthogonal_conv1x1,
    orthogonal_linear,
)
from proxnets.stable.integrators import compose_averaged
from proxnets.stable.lipschitz import LipschitzBound, compose_bounds, lipschitz_bound
from proxnets.stable.norms import OperatorNorm
from proxnets.utils.validation import check_choice, check_int, check_tensor

__all__ = [
    "ClassifierConfig",
    "NonExpansiveClassifier",
    "ResNetClassifier",
    "DenoiserConfig",
    "AveragedDenoiser",
    "DnCNN",
    "num_parameters",
]


@dataclasses.dataclass
class ClassifierConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    width: int = 16  # lift 3 -> 16, doubled after every stage: 16, 32, 64 -> 128 (seed)
    stages: int = 3
    blocks_per_stage: int = 5
    kernel_size: int = 3
    activation: str = "leaky_relu"  # LeakyReLU(0.01), L = 1 (seed)
    method: str = "euler"
    time: float = 1.0  # T per block; the adaptive schedule takes ceil(T nu / 2) steps
    schedule: str = "adaptive"
    steps: int = 1  # fixed schedule only
    head: str = "global"  # "global": sqrt(HW)-scaled mean (seed); "flatten": keep the positions (small nets)
    # cap on the adaptive steps per block: past it h = 2 r / nu shrinks (h L |A|^2 <= 2 r kept, the time span cut), so a
    # step costs one field evaluation per block however training grows |A|; the seed's rule is uncapped (64). Picked on
    # validation (issue 19, mnist5k quick, 5 seeds): cap 1 certified 70.3% at 36/255 vs 69.4% uncapped and cap 2, at 1.44x
    # a ResNet step in training vs 3.78x uncapped (|A| reached 3.9, 8 steps per block)
    max_steps: int = 1
    train_norm: str = "power"  # seed: one power iteration per step; "bound": rigorous Fourier bound every step
    # lift / transition / head: "norm" (largest singular value rescaled to 1, seed) or "orthogonal" (Bjorck: all to 1)
    glue: str = "norm"
    # "maxmin": a MaxMin (GroupSort-2, 1-Lipschitz, gradient-norm preserving) after the lift and every transition;
    # "maxmin-all": also after every block (the blocks' own activation stays monotone, as their convexity needs);
    # "reflect": a PairReflection (a learned fold of each channel pair, MaxMin at initialization) where "maxmin" puts MaxMin,
    # and the 1x1 conv before it has no bias (the fold's offset takes its role: the parameter count is that of "maxmin")
    glue_activation: str = "none"
    # A: c -> block_features_ratio * c channels (a wider potential; 1 block with ratio 2 has the parameters of 2 with 1)
    block_features_ratio: int = 1
    # "bjorck": each block's kernel Bjorck-orthonormalized; "cayley": each block's A an exactly orthogonal circular
    # convolution (Cayley transform of its symbol); see NonExpansiveBlock.weight_param
    block_weight: str = "free"
    # "diagonal": each block's step scaled per feature by the certified T >= A A^T (NonExpansiveBlock.step_scale)
    block_step_scale: str = "scalar"
    block_bias_init: float = 0.0  # initial b of every block (NonExpansiveBlock.bias_init: b < 0 starts near the identity)
    # the layout at a given parameter count (issue 19): where the parameters sit, trunk or head.
    # stage_widths: channels of each stage and, last, after the last transition (stages + 1 values; default: width doubled
    # after every stage, the seed's); stage_blocks: blocks of each stage (default: blocks_per_stage each)
    stage_widths: tuple[int, ...] | None = None
    stage_blocks: tuple[int, ...] | None = None
    # the transitions' downsampling: "pool" (1x1 conv c -> c' then the norm-1 2x2 average pooling: 3/4 of the dimensions
    # dropped) or "s2d" (space-to-depth c -> 4c, a permutation, then the 1x1 conv 4c -> c': nothing dropped but by the conv)
    downsample: str = "pool"
    head_pool: int = 1  # > 1: a norm-1 k x k average pooling (zero-padded to a multiple of k) before the head: a smaller head

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.stage_widths) if self.stage_widths is not None else tuple(self.width * 2**i for i in range(self.stages + 1))

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(self.stage_blocks) if self.stage_blocks is not None else (self.blocks_per_stage,) * self.stages

    def validate(self) -> "ClassifierConfig":
        for name in ("in_channels", "image_size", "num_classes", "width", "stages", "kernel_size", "steps", "max_steps",
                     "block_features_ratio"):
            check_int(name, getattr(self, name), low=1)
        check_int("blocks_per_stage", self.blocks_per_stage, low=0)
        if self.image_size // 2**self.stages < 1:
            raise ValueError(f"image_size: expected >= 2**stages = {2**self.stages}, got {self.image_size}")
        check_choice("activation", self.activation, list(MONOTONE_ACTIVATIONS))
        check_choice("head", self.head, ["global", "flatten"])
        check_choice("glue", self.glue, ["norm", "orthogonal"])
        check_choice("glue_activation", self.glue_activation, ["none", "maxmin", "maxmin-all", "reflect"])
        check_choice("block_weight", self.block_weight, ["free", "bjorck", "cayley"])
        check_choice("block_step_scale", self.block_step_scale, ["scalar", "diagonal"])
        if self.block_weight == "cayley" and self.block_step_scale == "diagonal":
            raise ValueError("block_step_scale: expected 'scalar' with block_weight='cayley' (no kernel), got 'diagonal'")
        if self.block_weight == "cayley" and self.block_features_ratio != 1:
            raise ValueError(f"block_features_ratio: expected 1 with block_weight='cayley' (an orthogonal C -> C convolution), "
                             f"got {self.block_features_ratio}")
        if self.glue_activation != "none" and self.width % 2:
            raise ValueError(f"width: expected an even width with glue_activation={self.glue_activation!r}, got {self.width}")
        check_choice("downsample", self.downsample, ["pool", "s2d"])
        check_int("head_pool", self.head_pool, low=1)
        for name, n in (("stage_widths", self.stages + 1), ("stage_blocks", self.stages)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (tuple, list)) or len(v) != n):
                raise ValueError(f"{name}: expected a tuple of {n} integers (stages = {self.stages}), got {v!r}")
        for v in self.widths:
            check_int("stage_widths", v, low=1)
        for v in self.blocks:
            check_int("stage_blocks", v, low=0)
        if self.stage_widths is not None and self.glue_activation != "none" and any(v % 2 for v in self.widths):
            raise ValueError(f"stage_widths: expected even widths with glue_activation={self.glue_activation!r}, got {self.widths}")
        if self.downsample == "s2d" and self.image_size % 2**self.stages:
            raise ValueError(f"image_size: expected a multiple of 2**stages = {2**self.stages} with downsample='s2d', got {self.image_size}")
        return self

    @property
    def head_features(self) -> int:
        c, s = self.widths[-1], -(-(self.image_size // 2**self.stages) // self.head_pool)
        return c if self.head == "global" else c * s * s


class _Stack(nn.Module):
    """A sequence of layers with a composed Lipschitz bound."""

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        return compose_bounds(lipschitz_bound(m, mode) for m in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(None, self.config.in_channels, None, None), like=self)
        for m in self.layers:
            x = m(x)
        return x


class NonExpansiveClassifier(_Stack):
    """1-Lipschitz classifier: ``(B, C, S, S) -> (B, K)`` logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config.validate()
        s, widths = cfg.image_size, cfg.widths
        c = widths[0]
        ortho = cfg.glue == "orthogonal"

        reflect = cfg.glue_activation == "reflect"

        def conv1x1(cin: int, cout: int, size: int) -> nn.Module:  # followed by act(): no bias before a fold (its offset is one)
            if ortho:
                return orthogonal_conv1x1(cin, cout, bias=not reflect)
            return lipschitz_conv2d(cin, cout, 1, (size, size), bias=not reflect)

        def act(channels: int) -> list[nn.Module]:  # the glue's activation (1-Lipschitz), if any
            if reflect:
                return [PairReflection(channels)]
            return [MaxMin()] if cfg.glue_activation != "none" else []

        layers: list[nn.Module] = [conv1x1(cfg.in_channels, c, s), *act(c)]  # (B, w, S, S)
        for stage in range(cfg.stages):
            for _ in range(cfg.blocks[stage]):
                layers.append(
                    NonExpansiveBlock(
                        (c, s, s), cfg.block_features_ratio * c, kernel_size=cfg.kernel_size, activation=cfg.activation, method=cfg.method,
                        time=cfg.time, schedule=cfg.schedule, steps=cfg.steps, max_steps=cfg.max_steps, train_norm=cfg.train_norm,
                        weight_param=cfg.block_weight, step_scale=cfg.block_step_scale, bias_init=cfg.block_bias_init,
                    )
                )  # (B, c, s, s)
                layers += [MaxMin()] if cfg.glue_activation == "maxmin-all" else []
            c2 = widths[stage + 1]
            if cfg.downsample == "s2d":
                layers += [SpaceToDepth(2), conv1x1(4 * c, c2, s // 2), *act(c2)]  # (B, 4c, s/2, s/2) -> (B, c', s/2, s/2)
            else:
                layers += [conv1x1(c, c2, s), *act(c2), ScaledAvgPool2d(2)]  # (B, c', s, s) -> (B, c', s/2, s/2)
            c, s = c2, s // 2
        if cfg.head_pool > 1:
            layers.append(ScaledAvgPool2d(cfg.head_pool, pad=True))  # (B, c, ceil(s / k), ceil(s / k))
        layers.append(ScaledGlobalAvgPool() if cfg.head == "global" else nn.Flatten())  # (B, c) or (B, c s s)
        head = orthogonal_linear if ortho else lipschitz_linear
        layers.append(head(cfg.head_features, cfg.num_classes))  # (B, K)
        self.layers = nn.ModuleList(layers)


class ResNetClassifier(_Stack):
    """The same layout with plain layers and ResNet blocks (no constraint): ``(B, C, S, S) -> (B, K)``."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config.validate()
        if (cfg.stage_widths, cfg.stage_blocks, cfg.downsample, cfg.head_pool) != (None, None, "pool", 1):
            raise ValueError("config: expected the seed's layout for ResNetClassifier (stage_widths=None, stage_blocks=None, "
                             f"downsample='pool', head_pool=1), got {(cfg.stage_widths, cfg.stage_blocks, cfg.downsample, cfg.head_pool)}")
        s, c = cfg.image_size, cfg.width
        layers: list[nn.Module] = [_PlainConv(cfg.in_channels, c, 1, (s, s))]
        for _ in range(cfg.stages):
            for _ in range(cfg.blocks_per_stage):
                layers.append(ResNetBlock((c, s, s), kernel_size=cfg.kernel_size, activation=cfg.activation))
            layers.append(_PlainConv(c, 2 * c, 1, (s, s)))
            layers.append(ScaledAvgPool2d(2))
            c, s = 2 * c, s // 2
        layers.append(ScaledGlobalAvgPool() if cfg.head == "global" else nn.Flatten())
        layers.append(_PlainLinear(cfg.head_features, cfg.num_classes))
        self.layers = nn.ModuleList(layers)


def _plain_constant(norm: OperatorNorm, weight: torch.Tensor, mode: str) -> LipschitzBound:
    with torch.no_grad():
        if mode in ("upper", "rigorous"):
            nb = norm.upper_bound(weight)
            return LipschitzBound(nb.value, nb.rigorous, nb.method, nb.why)
        return LipschitzBound(float(norm.exact(weight.detach())), False, "power iteration",
                              why=f"mode {mode!r}: a power-iteration (lower) estimate of the norm")


class _PlainConv(nn.Conv2d):
    """An unconstrained conv that still reports its exact operator norm at its input size."""

    def __init__(self, cin: int, cout: int, k: int, in_hw: tuple[int, int]):
        super().__init__(cin, cout, k, padding=k // 2)
        self._norm = OperatorNorm("conv2d", (cin, *in_hw), padding=k // 2)

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        return _plain_constant(self._norm, self.weight, mode)


class _PlainLinear(nn.Linear):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout)
        self._norm = OperatorNorm("linear", (cin,))

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        return _plain_constant(self._norm, self.weight, mode)


@dataclasses.dataclass
class DenoiserConfig:
    channels: int = 3
    image_size: int = 40  # the size the operator norms are computed at (training patches)
    width: int = 64  # lift 3 -> 64 by zero channels (seed)
    depth: int = 10
    kernel_size: int = 3
    activation: str = "leaky_relu"
    method: str = "euler"
    time: float = 1.0
    averaged_margin: float | None = 0.1  # each step alpha <= 0.9
    schedule: str = "adaptive"
    max_steps: int = 64  # cap on the adaptive steps per block (beyond it h shrinks): bounds the cost
    # total sum_i n_i h_i nu_i over the blocks, split evenly; with Heun, 2 makes the denoiser firmly non-expansive
    stiffness_budget: float | None = None
    norm_size: str = "input"  # "any": step rule and certificate from the size-independent bound (any image size)
    train_norm: str = "power"  # seed: one power iteration per step; "bound": rigorous Fourier bound every step

    @classmethod
    def firm(cls, **overrides) -> "DenoiserConfig":
        """Heun blocks, no margin, stiffness budget 2, size-independent norms: a firmly non-expansive
        (1/2-averaged) denoiser at every image size, for Douglas-Rachford / ADMM without relaxation."""
        return cls(**{"method": "heun", "averaged_margin": None, "stiffness_budget": 2.0, "norm_size": "any", **overrides})

    def validate(self) -> "DenoiserConfig":
        for name in ("channels", "image_size", "width", "depth", "kernel_size"):
            check_int(name, getattr(self, name), low=1)
        if self.width < self.channels:
            raise ValueError(f"width: expected >= channels = {self.channels}, got {self.width}")
        check_choice("norm_size", self.norm_size, ["input", "any"])
        return self


class AveragedDenoiser(nn.Module):
    """``x -> P^T N(P x)``: ``(B, C, H, W) -> (B, C, H, W)``, ``alpha``-averaged (alpha < 1).

    With ``norm_size="input"`` the operator norms are those at ``config.image_size`` (zero-padded
    convolutions' norms grow slightly with the image, toward the sup of the symbol): the certificate is
    for that size. With ``norm_size="any"`` (:meth:`DenoiserConfig.firm`) evaluation steps and
    certificates use the size-independent bound: they hold at every image size.
    """

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = cfg = config.validate()
        shape = (cfg.width, cfg.image_size, cfg.image_size)
        self.lift = ZeroChannelPad(cfg.width)  # (B, w, H, W)
        self.blocks = nn.ModuleList(
            NonExpansiveBlock(
                shape, kernel_size=cfg.kernel_size, activation=cfg.activation, method=cfg.method,
                time=cfg.time, averaged_margin=cfg.averaged_margin, schedule=cfg.schedule, max_steps=cfg.max_steps,
                stiffness_budget=None if cfg.stiffness_budget is None else cfg.stiffness_budget / cfg.depth, norm_size=cfg.norm_size,
                train_norm=cfg.train_norm,
            )
            for _ in range(cfg.depth)
        )
        self.project = ChannelSelect(cfg.channels)  # (B, C, H, W)

    @property
    def in_channels(self) -> int:
        return self.config.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lift(x)  # (B, w, H, W)
        for block in self.blocks:
            z = block(z)  # (B, w, H, W)
        return self.project(z)  # (B, C, H, W)

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        return compose_bounds(lipschitz_bound(b, mode) for b in self.blocks)

    def averagedness(self, mode: str = "rigorous") -> float:
        """``alpha`` of the whole denoiser: the blocks' constants composed (the lift/select pair keeps it)."""
        return compose_averaged(b.averagedness(mode) for b in self.blocks)


class DnCNN(nn.Module):
    """DnCNN-style baseline (Zhang et al. 2017): ``x - R(x)``, ``R`` = conv-ReLU, ``depth - 2`` x
    (conv-BN-ReLU), conv. ``(B, C, H, W) -> (B, C, H, W)``; no Lipschitz control."""

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 20, batch_norm: bool = True):
        super().__init__()
        check_int("depth", depth, low=2)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.residual = nn.Sequential(*layers)
        self.channels = channels
        self.hyper = {"channels": channels, "width": width, "depth": depth, "batch_norm": batch_norm}

    @property
    def in_channels(self) -> int:
        return self.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.residual(x)  # (B, C, H, W)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
