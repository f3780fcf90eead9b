"""Reference image classifiers: OptEq, the MON baseline, and an explicit CNN of similar size.

All three share the shape ``conv stem -> body -> average pooling -> linear head``:

- :class:`OptEqClassifier`: body = one or more :class:`~proxnets.equilibrium.layers.OptEqConv2d`
  blocks, ``z* = prox_f(W^T W z* + U x + b)`` with ``|W|_2 <= target_norm < 1``.
- :class:`MONClassifier`: body = a monotone operator equilibrium layer (Winston & Kolter 2020),
  written from the paper: ``z* = relu(W z* + U x + b)`` with

      W = (1 - m) I - A^T A + B - B^T        (A, B convolutions),

  so that ``I - W = m I + A^T A - (B - B^T)`` is ``m``-strongly monotone; solved by forward-backward
  splitting ``z <- relu(z - alpha ((I - W) z - (U x + b)))``, which converges for
  ``alpha < 2 m / L^2`` with ``L = |I - W|_2``; we take ``alpha = m / L^2`` with ``L`` from the
  project's power iteration on ``I - W`` (persistent vector, one step per training forward).
- :class:`ExplicitCNN`: body = two explicit conv + ReLU layers.

``MODELS`` maps CLI names to factories returning :class:`proxnets.engine.Trainable`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.engine import Trainable, TrainConfig
from proxnets.equilibrium.implicit import BackwardConfig, equilibrium
from proxnets.equilibrium.layers import OptEqConv2d
from proxnets.equilibrium.solvers import EquilibriumInfo, check_solver_options
from proxnets.operators import LinearOperator, OperatorNormEstimator
from proxnets.utils.convergence import POLICIES
from proxnets.utils.validation import check_choice, check_int, check_number, fail

__all__ = [
    "OptEqConfig",
    "OptEqClassifier",
    "MONConfig",
    "MONConv2d",
    "MONClassifier",
    "ExplicitCNN",
    "count_parameters",
    "certify_opteq",
    "convergence_logger",
    "MODELS",
]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (buffers such as power-iteration vectors excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3 and all(isinstance(s, int) and s > 0 for s in input_shape)):
        fail("input_shape", "(C, H, W) of positive ints", input_shape)
    return tuple(input_shape)  # type: ignore[return-value]


def _stem(in_channels: int, channels: int) -> nn.Sequential:
    # stride 2 halves the grid on which the equilibrium is solved: 28x28 -> 14x14, 32x32 -> 16x16
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.ReLU())


def _head(channels: int, spatial: tuple[int, int], pool: int, num_classes: int) -> tuple[nn.Module, int]:
    h, w = spatial[0] // pool, spatial[1] // pool
    if h < 1 or w < 1:
        fail("pool", f"a pooling size <= the equilibrium grid {spatial}", pool)
    return nn.Linear(channels * h * w, num_classes), h * w


@dataclasses.dataclass
class OptEqConfig:
    """OptEq classifier hyper-parameters (defaults sized for MNIST-like data on a CPU)."""

    stem_channels: int = 16
    channels: int = 16  # channels of each equilibrium z
    blocks: int = 1  # OptEq blocks in sequence
    kernel_size: int = 3
    activation: str = "relu"
    l1: float = 0.0  # L1 prior on the equilibrium features (a shifted ReLU)
    target_norm: float = 0.97  # |W|_2 bound; < 1 makes G strongly convex
    solver: str = "accelerated"
    solver_options: dict = dataclasses.field(default_factory=dict)
    tol: float = 1e-3  # relative residual for training (tighten for certification)
    max_iter: int = 60
    backward: str = "implicit"
    backward_solver: str | None = None  # None: conjugate gradient on the symmetrized adjoint
    warm_start: bool = False
    policy: str = "warn"
    pool: int = 4  # average pooling before the head


class OptEqClassifier(nn.Module):
    """``x (B, C, H, W) -> stem (B, S, H/2, W/2) -> OptEq blocks (B, C', H/2, W/2) -> pool -> logits (B, K)``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, config: OptEqConfig | None = None):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.config = cfg = config or OptEqConfig()
        check_int("blocks", cfg.blocks, low=1)
        self.stem = _stem(c, cfg.stem_channels)
        spatial = ((h + 1) // 2, (w + 1) // 2)
        blocks, in_ch = [], cfg.stem_channels
        for _ in range(cfg.blocks):
            blocks.append(
                OptEqConv2d(
                    in_ch, cfg.channels, spatial, kernel_size=cfg.kernel_size, activation=cfg.activation, l1=cfg.l1,
                    target_norm=cfg.target_norm, solver=cfg.solver, solver_options=cfg.solver_options, tol=cfg.tol,
                    max_iter=cfg.max_iter, backward=cfg.backward, backward_solver=cfg.backward_solver,
                    warm_start=cfg.warm_start, policy=cfg.policy,
                )
            )
            in_ch = cfg.channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = cfg.pool
        self.head, _ = _head(cfg.channels, spatial, cfg.pool, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last equilibrium ``z*``: ``(B, C', H/2, W/2)``."""
        z = self.stem(x)  # (B, S, H/2, W/2)
        for block in self.blocks:
            z = block(z)  # (B, C', H/2, W/2)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)  # (B, C', H/2, W/2)
        z = F.avg_pool2d(z, self.pool)  # (B, C', H/2p, W/2p)
        return self.head(z.flatten(1))  # (B, K)

    def equilibrium_infos(self) -> list[EquilibriumInfo | None]:
        """The solver report of each block's last forward."""
        return [b.last_info for b in self.blocks]


@dataclasses.dataclass
class MONConfig:
    """MON baseline hyper-parameters."""

    stem_channels: int = 16
    channels: int = 16
    kernel_size: int = 3
    m: float = 1.0  # strong monotonicity of I - W
    alpha: float | None = None  # forward-backward step; None -> m / L^2 (estimated)
    solver: str = "fixed_point"  # plain iteration of the splitting map = forward-backward splitting
    tol: float = 1e-3
    max_iter: int = 60
    backward_solver: str = "anderson"
    policy: str = "warn"
    pool: int = 4


class MONConv2d(nn.Module):
    """Monotone operator equilibrium layer with convolutional ``A``, ``B``, ``U`` (module docstring)."""

    def __init__(self, in_channels: int, channels: int, spatial: Sequence[int], config: MONConfig | None = None):
        super().__init__()
        self.config = cfg = config or MONConfig()
        self.m = check_number("m", cfg.m, low=0.0, low_inclusive=False)
        if cfg.alpha is not None:
            check_number("alpha", cfg.alpha, low=0.0, low_inclusive=False)
        check_solver_options(cfg.solver, {})
        check_choice("policy", cfg.policy, POLICIES)
        pad = cfg.kernel_size // 2
        self.channels, self.spatial, self._pad = channels, tuple(spatial), pad
        self.U = nn.Conv2d(in_channels, channels, cfg.kernel_size, padding=pad)
        self.A = nn.Conv2d(channels, channels, cfg.kernel_size, padding=pad, bias=False)
        self.B = nn.Conv2d(channels, channels, cfg.kernel_size, padding=pad, bias=False)
        self.norm_estimator = OperatorNormEstimator((channels, *self.spatial), exact_iterations=200, tol=1e-5)
        self.register_buffer("estimated", torch.tensor(False))
        self.backward_config = BackwardConfig("implicit", solver=cfg.backward_solver, tol=cfg.tol, max_iter=cfg.max_iter)
        self.last_info: EquilibriumInfo | None = None

    def _conv(self, z, w):
        return F.conv2d(z, w, padding=self._pad)

    def _conv_t(self, z, w):
        return F.conv_transpose2d(z, w, padding=self._pad)

    def monotone_part(self, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(I - W) z = m z + A^T A z - B z + B^T z``."""
        return self.m * z + self._conv_t(self._conv(z, a), a) - self._conv(z, b) + self._conv_t(z, b)

    def step_size(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """``alpha = m / L^2`` with ``L = |I - W|_2`` by power iteration (or the configured alpha)."""
        if self.config.alpha is not None:
            return self.config.alpha
        shape = (1, self.channels, *self.spatial)
        ad, bd = a.detach(), b.detach()
        fwd = lambda v: self.monotone_part(v.reshape(shape), ad, bd)  # noqa: E731

        def adj(v):  # (I - W)^T = m I + A^T A + B - B^T
            v = v.reshape(shape)
            return self.m * v + self._conv_t(self._conv(v, ad), ad) + self._conv(v, bd) - self._conv_t(v, bd)

        op = LinearOperator(fwd, adj, shape, a.dtype, a.device)
        with torch.no_grad():
            if not bool(self.estimated):  # the first estimate runs to convergence
                lip = float(self.norm_estimator(op, mode="exact"))
                self.estimated.fill_(True)
            elif self.training:  # one warm-started step per training forward tracks the moving weights
                lip = float(self.norm_estimator(op, mode="cheap"))
            else:
                lip = float(op.forward(self.norm_estimator.v).norm())
        return self.m / max(lip, self.m) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inj = self.U(x)  # (B, C, H, W)
        a, b = self.A.weight, self.B.weight
        alpha = self.step_size(a, b)

        def T(z):  # forward-backward splitting map
            return torch.relu(z - alpha * (self.monotone_part(z, a, b) - inj))

        z, info = equilibrium(
            T, torch.zeros_like(inj), solver=self.config.solver, tol=self.config.tol, max_iter=self.config.max_iter,
            backward=self.backward_config, policy=self.config.policy, what="MONConv2d forward",
        )
        self.last_info = info
        return z


class MONClassifier(nn.Module):
    """``x -> stem -> MON layer (B, C, H/2, W/2) -> pool -> logits (B, K)``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, config: MONConfig | None = None):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        self.config = cfg = config or MONConfig()
        spatial = ((h + 1) // 2, (w + 1) // 2)
        self.stem = _stem(c, cfg.stem_channels)
        self.mon = MONConv2d(cfg.stem_channels, cfg.channels, spatial, cfg)
        self.pool = cfg.pool
        self.head, _ = _head(cfg.channels, spatial, cfg.pool, check_int("num_classes", num_classes, low=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mon(self.stem(x))  # (B, C, H/2, W/2)
        return self.head(F.avg_pool2d(z, self.pool).flatten(1))  # (B, K)

    def equilibrium_infos(self) -> list[EquilibriumInfo | None]:
        return [self.mon.last_info]


class ExplicitCNN(nn.Module):
    """``x -> stem -> (conv 3x3 + ReLU) x depth -> pool -> logits``: the explicit reference of similar size."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, stem_channels: int = 16, channels: int = 16,
                 depth: int = 2, pool: int = 4):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        check_int("depth", depth, low=1)
        spatial = ((h + 1) // 2, (w + 1) // 2)
        layers: list[nn.Module] = [_stem(c, stem_channels)]
        in_ch = stem_channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, channels, 3, padding=1), nn.ReLU()]
            in_ch = channels
        self.body = nn.Sequential(*layers)
        self.pool = pool
        self.head, _ = _head(channels, spatial, pool, check_int("num_classes", num_classes, low=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)  # (B, C, H/2, W/2)
        return self.head(F.avg_pool2d(z, self.pool).flatten(1))  # (B, K)


def certify_opteq(model: OptEqClassifier, x: torch.Tensor, *, tol: float = 1e-4, perturbations: int = 30,
                  seed: int = 0) -> list[dict]:
    """The optimization certificate of each OptEq block of ``model`` on inputs ``x``, one dict per block.

    Fields: ``residual`` (max relative residual ``|T(z) - z| / |T(z)|`` of the equilibrium solved
    to ``tol`` with Anderson), ``converged``; ``perturbations_not_better`` (fraction of random
    in-domain perturbations ``prox_f(z* + d)``, scales 1e-3..1e-1, with ``G >= G(z*)`` up to 1e-4
    relative); ``fixed_point_max_relative_increase_of_G`` (largest increase of the mean objective
    along the plain iteration, relative to ``|G|``: 0 in exact arithmetic); ``operator_norm`` (by
    power iteration to convergence) and ``target_norm``.
    """
    from proxnets.equilibrium.solvers import relative_residual, solve

    if not isinstance(model, OptEqClassifier):
        fail("model", "an OptEqClassifier", type(model).__name__, TypeError)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        h = model.stem(x)  # (B, S, H/2, W/2)
        for block in model.blocks:
            inj, w = block.injection(h), block.W.weight
            T = block.fixed_point_map(inj, w)
            G = lambda v: block.objective(v, inj=inj, w=w)  # noqa: E731
            z, info = solve("anderson", T, torch.zeros_like(inj), tol=tol, max_iter=1000)
            g_star = G(z)
            not_better = 0
            scales = (1e-3, 1e-2, 1e-1)
            for i in range(perturbations):
                d = scales[i % len(scales)] * torch.randn(z.shape, generator=generator)
                zd = block.activation.prox(z + d)  # inside the domain of f, else G = +inf trivially
                not_better += int(bool((G(zd) >= g_star - 1e-4 * g_star.abs()).all()))
            _, fp = solve("fixed_point", T, torch.zeros_like(inj), tol=tol, max_iter=1000, objective=G)
            obj = torch.tensor(fp.objectives, dtype=torch.float64)
            out.append({
                "residual": float(relative_residual(z, T(z)).max()),
                "converged": info.converged,
                "perturbations_not_better": not_better / max(perturbations, 1),
                "fixed_point_max_relative_increase_of_G": float((obj[1:] - obj[:-1]).clamp_min(0).max()
                                                                / obj.abs().max().clamp_min(1e-30)),
                "operator_norm": block.operator_norm(),
                "target_norm": block.target_norm,
            })
            h = z
    model.train(was_training)
    return out


def _opteq_certificate(model: OptEqClassifier, x: torch.Tensor) -> dict:
    """Flat form of :func:`certify_opteq` for ``proxnets eval``."""
    blocks = certify_opteq(model, x)
    if len(blocks) == 1:
        return blocks[0]
    return {f"block{i}.{k}": v for i, b in enumerate(blocks) for k, v in b.items()}


def convergence_logger(model: nn.Module, log=print, counts: dict | None = None, name: str | None = None):
    """A training callback (``fit(..., callbacks=[...])``) that counts the forward solves of
    ``model.equilibrium_infos()`` that missed their tolerance, and logs the count every epoch.

    ``counts`` (optional dict) receives ``solves``, ``unconverged`` and ``iterations``.
    """
    counts = counts if counts is not None else {}
    counts.update(solves=0, unconverged=0, iterations=0)

    def callback(event: str, state: dict) -> None:
        if event == "step_end":
            for info in model.equilibrium_infos():
                if info is not None:
                    counts["solves"] += 1
                    counts["unconverged"] += int(not info.converged)
                    counts["iterations"] += info.iterations
        elif event == "epoch_end":
            log(f"  {name or type(model).__name__}: {counts['unconverged']}/{counts['solves']} training solves above tol "
                f"(mean {counts['iterations'] / max(counts['solves'], 1):.1f} iterations)")

    return callback


def _config_from(cls, opts: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(opts) - known)
    if unknown:
        fail("options", f"keys among {sorted(known)}", unknown)
    return cls(**opts)


def _train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 5, "batch_size": 128, "lr": 2e-3, "optimizer": "adam", **overrides})


def _opteq(input_shape, num_classes, **opts) -> Trainable:
    return Trainable(OptEqClassifier(input_shape, num_classes, _config_from(OptEqConfig, opts)), config=_train_config(),
                     certificate=_opteq_certificate)


def _mon(input_shape, num_classes, **opts) -> Trainable:
    return Trainable(MONClassifier(input_shape, num_classes, _config_from(MONConfig, opts)), config=_train_config())


def _cnn(input_shape, num_classes, **opts) -> Trainable:
    return Trainable(ExplicitCNN(input_shape, num_classes, **opts), config=_train_config())


MODELS = {"opteq": _opteq, "opteq-mon": _mon, "opteq-cnn": _cnn}
