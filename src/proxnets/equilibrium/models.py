"""Reference image classifiers: OptEq, the MON baseline, and an explicit CNN of similar size.

All three share the shape ``conv stem -> body -> average pooling -> linear head``:

- :class:`OptEqClassifier`: body = one or more :class:`~proxnets.equilibrium.layers.OptEqConv2d`
  blocks, ``z* = prox_f(W^T W z* + U x + b)`` with ``|W|_2 <= target_norm < 1``.
- :class:`MONClassifier`: body = a monotone operator equilibrium layer (Winston & Kolter 2020),
  written from the paper: ``z* = relu(W z* + U x + b)`` with

      W = (1 - m) I - A^T A + B - B^T        (A, B convolutions),

  so that ``I - W = m I + A^T A - (B - B^T)`` is ``m``-strongly monotone; solved by forward-backward
  splitting ``z <- relu(z - alpha ((I - W) z - (U x + b)))``, which converges for
  ``alpha < 2 m / L^2`` with ``L = |I - W|_2``; we take ``alpha = step_scale * m / L^2``
  (``step_scale`` in (0, 2); 1 minimizes the contraction bound, values near 2 are the largest safe
  steps and converge faster in practice) with ``L`` from the project's power iteration on ``I - W``
  (persistent vector, one step per training forward; a lower estimate, so keep a margin below 2:
  :func:`certify_mon` checks the step with a rigorous ``L``).
- :class:`ExplicitCNN`: body = two explicit conv + ReLU layers.
- :class:`DEQClassifier`: body = a plain DEQ layer ``z* = relu(W z* + U x + b)`` (``W`` an unconstrained
  convolution, the parameters of the OptEq body exactly), solved forward and backward (implicit
  differentiation) by TorchDEQ's own Anderson solver (``pip install torchdeq``): the DEQ baseline with its
  own solver. Nothing makes its equilibrium exist or be unique; its solver's report is passed on.

``MODELS`` maps CLI names to factories returning :class:`proxnets.engine.Trainable`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.certificates import Certificate
from proxnets.engine import Trainable, TrainConfig
from proxnets.equilibrium.implicit import BackwardConfig, _generic_adjoint, attach_adjoint_hook, equilibrium
from proxnets.equilibrium.splitting import CircularResolvent, DenseResolvent, IterativeResolvent, peaceman_rachford
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.equilibrium.layers import OptEqBase, OptEqConv2d
from proxnets.norm_bounds import norm_bound
from proxnets.equilibrium.solvers import EquilibriumInfo, check_solver_options
from proxnets.operators import (
    LinearOperator,
    OperatorNormEstimator,
)
from proxnets.utils.convergence import POLICIES
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "OptEqConfig",
    "OptEqClassifier",
    "MONConfig",
    "MONConv2d",
    "MONClassifier",
    "ExplicitCNN",
    "DEQConfig",
    "DEQClassifier",
    "count_parameters",
    "certify_opteq",
    "certify_mon",
    "certify_cnn",
    "certificate",
    "dense_matrix",
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
    blocks: int = 1  # OptEq layers: independent equilibria in sequence, or one joint equilibrium (``deep``)
    deep: str = "sequential"  # "sequential" | "joint": the blocks as one deep OptEq (DeepOptEqConv2d, one certificate)
    kernel_size: int = 3
    activation: str = "relu"
    l1: float = 0.0  # L1 prior on the equilibrium features (a shifted ReLU)
    target_norm: float = 0.97  # |W|_2 bound; < 1 makes G strongly convex
    solver: str = "safeguarded_anderson"  # (was "accelerated": 10.5 vs 14.5 training iterations, -16% CPU)
    solver_options: dict = dataclasses.field(default_factory=dict)
    tol: float = 1e-3  # relative residual for training (tighten for certification)
    max_iter: int = 60
    backward: str = "implicit"
    backward_solver: str | None = None  # None: conjugate gradient on the symmetrized adjoint
    warm_start: bool = False
    policy: str = "warn"
    pool: int = 4  # average pooling before the head
    eps: float = 0.0  # equilibrium selection G + eps/2 |z - a(x)|^2 (> 0 allows target_norm = 1)
    anchor: str = "linear"  # a(x) when eps > 0: "linear" (learned conv of the stem output) | "feedforward" | "zero"


def _joint_block(cfg: OptEqConfig, spatial: tuple[int, int]) -> nn.Module:
    """``cfg.blocks`` unit layers of ``cfg.channels`` as one joint equilibrium (:class:`DeepOptEqConv2d`)."""
    from proxnets.equilibrium.deep import DeepOptEqConv2d

    # options of the single layer that the joint layer does not implement: refused, never dropped
    unsupported = {"l1": (cfg.l1, 0.0), "warm_start": (cfg.warm_start, False),
                   "solver_options": (cfg.solver_options, {}), "backward_solver": (cfg.backward_solver, None)}
    for name, (value, default) in unsupported.items():
        if value != default:
            fail(name, f"{default!r} with deep='joint' (the joint layer has no {name} option)", value)
    return DeepOptEqConv2d(cfg.stem_channels, [cfg.channels] * cfg.blocks, spatial, kernel_size=cfg.kernel_size,
                           activation=cfg.activation, target_norm=cfg.target_norm, solver=cfg.solver, tol=cfg.tol,
                           max_iter=cfg.max_iter, backward=cfg.backward, policy=cfg.policy, eps=cfg.eps, anchor=cfg.anchor)


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
        if cfg.deep not in ("sequential", "joint"):
            fail("deep", "'sequential' or 'joint'", cfg.deep)
        if cfg.deep == "joint":
            self.blocks = nn.ModuleList([_joint_block(cfg, spatial)])
            self.pool = cfg.pool
            self.head, _ = _head(cfg.channels, spatial, cfg.pool, num_classes)
            return
        blocks, in_ch = [], cfg.stem_channels
        for _ in range(cfg.blocks):
            blocks.append(
                OptEqConv2d(
                    in_ch, cfg.channels, spatial, kernel_size=cfg.kernel_size, activation=cfg.activation, l1=cfg.l1,
                    target_norm=cfg.target_norm, solver=cfg.solver, solver_options=cfg.solver_options, tol=cfg.tol,
                    max_iter=cfg.max_iter, backward=cfg.backward, backward_solver=cfg.backward_solver,
                    warm_start=cfg.warm_start, policy=cfg.policy, eps=cfg.eps, anchor=cfg.anchor,
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
    alpha: float | None = None  # forward-backward step; None -> step_scale * m / L^2 (estimated)
    step_scale: float = 1.0  # in (0, 2): 2 is the limit of the safe forward-backward steps
    solver: str = "fixed_point"  # plain iteration of the splitting map = forward-backward splitting;
    # "peaceman_rachford": MON's own splitting (any step pr_alpha > 0; a linear solve per iteration)
    padding: str = "zeros"  # "circular": the convolutions wrap around (Winston & Kolter's FFT resolvent)
    pr_alpha: float = 1.0  # Peaceman-Rachford step
    # zero padding: the resolvent (I + alpha (I - W))^{-1} as an LU factor of the dense matrix ("dense", O(n^3)
    # per weight change) or by CG on the normal equations ("cg", warm-started at the circular-padding resolvent of
    # the same kernels), or by GMRES on K itself ("gmres", same start and error bound); the inner tolerance
    # (None: tol / 10) and cap; an unconverged inner solve makes the run unconverged
    pr_resolvent: str = "dense"
    pr_inner_tol: float | None = None
    pr_inner_max_iter: int = 100
    tol: float = 1e-3
    max_iter: int = 60
    backward_solver: str = "anderson"
    policy: str = "warn"
    pool: int = 4


def _fold_circular(y: torch.Tensor, p: int, dim: int) -> torch.Tensor:
    """The adjoint of circular padding by ``p`` along ``dim``: padded[i] = x[(i - p) mod n], so the
    border entries are added back onto the entries they copied."""
    if p == 0:
        return y
    n = y.shape[dim] - 2 * p
    x = y.narrow(dim, p, n).clone()
    x.narrow(dim, n - p, p).add_(y.narrow(dim, 0, p))
    x.narrow(dim, 0, p).add_(y.narrow(dim, n + p, p))
    return x


class MONConv2d(nn.Module):
    """Monotone operator equilibrium layer with convolutional ``A``, ``B``, ``U`` (module docstring)."""

    def __init__(self, in_channels: int, channels: int, spatial: Sequence[int], config: MONConfig | None = None):
        super().__init__()
        self.config = cfg = config or MONConfig()
        self.m = check_number("m", cfg.m, low=0.0, low_inclusive=False)
        if cfg.alpha is not None:
            check_number("alpha", cfg.alpha, low=0.0, low_inclusive=False)
        check_number("step_scale", cfg.step_scale, low=0.0, high=2.0, low_inclusive=False, high_inclusive=False)
        if cfg.solver != "peaceman_rachford":
            check_solver_options(cfg.solver, {})
        check_number("pr_alpha", cfg.pr_alpha, low=0.0, low_inclusive=False)
        check_choice("padding", cfg.padding, ("zeros", "circular"))
        check_choice("pr_resolvent", cfg.pr_resolvent, ("dense", "cg", "gmres"))
        inner_tol = cfg.tol / 10 if cfg.pr_inner_tol is None else check_number(
            "pr_inner_tol", cfg.pr_inner_tol, low=0.0, low_inclusive=False)
        check_int("pr_inner_max_iter", cfg.pr_inner_max_iter, low=1)
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
        # Peaceman-Rachford: the resolvent of I - W, refreshed when A, B or the step change
        self._resolvent = (CircularResolvent() if cfg.padding == "circular" else DenseResolvent()
                           if cfg.pr_resolvent == "dense" else IterativeResolvent(
                               inner_tol, cfg.pr_inner_max_iter, method="gmres" if cfg.pr_resolvent == "gmres" else "cg"))
        self._warm_start = CircularResolvent()  # "cg": the circular-padding resolvent as CG's starting point

    def _conv(self, z, w, circular: bool | None = None):
        if self.config.padding == "circular" if circular is None else circular:
            p = self._pad
            return F.conv2d(F.pad(z, (p, p, p, p), mode="circular"), w)
        return F.conv2d(z, w, padding=self._pad)

    def _conv_t(self, z, w, circular: bool | None = None):
        """The adjoint of :meth:`_conv` (circular: the full transposed convolution, its border folded back)."""
        if self.config.padding == "circular" if circular is None else circular:
            p = self._pad
            y = F.conv_transpose2d(z, w)  # (B, C, H + 2p, W + 2p)
            return _fold_circular(_fold_circular(y, p, -2), p, -1)
        return F.conv_transpose2d(z, w, padding=self._pad)

    def monotone_part(self, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      circular: bool | None = None) -> torch.Tensor:
        """``(I - W) z = m z + A^T A z - B z + B^T z`` (``circular``: override the configured padding)."""
        c = circular
        return self.m * z + self._conv_t(self._conv(z, a, c), a, c) - self._conv(z, b, c) + self._conv_t(z, b, c)

    def step_size(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """``alpha = step_scale * m / L^2`` with ``L = |I - W|_2`` by power iteration (or the configured alpha)."""
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
        return self.config.step_scale * self.m / max(lip, self.m) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inj = self.U(x)  # (B, C, H, W)
        a, b = self.A.weight, self.B.weight
        if self.config.solver == "peaceman_rachford":
            z, info = self._forward_pr(inj, a, b)
            self.last_info = info
            return z
        alpha = self.step_size(a, b)

        def T(z):  # forward-backward splitting map
            return torch.relu(z - alpha * (self.monotone_part(z, a, b) - inj))
        z, info = equilibrium(
            T, torch.zeros_like(inj), solver=self.config.solver, tol=self.config.tol, max_iter=self.config.max_iter,
            backward=self.backward_config, policy=self.config.policy, what="MONConv2d forward",
        )
        self.last_info = info
        return z


    def resolvent(self, a: torch.Tensor, b: torch.Tensor, alpha: float):
        """``y -> (I + alpha (I - W))^{-1} y`` (:mod:`~proxnets.equilibrium.splitting`): FFT blocks for circular
        padding, an LU factor of the dense matrix for zero padding; refreshed only when A, B or alpha change."""
        ad, bd = a.detach(), b.detach()
        key = (ad.data_ptr(), ad._version, bd.data_ptr(), bd._version, ad.dtype)
        shape = (self.channels, *self.spatial)
        apply_m = lambda v: self.monotone_part(v, ad, bd)  # noqa: E731
        if isinstance(self._resolvent, CircularResolvent):
            return self._resolvent.update(apply_m, shape, alpha, key, dtype=ad.dtype, device=ad.device)
        if isinstance(self._resolvent, IterativeResolvent):
            start = self._warm_start.update(lambda v: self.monotone_part(v, ad, bd, circular=True), shape, alpha, key,
                                            dtype=ad.dtype, device=ad.device)
            return self._resolvent.update(apply_m, lambda v: self.monotone_part_t(v, ad, bd), alpha, self.m, start)
        with torch.no_grad():
            a64, b64 = ad.double(), bd.double()
            return self._resolvent.update(lambda: dense_matrix(lambda v: self.monotone_part(v, a64, b64), shape)
                                          .to(ad.dtype), alpha, key)

    def monotone_part_t(self, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(I - W)^T v = m v + A^T A v + B v - B^T v``."""
        return self.m * v + self._conv_t(self._conv(v, a), a) + self._conv(v, b) - self._conv_t(v, b)

    def _forward_pr(self, inj: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """Peaceman-Rachford forward and backward (Winston & Kolter 2020, Sec. 4).

        Forward: z* = relu(u*) from :func:`peaceman_rachford` (no autograd). At its fixed point
        ``u* = z* - alpha (M z* - c)``, so one recorded step ``T(z) = relu(z - alpha (M z - c))`` at the same
        ``alpha`` (any alpha > 0: no step restriction is needed to differentiate) connects z* to A, B, U.
        Backward: with ``D = 1[u* > 0]`` the adjoint ``g = dL/dc`` solves the linear monotone inclusion
        ``0 in M^T g - v + N(g)`` (``N`` the normal cone of ``{g : (1 - D) g = 0}``, prox = multiply by D),
        by Peaceman-Rachford with the transposed resolvent; the hook returns ``v + g / alpha - M^T g``, the
        vector whose pull-back through T gives exactly ``g`` on c and ``-g^T (dM) z*`` on A, B (derivation
        in docs/opteq.md). Both solves' flags go through ``policy``."""
        cfg, what = self.config, "MONConv2d forward (peaceman_rachford)"
        alpha = cfg.pr_alpha
        if self.backward_config.mode != "implicit":
            fail("backward_config.mode", "'implicit' with solver 'peaceman_rachford'", self.backward_config.mode)
        with torch.no_grad():
            res = self.resolvent(a, b, alpha)
            z_star, u_star, info = peaceman_rachford(res, inj.detach(), alpha, tol=cfg.tol, max_iter=cfg.max_iter)
        handle_nonconvergence(info, cfg.policy, what)
        if not torch.is_grad_enabled():
            return z_star, info
        z = torch.relu(z_star - alpha * (self.monotone_part(z_star, a, b) - inj))  # = z* up to the tolerance
        mask = (u_star > 0).to(u_star.dtype)
        ad, bd, bcfg = a.detach(), b.detach(), self.backward_config

        def adjoint(v: torch.Tensor):
            g, _, binfo = peaceman_rachford(functools.partial(res, transpose=True), v, alpha, prox=lambda w: mask * w,
                                            tol=bcfg.tol, max_iter=bcfg.max_iter)
            return v + g / alpha - self.monotone_part_t(g, ad, bd), binfo

        return attach_adjoint_hook(z, adjoint, info, cfg.policy, what), info


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


@dataclasses.dataclass
class DEQConfig:
    """DEQ baseline hyper-parameters (TorchDEQ's solver names and stopping rule)."""

    stem_channels: int = 16
    channels: int = 16
    kernel_size: int = 3
    solver: str = "anderson"  # TorchDEQ's f_solver and b_solver
    tol: float = 1e-3  # TorchDEQ's relative stop: |f(z) - z| / |f(z)| per sample
    max_iter: int = 60
    policy: str = "warn"
    pool: int = 4
    init_norm: float | None = 0.9  # |W|_2 at initialization (power estimate); None: PyTorch's default init


class DEQClassifier(nn.Module):
    """``x -> stem -> z* = relu(W z* + U x + b) (B, C, H/2, W/2) -> pool -> logits``, TorchDEQ's solver."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, config: DEQConfig | None = None):
        super().__init__()
        try:
            from torchdeq import get_deq
        except ImportError as err:  # an optional dependency (the "bench" extra)
            raise ImportError("DEQClassifier: expected the package torchdeq (pip install torchdeq), got none") from err
        c, h, w = _check_input_shape(input_shape)
        self.config = cfg = config or DEQConfig()
        check_number("tol", cfg.tol, low=0.0, low_inclusive=False)
        check_int("max_iter", cfg.max_iter, low=1)
        check_choice("solver", cfg.solver, ("anderson", "broyden", "fixed_point_iter"))
        check_choice("policy", cfg.policy, POLICIES)
        spatial = ((h + 1) // 2, (w + 1) // 2)
        pad = cfg.kernel_size // 2
        self.stem = _stem(c, cfg.stem_channels)
        self.U = nn.Conv2d(cfg.stem_channels, cfg.channels, cfg.kernel_size, padding=pad)
        self.W = nn.Conv2d(cfg.channels, cfg.channels, cfg.kernel_size, padding=pad, bias=False)
        if cfg.init_norm is not None:
            # start contractive, like OptEq's clipped W (PyTorch's default init gives |W|_2 > 1 here and the
            # forward solves then stall at the cap); nothing keeps it so during training
            check_number("init_norm", cfg.init_norm, low=0.0, low_inclusive=False)
            est = float(norm_bound(self.W, (cfg.channels, *spatial), method="power").value)
            with torch.no_grad():
                self.W.weight.mul_(cfg.init_norm / est)
        self.deq = get_deq(f_solver=cfg.solver, b_solver=cfg.solver, f_max_iter=cfg.max_iter, b_max_iter=cfg.max_iter,
                           f_tol=cfg.tol, b_tol=cfg.tol, f_stop_mode="rel", b_stop_mode="rel", ift=True)
        self.pool = cfg.pool
        self.head, _ = _head(cfg.channels, spatial, cfg.pool, check_int("num_classes", num_classes, low=2))
        self.last_info: EquilibriumInfo | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        inj = self.U(self.stem(x))  # (B, C, H/2, W/2)
        z_out, stats = self.deq(lambda z: torch.relu(self.W(z) + inj), torch.zeros_like(inj))
        rel = stats["rel_lowest"].detach() if "rel_lowest" in stats else torch.tensor([math.inf])
        worst = float(rel.max())
        converged = math.isfinite(worst) and worst <= self.config.tol
        self.last_info = EquilibriumInfo(
            iterations=int(stats["nstep"].max()) if "nstep" in stats else 0, converged=converged, residuals=[worst],
            solver=f"torchdeq:{self.config.solver}", tol=self.config.tol, diverged=not math.isfinite(worst),
            stop_reason="tol" if converged else "nonfinite" if not math.isfinite(worst) else "max_iter")
        from proxnets.utils.convergence import handle_nonconvergence

        handle_nonconvergence(self.last_info, self.config.policy, "DEQClassifier forward (TorchDEQ)")
        return z_out[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.avg_pool2d(self.features(x), self.pool).flatten(1))  # (B, K)

    def equilibrium_infos(self) -> list[EquilibriumInfo | None]:
        return [self.last_info]


class ExplicitCNN(nn.Module):
    """``x -> stem -> (conv 3x3 + ReLU) x depth -> pool -> logits``: the explicit reference of similar size."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, stem_channels: int = 16, channels: int = 16,
                 depth: int = 2, pool: int = 4):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        self.input_shape = (c, h, w)
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


# --- certificates -------------------------------------------------------------------------
# Every number below that is called a bound is proved to be one: operator norms come from the dense
# float64 matrix of the operator the layer applies (exact up to a stated round-off margin), never
# from the parametrization's own (clipped, power-iteration) reading.

_EPS64 = torch.finfo(torch.float64).eps


def dense_matrix(apply, in_shape: Sequence[int], *, chunk: int = 512) -> torch.Tensor:
    """The float64 matrix of a linear map ``apply: (B, *in_shape) -> (B, ...)`` that acts on batches,
    built by pushing the identity through it ``chunk`` columns at a time (one batched call per chunk)."""
    n = math.prod(in_shape)
    cols = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            basis = torch.zeros(k, n, dtype=torch.float64)
            basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
            out = apply(basis.reshape(k, *in_shape))
            if out.dtype != torch.float64:
                fail("apply", "a map computing in float64", out.dtype)
            cols.append(out.reshape(k, -1))
    return torch.cat(cols).T  # (n_out, n)


def _norm(target, in_shape=None) -> tuple[float, bool, str, str]:
    """``(value, rigorous, method, why)``: the shared rigorous upper bound of ``|A|_2``
    (:func:`proxnets.norm_bounds.norm_bound`, ``"auto"``: Fourier symbol or Gram iteration when tight,
    else the exact dense SVD or the certified Cholesky correction)."""
    nb = norm_bound(target, in_shape)
    return float(nb.value), nb.rigorous, nb.method, nb.why


def _block_norm(block: OptEqBase) -> tuple[float, bool, str, str]:
    """Bound of ``|W|_2`` of the operator ``z -> W z`` that ``block`` applies (its parametrized weight)."""
    if isinstance(block, OptEqConv2d):
        return _norm(block.W, (block.channels, *block.spatial))
    return _norm(block.W)


def _float64_residual(T64, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``|T(z) - z|`` and ``|T(z) - z| / |T(z)|`` in float64 (non-finite stays non-finite)."""
    z64 = z.detach().double()
    tz = T64(z64.clone())
    bsz = z64.shape[0]
    absolute = torch.linalg.vector_norm((tz - z64).reshape(bsz, -1), dim=1)
    return absolute, absolute / (torch.linalg.vector_norm(tz.reshape(bsz, -1), dim=1) + 1e-9)


def _solve_flag(info, what: str) -> str:
    """The reason a solve's result is not rigorous ('' when it converged)."""
    if info is None or info.converged:
        return ""
    last = info.residuals[-1] if info.residuals else float("nan")
    return f"{what} did not converge ({info.iterations} iterations, last residual {last:.2e} > tol {info.tol:.1e})"


def _residual_certificates(prefix: str, T64, z: torch.Tensor, info, tol: float, q: float, q_rigorous: bool,
                           distance_tol: float, what: str, distance_name: str = "distance_to_minimizer") -> list[Certificate]:
    """Residual (with the solver's flag) and the a-posteriori distance bound of a ``q``-contraction.

    For a map T with Lipschitz constant ``q < 1`` and fixed point ``z*``,
    ``|z - z*| <= |z - T(z)| + |T(z) - T(z*)| <= r + q |z - z*|``, hence

        |z - z*| <= |T(z) - z| / (1 - q),

    reported relative to ``|T(z)|`` (max over the batch).
    """
    absolute, relative = _float64_residual(T64, z)
    finite = bool(torch.isfinite(relative).all())
    r_max = float(relative.max()) if finite else math.inf
    why = "; ".join(s for s in (_solve_flag(info, what), "" if finite else "non-finite iterate") if s)
    certs = [Certificate(f"{prefix}equilibrium_residual", r_max, tol, "<=", rigorous=not why, why=why,
                         method=f"|T(z)-z|/|T(z)| in float64 after {info.solver} ({info.iterations} iterations)",
                         details={"solver_converged": info.converged, "iterations": info.iterations})]
    if q < 1 and finite:
        dist = r_max / (1 - q)
        why_d = "; ".join(s for s in (why, "" if q_rigorous else "the contraction factor is an estimate") if s)
        certs.append(Certificate(f"{prefix}{distance_name}", dist, distance_tol, "<=", rigorous=not why_d,
                                 why=why_d, method="a posteriori |T(z)-z| / ((1 - q) |T(z)|)",
                                 details={"q": q, "max_absolute_distance_bound": float(absolute.max()) / (1 - q)}))
    else:
        certs.append(Certificate(f"{prefix}{distance_name}", math.inf, distance_tol, "<=", rigorous=False,
                                 why=f"contraction factor q = {q:.4g} >= 1 (or non-finite residual): no a-posteriori bound",
                                 method="a posteriori |T(z)-z| / ((1 - q) |T(z)|)", details={"q": q}))
    return certs


def _operator_norm_certificates(prefix: str, block: OptEqBase, norm: float, rigorous: bool, method: str, why: str,
                                details: dict | None = None) -> list[Certificate]:
    """``|W|_2`` of the applied operator against what the layer's theory needs.

    Plain OptEq: ``operator_norm < 1`` (G strongly convex, one equilibrium). With selection (``eps > 0``):
    ``operator_norm <= 1`` (G convex; its equilibria may form a set, and the selected point approximates
    the projection of the anchor onto that set only if G is convex; at an active bound ``|W|_2 = 1`` a
    rigorous upper bound carries a round-off margin above 1 and cannot prove it) and
    ``strong_convexity``: ``1 + eps - w^2 > 0`` with ``w`` the same upper bound, so ``G_eps`` has exactly one
    minimizer, the selected equilibrium (the uniqueness comes from the eps term, not from W)."""
    details = {"target_norm": block.target_norm, "eps": block.eps, **(details or {})}
    if block.eps == 0:
        return [Certificate(f"{prefix}operator_norm", norm, 1.0, "<", rigorous=rigorous, why=why, method=method,
                            details=details)]
    return [
        Certificate(f"{prefix}operator_norm", norm, 1.0, "<=", rigorous=rigorous, why=why,
                    method=method + "; G convex, its equilibria need not be unique", details=details),
        Certificate(f"{prefix}strong_convexity", block.strong_convexity(norm), 0.0, ">", rigorous=rigorous, why=why,
                    method="1 + eps - |W|_2^2 (upper bound of |W|_2): G + eps/2 |z - a|^2 strongly convex, one "
                           "selected equilibrium", details={"eps": block.eps}),
    ]


def _distance_name(block: OptEqBase) -> str:
    """``distance_to_minimizer`` (of G), or with selection ``distance_to_selected_equilibrium`` (the unique
    minimizer of ``G + eps/2 |z - a|^2``; no bound to the ``eps -> 0`` limit is claimed)."""
    return "distance_to_selected_equilibrium" if block.eps > 0 else "distance_to_minimizer"


def _backward_certificate(prefix: str, layer_info) -> list[Certificate]:
    """The implicit backward solve of the layer's last training step, when there was one."""
    binfo = getattr(layer_info, "backward", None) if layer_info is not None else None
    if binfo is None:
        return []
    last = binfo.residuals[-1] if binfo.residuals else math.inf
    why = _solve_flag(binfo, "the implicit backward (adjoint) solve of the last training step")
    return [Certificate(f"{prefix}implicit_backward_residual", float(last), binfo.tol, "<=", rigorous=not why, why=why,
                        method=f"adjoint residual reported by {binfo.solver}", details={"iterations": binfo.iterations})]


def _parametrization_estimate(block: nn.Module) -> float:
    """The norm parametrization's own estimate of the unconstrained norm, of the weight it receives (after any
    earlier parametrization in the chain, e.g. the joint layer's block mask)."""
    chain = block.W.parametrizations.weight
    w = chain.original
    for p in chain:
        if hasattr(p, "sigma"):
            return float(p.sigma(w))
        w = p(w)
    fail("block", "a layer whose weight carries OptEq's norm parametrization", type(block).__name__, TypeError)


def certify_opteq(model: OptEqClassifier, x: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 1000,
                  distance_tol: float = 1e-2, perturbations: int = 0, seed: int = 0) -> list[Certificate]:
    """The optimization certificate of each OptEq block of ``model`` on inputs ``x``.

    Per block (names prefixed ``block<i>.`` when there are several):

    - ``operator_norm``: a rigorous upper bound of ``|W|_2`` of the weight the layer *applies* (its
      operator at the layer's input size, :func:`proxnets.norm_bounds.norm_bound`), ``< 1`` (strong convexity
      of ``G``). Measured independently of the parametrization: a weight scaled past it fails.
    - ``equilibrium_residual``: ``max_i |T(z) - z| / |T(z)|`` in float64 after an Anderson solve to
      ``tol / 2`` (float32 round-off of the solver's own residual then cannot decide the verdict),
      ``<= tol``; not rigorous, with the reason, when that solve did not converge.
    - ``distance_to_minimizer``: ``T`` is a ``|W|_2^2``-contraction (``prox_f`` of a convex f is
      nonexpansive and ``|W^T W|_2 = |W|_2^2``), so ``|z - z*| / |T(z)| <= r / (1 - |W|_2^2)``,
      ``<= distance_tol``; infinite (does not hold) when the bound on ``|W|_2`` is ``>= 1``.
    - ``implicit_backward_residual`` (only when the block's last forward ran an implicit backward):
      the adjoint solve's residual and convergence flag.
    - ``perturbations_not_better`` (only when ``perturbations > 0``; a random sample, never rigorous):
      the fraction of in-domain perturbations ``prox_f(z + d)`` with ``G >= G(z) - 1e-4 |G(z)|``.
    """
    from proxnets.equilibrium.solvers import solve

    if not isinstance(model, OptEqClassifier):
        fail("model", "an OptEqClassifier", type(model).__name__, TypeError)
    check_number("tol", tol, low=0.0, low_inclusive=False)
    check_number("distance_tol", distance_tol, low=0.0, low_inclusive=False)
    check_int("perturbations", perturbations, low=0)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    certs: list[Certificate] = []
    try:
        with torch.no_grad():
            h = model.stem(x)  # (B, S, H/2, W/2)
            for i, block in enumerate(model.blocks):
                prefix = f"block{i}." if len(model.blocks) > 1 else ""
                inj, w = block.injection(h), block.W.weight.detach()  # the weight the layer applies
                T = block.fixed_point_map(inj, w)
                z, info = solve("anderson", T, torch.zeros_like(inj), tol=tol / 2, max_iter=max_iter)
                w64 = w.double()
                T64 = block.fixed_point_map(inj.double(), w64)
                norm, rig, method, why = _block_norm(block)
                estimate = _parametrization_estimate(block)
                certs += _operator_norm_certificates(prefix, block, norm, rig, method, why,
                                                     {"parametrization_estimate_of_unconstrained_norm": estimate})
                certs += _residual_certificates(prefix, T64, z, info, tol, block.contraction(norm), rig, distance_tol,
                                                "the certificate's Anderson solve", _distance_name(block))
                certs += _backward_certificate(prefix, block.last_info)
                if perturbations:
                    G = lambda v: block.objective(v, inj=inj, w=w)  # noqa: E731
                    g_star = G(z)
                    not_better = 0
                    scales = (1e-3, 1e-2, 1e-1)
                    for k in range(perturbations):
                        d = scales[k % len(scales)] * torch.randn(z.shape, generator=generator)
                        zd = block.activation.prox(z + d)  # inside the domain of f, else G = +inf trivially
                        not_better += int(bool((G(zd) >= g_star - 1e-4 * g_star.abs()).all()))
                    certs.append(Certificate(f"{prefix}perturbations_not_better", not_better / perturbations, 1.0, ">=",
                                             rigorous=False, why=f"{perturbations} random perturbations: a sample, not a proof",
                                             method="G(prox_f(z + d)) >= G(z), |d| at scales 1e-3..1e-1"))
                h = z
    finally:
        model.train(was_training)
    return certs


def _circular_spectrum(layer: "MONConv2d", a64: torch.Tensor, b64: torch.Tensor) -> tuple[float, float]:
    """``(mu, L)``: a lower bound of ``lambda_min((M + M^T)/2)`` and an upper bound of ``|M|_2`` for the
    circular-padding MON, ``M = I - W``. The unitary DFT block-diagonalizes ``M`` into the ``H W`` blocks
    ``M_hat(omega)`` (C x C, the DFT of the impulse responses), so the spectrum is the union of the blocks'.
    Margins: the float64 FFT error ``|E|_F <= 5 log2(HW) eps |M_hat|_F`` (Higham, Thm 24.2; taken 20x) with
    ``|M_hat|_F = sqrt(HW) |resp|_F`` (Parseval), the convolutions' round-off (``(9 C + 4) eps`` relative per
    entry, folded into the same 20x), and the eigensolver's backward error ``10 C eps |block|_F``."""
    c, (h, w) = layer.channels, layer.spatial
    delta = torch.zeros(c, c, h, w, dtype=torch.float64)
    delta[torch.arange(c), torch.arange(c), 0, 0] = 1.0
    resp = layer.monotone_part(delta, a64, b64)  # (C_in, C_out, H, W)
    m_hat = torch.fft.fft2(resp).permute(2, 3, 1, 0).reshape(h * w, c, c)  # (HW, C_out, C_in)
    resp_f = float(resp.norm())
    err = 20 * (5 * math.ceil(math.log2(max(h * w, 2))) + 9 * c + 4) * _EPS64 * math.sqrt(h * w) * resp_f
    solver_err = 10 * c * _EPS64 * float(torch.linalg.matrix_norm(m_hat).max())
    mu = float(torch.linalg.eigvalsh((m_hat + m_hat.mH) / 2).min()) - err - solver_err
    lip = float(torch.linalg.matrix_norm(m_hat, 2).max()) + err + solver_err
    return mu, lip


def certify_mon(model: MONClassifier, x: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 2000,
                distance_tol: float = 1e-2) -> list[Certificate]:
    """The certificate of the MON baseline (Winston & Kolter 2020) on inputs ``x``.

    - ``monotonicity``: a rigorous lower bound ``mu`` of ``lambda_min((M + M^T) / 2)``, ``M = I - W``
      (dense float64 matrix, eigensolver minus the round-off margin), ``>= m (1 - 1e-8)``: the strong
      monotonicity ``m + lambda_min(A^T A) >= m`` the parametrization promises (``A^T A`` may be
      singular, so the relative 1e-8 allows for the round-off margin of a bound that is exactly ``m``).
    - ``step_contraction``: the forward-backward map ``z -> relu(z - alpha (M z - U x - b))`` with the
      layer's step ``alpha`` is a ``q``-contraction, ``q^2 = 1 - 2 alpha mu + alpha^2 L^2``
      (``L`` a rigorous upper bound of ``|M|_2``), ``< 1``: the step is safe (``alpha < 2 mu / L^2``).
    - ``equilibrium_residual`` and ``distance_to_minimizer`` (``r / (1 - q)``) as for OptEq, after the
      layer's own solver (forward-backward iteration) to ``tol / 2``, with its convergence flag;
      ``implicit_backward_residual`` when the last forward had a backward solve.
    """
    from proxnets.equilibrium.solvers import solve

    if not isinstance(model, MONClassifier):
        fail("model", "a MONClassifier", type(model).__name__, TypeError)
    check_number("tol", tol, low=0.0, low_inclusive=False)
    layer = model.mon
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a64, b64 = layer.A.weight.detach().double(), layer.B.weight.detach().double()
            if layer.config.padding == "circular":  # the DFT block-diagonalizes M: C x C blocks, exact spectrum
                mu, lip = _circular_spectrum(layer, a64, b64)
                lip_rigorous, lip_why = True, ""
                method = "exact: float64 DFT blocks (circular padding), eigensolver + FFT and round-off margins"
            else:
                mat = dense_matrix(lambda v: layer.monotone_part(v, a64, b64), (layer.channels, *layer.spatial))
                n = mat.shape[0]
                # eigvalsh is backward stable: its eigenvalues are those of S + E, |E|_2 <= c n eps |S|_2
                mu = float(torch.linalg.eigvalsh((mat + mat.T) / 2)[0]) - 10 * n * _EPS64 * float(mat.norm())
                lip, lip_rigorous, _, lip_why = _norm(mat)
                method = "exact: float64 dense matrix, symmetric eigensolver + round-off margin"
            inj = layer.U(model.stem(x))
            a, b = layer.A.weight, layer.B.weight
            alpha = layer.step_size(a, b)
            T = lambda z: torch.relu(z - alpha * (layer.monotone_part(z, a, b) - inj))  # noqa: E731
            inj64 = inj.double()
            T64 = lambda z: torch.relu(z - alpha * (layer.monotone_part(z, a64, b64) - inj64))  # noqa: E731
            if layer.config.solver == "peaceman_rachford":  # its own solver; T64 below checks its z
                z, _, info = peaceman_rachford(layer.resolvent(a, b, layer.config.pr_alpha), inj,
                                               layer.config.pr_alpha, tol=tol / 2, max_iter=max_iter)
            else:
                z, info = solve(layer.config.solver, T, torch.zeros_like(inj), tol=tol / 2, max_iter=max_iter)
            q2 = 1 - 2 * alpha * mu + alpha**2 * lip**2
            q = math.sqrt(max(q2, 0.0))
            certs = [
                Certificate("monotonicity", mu, layer.m * (1 - 1e-8), ">=", method=method,
                            details={"m": layer.m, "lipschitz_upper_bound": lip}),
                Certificate("step_contraction", q, 1.0, "<", rigorous=lip_rigorous, why=lip_why,
                            method="q^2 = 1 - 2 alpha mu + alpha^2 L^2",
                            details={"alpha": alpha, "safe_step_limit": 2 * mu / lip**2}),
            ]
            certs += _residual_certificates("", T64, z, info, tol, q, lip_rigorous, distance_tol,
                                            f"the certificate's {layer.config.solver} solve")
            certs += _backward_certificate("", layer.last_info)
    finally:
        model.train(was_training)
    return certs


def certify_cnn(model: "ExplicitCNN", x: torch.Tensor) -> list[Certificate]:
    """The explicit CNN baseline: a rigorous upper bound of its Lipschitz constant, ``<= 1``.

    ``Lip(head o pool o relu o conv_L ... relu o stem) <= |head|_2 * (1 / p) * prod_l |conv_l|_2``
    (ReLU is 1-Lipschitz, non-overlapping ``p x p`` average pooling has norm ``1 / p``), each norm a
    rigorous upper bound at the layer's input size (:func:`proxnets.norm_bounds.norm_bound`). Nothing constrains these norms:
    this is the *uncertified* baseline: its bound is expected not to hold once trained (it may hold
    at initialization, where the weights are small).
    """
    if not isinstance(model, ExplicitCNN):
        fail("model", "an ExplicitCNN", type(model).__name__, TypeError)
    check_tensor("x", x, shape=(None, *model.input_shape))
    factors, rigorous, why, shape = [], True, [], tuple(model.input_shape)
    with torch.no_grad():
        for layer in model.body.modules():  # in order: the stem's convolution, then the body's
            if isinstance(layer, nn.Conv2d):
                value, rig, _, reason = _norm(layer, shape)
                factors.append(value)
                rigorous, why = rigorous and rig, why + ([reason] if reason else [])
                shape = tuple(layer(torch.zeros(1, *shape)).shape[1:])
        factors.append(1.0 / model.pool)
        value, rig, _, reason = _norm(model.head)
        factors.append(value)
        rigorous, why = rigorous and rig, why + ([reason] if reason else [])
    value = math.prod(factors)
    return [Certificate("lipschitz", value, 1.0, "<=", rigorous=rigorous, why="; ".join(why),
                        method="product of rigorous layer norm bounds (uncertified baseline: expected not to hold)",
                        details={"factors": factors})]


def certificate(model: nn.Module, x: torch.Tensor, **options) -> list[Certificate]:
    """The certificate of any model of this package: :func:`certify_opteq`, :func:`certify_mon` or
    :func:`certify_cnn` by the model's type (``options`` are passed on)."""
    if isinstance(model, OptEqClassifier):
        return certify_opteq(model, x, **options)
    if isinstance(model, MONClassifier):
        return certify_mon(model, x, **options)
    if isinstance(model, ExplicitCNN):
        return certify_cnn(model, x, **options)
    fail("model", "an OptEqClassifier, MONClassifier or ExplicitCNN", type(model).__name__, TypeError)


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
                     certificate=certify_opteq)


def _mon(input_shape, num_classes, **opts) -> Trainable:
    return Trainable(MONClassifier(input_shape, num_classes, _config_from(MONConfig, opts)), config=_train_config(),
                     certificate=certify_mon)


def _cnn(input_shape, num_classes, **opts) -> Trainable:
    return Trainable(ExplicitCNN(input_shape, num_classes, **opts), config=_train_config(), certificate=certify_cnn)


MODELS = {"opteq": _opteq, "opteq-mon": _mon, "opteq-cnn": _cnn}
