"""The non-expansive residual block and the ordinary ResNet block it is contrasted with.

Non-expansive block. With ``sigma`` nondecreasing and ``L``-Lipschitz, ``A`` a convolution (or a
linear map) and ``A^T`` its adjoint,

    F(x) = -A^T sigma(A x + b) = -grad V(x),   V(x) = sum_i Phi((A x + b)_i),  Phi' = sigma,

is the negative gradient of a convex potential whose gradient is ``nu``-Lipschitz and
``1/nu``-cocoercive, ``nu = L |A|_2^2``. The block integrates ``x' = F(x)`` over a time span ``T``
by ``n`` steps of an explicit Runge-Kutta method of circle-contractivity radius ``r``:

    n = ceil(T nu / (2 r c)),    h = T / n         ("adaptive": more, smaller steps when |A| grows)
    n = steps,                   h = 2 r c / nu     ("fixed": CPL-style rescaling; CPL is n = 1, Euler)

with ``c = 1`` (non-expansive, ``h nu <= 2 r``) or ``c = 1 - margin`` (averaged: each Euler step is
``alpha = h nu / 2 <= 1 - margin`` averaged). ``|A|_2`` comes from :class:`OperatorNorm`: one
power iteration per training step, the exact norm in evaluation; with ``norm_size="any"`` evaluation
uses the rigorous bound valid at every image size (:func:`proxnets.stable.norms.symbol_sup_bound`), so
the step rule and the certificates hold for whatever image the block is applied to.

Stiffness budget. ``stiffness_budget = tau`` also keeps ``n h nu <= tau`` (``h`` shrinks). For Heun,
``n`` steps of ``a = h nu / 2`` compose to ``K = sum alpha_i / (1 - alpha_i) = n a`` (each step is
``a / (1 + a)``-averaged), so a stack of blocks with ``sum_i tau_i <= 2`` has ``K <= 1``: the whole
stack is firmly non-expansive (1/2-averaged), what Douglas-Rachford and ADMM need without relaxation.
Capped steps (``max_steps``) also shorten ``h``: the condition is kept, the time span ``T`` is cut.

Diagonal step scale (``step_scale="diagonal"``). The scalar rule takes the step ``h`` from ``|A|^2``, the largest
eigenvalue of ``A A^T``. With a positive diagonal ``T`` (one entry per feature of ``A``) such that ``T >= A A^T`` in the
PSD order, the block integrates instead the flow of the preconditioned potential

    V_T(x) = sum_f Phi((A x + b)_f) / T_f,   F_T(x) = -grad V_T(x) = -A^T T^{-1} sigma(A x + b),

whose gradient is ``L``-Lipschitz: ``nu = L`` in every rule above (one Euler step at ``h = 2 / L`` is the SDP-based
Lipschitz layer ``x - 2 A^T T^{-1} sigma(A x + b)`` of Araujo et al., ICLR 2023; with ``T = |A|^2 I`` it is CPL). Proof.
``V_T`` is convex (``Phi`` convex, ``T > 0``). Where ``sigma`` is differentiable the Hessian is ``A^T T^{-1} D A`` with
``D = diag(sigma')``, ``0 <= D <= L``, so ``0 <= A^T T^{-1} D A <= L A^T T^{-1} A``, and ``A^T T^{-1} A`` has the nonzero
eigenvalues of ``T^{-1/2} A A^T T^{-1/2} <= T^{-1/2} T T^{-1/2} = I`` (congruence keeps the PSD order). For a nonsmooth
``sigma`` the same holds for difference quotients: ``sigma(u) - sigma(v) = D_uv (u - v)`` with ``D_uv`` diagonal in
``[0, L]``, so ``grad V_T(x) - grad V_T(y) = A^T T^{-1} D_xy A (x - y)``: ``grad V_T`` is ``L``-Lipschitz and, being the
gradient of a convex function, ``1/L``-cocoercive (Baillon-Haddad). Everything proved above for ``nu = L |A|^2`` (non-
expansive at ``h nu <= 2 r``, the Euler / Heun averagedness) then holds with ``nu = L``. Directly for one Euler step: its
difference quotient is ``J = I - 2 A^T M A`` with ``M = T^{-1} D_xy / L`` diagonal, ``0 <= M <= T^{-1}``, and
``J^T J = I - 4 A^T M^{1/2} (I - M^{1/2} A A^T M^{1/2}) M^{1/2} A <= I`` because ``M^{1/2} A A^T M^{1/2} <= M T <= I``.

The certified ``T`` (:func:`diagonal_step_scale`): ``T_f = sum_g |A A^T|_fg q_g / q_f`` for any ``q > 0`` (Schur test:
``x^T M x <= sum_fg |M_fg| |x_f| |x_g| <= sum_fg |M_fg| (x_f^2 q_g / q_f + x_g^2 q_f / q_g) / 2 = sum_f x_f^2 T_f`` for a
symmetric ``M``). For a zero-padded convolution ``A = S C E`` (``E`` zero-extends the image to the whole grid, ``C`` the
convolution on the grid, ``S`` restricts to the image): ``A A^T = S C E E^T C^T S^T <= S C C^T S^T`` (``E E^T`` is a
projection), a principal block of the grid operator ``C C^T``, the convolution ``F -> F`` with the kernels' cross-
correlations ``R_fg(d) = sum_c sum_u K_fc(u) K_gc(u + d)``. With ``q`` constant over pixels, each row sum of ``|S C C^T S^T|``
is at most the grid's ``sum_g q_g / q_f sum_d |R_fg(d)|``, so ``T`` is per feature and holds at every image size. The
entries are computed in float64 and rounded up by ``1 + 1e-6`` (evaluation and certificates); the certificate is 1 per
block, proved, not estimated. Broken variants (tested to fail): ``T = diag(A A^T)`` (the cross terms dropped) and ``T / 2``.

ResNet block: ``x -> x + B sigma(A x + b)``, Lipschitz bound ``1 + L |B| |A|``: with
``|A| = |B| = 1`` that is 2 per block, ``2^depth`` for a stack.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.stable.cayley import cayley_apply, cayley_symbol, unitary_symbol_bound
from proxnets.stable.integrators import RK_METHODS, compose_averaged, step_averagedness
from proxnets.stable.lipschitz import LipschitzBound
from proxnets.norm_bounds import fourier_norm_bound
from proxnets.stable.norms import NormConstraintWarning, OperatorNorm, constrain_operator_norm, symbol_sup_bound
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor

__all__ = ["MONOTONE_ACTIVATIONS", "SCHEDULES", "STEP_SCALES", "NonExpansiveBlock", "ResNetBlock", "diagonal_step_scale"]


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


# name -> (sigma, Lipschitz constant L); all nondecreasing, so sigma = Phi' with Phi convex
MONOTONE_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "relu": (F.relu, 1.0),
    "leaky_relu": (_leaky, 1.0),
    "tanh": (torch.tanh, 1.0),
    "sigmoid": (torch.sigmoid, 0.25),
    "softplus": (F.softplus, 1.0),
}
SCHEDULES = ("adaptive", "fixed")
NORM_SIZES = ("input", "any")
TRAIN_NORMS = ("power", "bound")
WEIGHT_PARAMS = ("free", "bjorck", "cayley")
STEP_SCALES = ("scalar", "diagonal")
_T_ROUND_UP = 1 + 1e-6  # float64 round-off of the sums, then the float32 cast, never take T below its bound


def _abs_gram(weight: torch.Tensor) -> torch.Tensor:
    """``(F, F)``: ``sum_d |R_fg(d)|`` for a kernel ``(F, C, kh, kw)`` (``R`` the channel-summed cross-correlation of the
    kernels of features ``f`` and ``g``, every offset ``d``: the absolute kernel of ``A A^T`` on the whole grid), or
    ``|W W^T|`` for a matrix ``(F, d)``. Symmetric, nonnegative."""
    if weight.dim() == 4:
        kh, kw = weight.shape[-2:]
        return F.conv2d(weight, weight, padding=(kh - 1, kw - 1)).abs().sum((-2, -1))  # (F, F, 2kh-1, 2kw-1) -> (F, F)
    return (weight @ weight.T).abs()


def diagonal_step_scale(weight: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """``T`` (``(F,)``) with ``diag(T) >= A A^T`` (PSD order) for ``A`` the zero-padded stride-1 convolution with kernel
    ``weight`` ``(F, C, kh, kw)`` at every image size, or the matrix ``weight`` ``(F, d)``: ``T_f = sum_g |A A^T|_fg q_g /
    q_f`` (the Schur-test / Gershgorin bound, proof in the module docstring); ``q``: ``(F,)`` positive weights, default 1.
    Differentiable; no rounding (the block rounds up what certifies)."""
    check_tensor("weight", weight, ndim=(2, 4))
    m = _abs_gram(weight)
    if q is None:
        return m.sum(1)
    check_tensor("q", q, shape=(m.shape[0],))
    if not bool((q > 0).all()):
        raise ValueError(f"q: expected positive entries, got min {float(q.min()):.4g}")
    q = q.to(m.dtype)
    return (m * q).sum(1) / q


def _check_shape(in_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"in_shape: expected (C, H, W) or (d,) with positive sizes, got {tuple(in_shape)}")
    return shape


class NonExpansiveBlock(nn.Module):
    """``x -> Phi_T(x)``: ``n`` RK steps of ``x' = -A^T sigma(A x + b)`` (see module docstring).

    Args:
        in_shape: ``(C, H, W)`` (``A`` a ``k x k`` convolution, zero padding ``k // 2``) or ``(d,)``
            (``A`` a matrix).
        features: output channels (or rows) of ``A``; default: ``C`` (or ``d``).
        activation: a name in :data:`MONOTONE_ACTIVATIONS`.
        method: ``"euler"``, ``"heun"`` or ``"rk4"``.
        time: the time span ``T`` of the adaptive schedule.
        schedule: ``"adaptive"`` or ``"fixed"``; ``steps`` is the fixed number of steps.
        averaged_margin: ``None`` (non-expansive) or ``delta`` in (0, 1): enforce ``h nu <= 2 r (1 - delta)``
            (Euler or Heun only: their averagedness constants are certified).
        max_steps: the adaptive schedule never takes more; it shortens ``h`` instead.
        stiffness_budget: ``None`` or ``tau > 0``: keep ``n h nu <= tau`` (see the module docstring).
        norm_size: ``"input"`` (norms at ``in_shape``) or ``"any"`` (evaluation and certificates use the
            size-independent rigorous bound; convolutions only).
        train_norm: ``"power"`` (the seed: one warm-started power iteration per training step, a lower
            estimate that can lag behind a growing ``|A|``, so ``h L |A|^2 <= 2 r`` can fail during training) or
            ``"bound"`` (the rigorous Fourier-symbol bound at ``in_shape`` every training step, no gradient through
            it: the condition holds at every step; ~10-30 ms per block and step on a CPU core at 16 channels).
            With ``"bound"`` evaluation steps from the same bound (``norm_size="input"``): the network evaluated
            takes the steps it was trained with, and its certificate needs no tighter (costlier) norm.
        weight_param: ``"free"`` (the seed) or ``"bjorck"``: ``A``'s kernel, reshaped ``(F, C k^2)``, is Bjorck-
            orthonormalized (:class:`proxnets.stable.glue.BjorckOrthogonal`). Why: the step's Jacobian is
            ``I - h A^T D A`` (``D`` the activation's slopes); at ``h nu = 2`` a singular direction of ``A`` with value ``s``
            is scaled by ``1 - 2 s^2 / |A|^2`` where active: a flat spectrum of ``A`` makes the step close to a
            reflection (norm preserving) instead of killing the directions with ``s ~ |A| / sqrt(2)``. The step rule
            and every certificate still use the norm of the weight in use, so the guarantee is unchanged.
            ``"cayley"``: ``A`` is an exactly orthogonal circular convolution ``C -> C`` at ``in_shape``, the Cayley
            transform of the kernel's symbol (:mod:`proxnets.stable.cayley`; square, ``features == C``, convolutions
            only). Then ``|A| = 1`` up to round-off and, at ``h nu = 2``, the step's Jacobian ``I - 2 A^T D A =
            A^T (I - 2 D) A`` is orthogonal for ReLU (``D`` in {0, 1}; 0.98..1 for LeakyReLU(0.01)): the step
            preserves gradient norms in every direction. Its ``|A|`` (training steps, evaluation steps and
            certificates alike) is the rigorous float64 Gram bound of the symbol the forward used
            (:func:`proxnets.stable.cayley.unitary_symbol_bound`), never an estimate; ``train_norm`` is ignored.
        step_scale: ``"scalar"`` (the seed: ``nu = L |A|^2``, one step size for every feature) or ``"diagonal"``: the field
            ``-A^T T^{-1} sigma(A x + b)`` with the certified per-feature ``T >= A A^T`` of :func:`diagonal_step_scale`
            (``q = 1``), so ``nu = L`` (module docstring: the proof). Every schedule, method and certificate keeps its
            meaning with ``nu = L``; no norm is estimated (``train_norm``, ``norm_size`` are not used: ``T`` holds at every
            size). Training differentiates through ``T``; evaluation uses ``T`` from float64, rounded up. Not with
            ``weight_param="cayley"`` (no kernel).
        bias_init: the initial ``b``. Why not 0 for orthogonal ``A``: at ``h nu = 2`` the step is, in the coordinates
            ``z = A x + b``, ``z -> -|z|`` (ReLU) on every coordinate, a block that is nowhere near the identity; with
            ``b = -beta`` the coordinates with ``(A x)_i < beta`` are inactive and pass unchanged (LeakyReLU: x0.98), so
            the stack starts close to the identity, like a residual network. Any value keeps every guarantee.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        features: int | None = None,
        *,
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        method: str = "euler",
        time: float = 1.0,
        schedule: str = "adaptive",
        steps: int = 1,
        averaged_margin: float | None = None,
        max_steps: int = 64,
        stiffness_budget: float | None = None,
        norm_size: str = "input",
        train_norm: str = "power",
        norm_options: dict | None = None,
        weight_param: str = "free",
        step_scale: str = "scalar",
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.in_shape = _check_shape(in_shape)
        self.kind = "conv2d" if len(self.in_shape) == 3 else "linear"
        self.features = check_int("features", features if features is not None else self.in_shape[0], low=1)
        self.kernel_size = check_int("kernel_size", kernel_size, low=1)
        if self.kind == "conv2d" and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd integer (same-size convolution), got {kernel_size}")
        self.activation = check_choice("activation", activation, list(MONOTONE_ACTIVATIONS))
        self.method = check_choice("method", method, list(RK_METHODS))
        self.time = check_number("time", time, low=0.0, low_inclusive=False)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.steps = check_int("steps", steps, low=1)
        self.max_steps = check_int("max_steps", max_steps, low=1)
        if averaged_margin is not None:
            check_number("averaged_margin", averaged_margin, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
            if method == "rk4":
                raise ValueError("method: expected 'euler' or 'heun' with averaged_margin (RK4 averagedness is not certified), got 'rk4'")
        self.averaged_margin = averaged_margin
        if stiffness_budget is not None:
            check_number("stiffness_budget", stiffness_budget, low=0.0, low_inclusive=False)
        self.stiffness_budget = stiffness_budget
        self.norm_size = check_choice("norm_size", norm_size, NORM_SIZES)
        if norm_size == "any" and len(self.in_shape) != 3:
            raise ValueError("norm_size: expected 'input' for a linear block (a matrix has one size), got 'any'")
        self._any_size: tuple | None = None
        self.train_norm = check_choice("train_norm", train_norm, TRAIN_NORMS)
        if train_norm == "bound" and len(self.in_shape) != 3:
            raise ValueError("train_norm: expected 'power' for a linear block, got 'bound'")
        self.last_train_bound: float = math.nan  # the bound the last "bound" training forward used
        c = self.in_shape[0]
        if self.kind == "conv2d":
            w = torch.empty(self.features, c, kernel_size, kernel_size)  # (F, C, k, k)
        else:
            w = torch.empty(self.features, c)  # (F, d)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.full((self.features,), check_number("bias_init", bias_init)))  # (F,)
        padding = kernel_size // 2 if self.kind == "conv2d" else 0
        self.padding = padding
        self.norm = OperatorNorm(self.kind, self.in_shape, padding=padding, **(norm_options or {}))
        with torch.no_grad():  # start at |A| = 1: one step per block while training keeps it near 1
            self.weight.div_(self.norm.warm(self.weight))
        self.weight_param = check_choice("weight_param", weight_param, WEIGHT_PARAMS)
        self._cayley: tuple | None = None  # (weight key, symbol Q, its NormBound) of the last evaluation weight
        self.step_scale = check_choice("step_scale", step_scale, STEP_SCALES)
        self._diag: tuple | None = None  # (weight key, 1 / T in the weight's dtype, its NormBound) of the last evaluation weight
        if step_scale == "diagonal" and weight_param == "cayley":
            raise ValueError("step_scale: expected 'scalar' with weight_param='cayley' (a Cayley block has no kernel to "
                             "bound A A^T from), got 'diagonal'")
        if weight_param == "cayley":
            if self.kind != "conv2d" or self.features != c:
                raise ValueError(f"weight_param: expected a convolution with features == channels ({c}) for 'cayley' "
                                 f"(an orthogonal C -> C convolution), got {self.kind} with features {self.features}")
            if norm_size != "input":
                raise ValueError("norm_size: expected 'input' with weight_param='cayley' (the convolution is circular at "
                                 f"in_shape), got {norm_size!r}")
        if weight_param == "bjorck":
            from torch.nn.utils import parametrize

            from proxnets.stable.glue import BjorckOrthogonal

            parametrize.register_parametrization(self, "weight", BjorckOrthogonal())

    # -- the vector field ------------------------------------------------------------------
    @property
    def lipschitz_activation(self) -> float:
        return MONOTONE_ACTIVATIONS[self.activation][1]

    def symbol(self) -> torch.Tensor:
        """``weight_param="cayley"``: the unitary symbol ``Q`` (``(H, W // 2 + 1, C, C)``) of ``A``; differentiable while
        gradients are on in training mode, else cached per weight (no gradient to the weight) with its rigorous bound."""
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            return cayley_symbol(self.weight, self.in_shape[1:])
        return self._cayley_cached()[0]

    def _cayley_cached(self) -> tuple:
        key = self.norm._key(self.weight)
        if self._cayley is None or self._cayley[0] != key:
            with torch.no_grad():
                q = cayley_symbol(self.weight, self.in_shape[1:])
            self._cayley = (key, q, unitary_symbol_bound(q))
        return self._cayley[1], self._cayley[2]

    def apply_a(self, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """``A x + b``: ``(B, C, H, W) -> (B, F, H, W)`` or ``(B, d) -> (B, F)`` (``q``: the Cayley symbol to use)."""
        if self.weight_param == "cayley":
            return cayley_apply(x, self.symbol() if q is None else q) + self.bias.view(1, -1, 1, 1)
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, padding=self.padding)
        return F.linear(x, self.weight, self.bias)

    def apply_at(self, z: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """``A^T z`` (bias-free adjoint): ``(B, F, H, W) -> (B, C, H, W)`` or ``(B, F) -> (B, d)``."""
        if self.weight_param == "cayley":
            return cayley_apply(z, self.symbol() if q is None else q, adjoint=True)
        if self.kind == "conv2d":
            return F.conv_transpose2d(z, self.weight, padding=self.padding)
        return z @ self.weight

    def field(self, x: torch.Tensor, q: torch.Tensor | None = None, t_inv: torch.Tensor | None = None) -> torch.Tensor:
        """``F(x) = -A^T sigma(A x + b)``, same shape as ``x`` (``q``: the Cayley symbol to use; ``t_inv``: ``(F,)``, the
        diagonal rule's ``T^{-1}``, giving ``-A^T T^{-1} sigma(A x + b)``)."""
        sigma = MONOTONE_ACTIVATIONS[self.activation][0]
        z = sigma(self.apply_a(x, q))
        if t_inv is not None:
            z = z * (t_inv.view(1, -1, 1, 1) if z.dim() == 4 else t_inv)
        return -self.apply_at(z, q)

    def flow(self, x: torch.Tensor, h: float | torch.Tensor, n: int, q: torch.Tensor | None = None,
             t_inv: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` steps of size ``h`` of the chosen RK method (no constraint checked: see ``forward``)."""
        step = RK_METHODS[self.method].step
        field = self.field if q is None and t_inv is None else (lambda z: self.field(z, q, t_inv))
        for _ in range(n):
            x = step(field, x, h)
        return x

    # -- the step-size rule ----------------------------------------------------------------
    @property
    def step_bound(self) -> float:
        """``2 r c``: the largest admissible ``h * nu``."""
        c = 1.0 if self.averaged_margin is None else 1.0 - self.averaged_margin
        return 2.0 * RK_METHODS[self.method].radius * c

    def schedule_steps(self, sigma: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, h, nu)`` for an operator norm ``sigma`` (``nu = L sigma^2``)."""
        nu = self.lipschitz_activation * sigma**2
        if self.schedule == "fixed":
            n, h = self.steps, self.step_bound / nu
        else:
            n = max(1, math.ceil(float(self.time * nu.detach() / self.step_bound) - 1e-9))
            if n > self.max_steps:  # cap the cost; keep the guarantee by shortening h
                n, h = self.max_steps, self.step_bound / nu
            else:
                h = torch.as_tensor(self.time / n, dtype=nu.dtype)
        if self.stiffness_budget is not None:  # n h nu <= tau; 1e-6 below it: h is a float32 rounding of tau / (n nu)
            h = torch.minimum(torch.as_tensor(h, dtype=nu.dtype), self.stiffness_budget * (1 - 1e-6) / (n * nu))
        return n, h, nu

    def any_size_bound(self):
        """:func:`proxnets.stable.norms.symbol_sup_bound` of the current weight (a ``NormBound``), cached per weight."""
        key = self.norm._key(self.weight)
        if self._any_size is None or self._any_size[0] != key:
            grid = 256 if max(self.weight.shape[:2]) <= 32 else 96  # cost: grid^2 SVDs of (F, C) matrices
            self._any_size = (key, symbol_sup_bound(self.weight.detach(), grid=grid))
        return self._any_size[1]

    def diagonal_scale(self) -> tuple[torch.Tensor, "object"]:
        """``step_scale="diagonal"``: ``(T^{-1}, bound)``, ``T^{-1}`` ``(F,)`` in the weight's dtype (0 for a zero feature) and
        the ``NormBound`` of the preconditioned ``|T^{-1/2} A|`` (value 1, rigorous when ``T`` is finite). Differentiable
        in training mode with gradients on; else from float64 ``T`` rounded up, cached per weight."""
        w = self.weight
        if self.training and torch.is_grad_enabled() and w.requires_grad:
            t = diagonal_step_scale(w) * _T_ROUND_UP
            return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t)), None
        return self._diag_cached()

    def _diag_cached(self) -> tuple[torch.Tensor, "object"]:
        from proxnets.norm_bounds import NormBound

        w = self.weight
        key = self.norm._key(w)
        if self._diag is None or self._diag[0] != key:
            with torch.no_grad():
                t = diagonal_step_scale(w.detach().double()) * _T_ROUND_UP
                ok = bool(torch.isfinite(t).all())
                t_inv = torch.where(t > 0, 1.0 / t.clamp_min(1e-300), torch.zeros_like(t)).to(w.dtype)
            method = "diagonal step scale T >= A A^T (Schur test on |A A^T|, float64, rounded up)"
            nb = NormBound(1.0, ok, method, why="" if ok else "T is not finite")
            self._diag = (key, t_inv, nb)
        return self._diag[1], self._diag[2]

    def _train_sigma(self) -> torch.Tensor:
        if self.step_scale == "diagonal":  # |T^{-1/2} A| <= 1 by construction of T; rounded up as evaluation does
            return torch.tensor(1 + 1e-6, dtype=self.weight.dtype)
        if self.weight_param == "cayley":
            raise RuntimeError("a Cayley block takes its norm from the symbol of its forward")
        if self.train_norm == "power":
            return self.norm(self.weight)
        bound = fourier_norm_bound(self.weight.detach(), self.in_shape, self.padding).value
        self.last_train_bound = bound
        with torch.no_grad():
            self.norm.cheap_sigma.fill_(bound)  # what the rule saw, where the power estimate would be
        return torch.tensor(bound * (1 + 1e-6), dtype=self.weight.dtype)  # float32 rounding must not go below it

    def input_size_bound(self):
        """:func:`proxnets.norm_bounds.fourier_norm_bound` of the current weight at ``in_shape`` (a ``NormBound``), cached
        (``weight_param="cayley"``: the Gram bound of its symbol)."""
        if self.weight_param == "cayley":
            return self._cayley_cached()[1]
        key = self.norm._key(self.weight)
        cached = getattr(self, "_input_size", None)
        if cached is None or cached[0] != key:
            cached = self._input_size = (key, fourier_norm_bound(self.weight.detach(), self.in_shape, self.padding))
        return cached[1]

    def _eval_bound(self):
        """The rigorous bound evaluation steps from, or ``None`` (then: the norm module's estimate)."""
        if self.step_scale == "diagonal":
            return self._diag_cached()[1]
        if self.norm_size == "any":
            return self.any_size_bound()
        return self.input_size_bound() if self.train_norm == "bound" or self.weight_param == "cayley" else None

    def _eval_sigma(self, exact: bool = False) -> torch.Tensor:
        """The ``|A|`` evaluation steps from: the size-independent bound (``norm_size="any"``), the Fourier bound at
        ``in_shape`` (``train_norm="bound"``: what training used), else the norm module's evaluation value
        (``exact``: the converged estimate whatever the module's mode). Bounds are rounded up in float32."""
        nb = self._eval_bound()
        if nb is not None:
            return torch.tensor(nb.value * (1 + 1e-6), dtype=self.weight.dtype)
        return self.norm.exact(self.weight) if exact else self.norm(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_param == "cayley":  # |A| from the rigorous bound of the very symbol this forward applies
            q = self.symbol()
            nb = unitary_symbol_bound(q) if q.requires_grad else self._cayley_cached()[1]
            if not nb.rigorous:
                raise FloatingPointError(f"NonExpansiveBlock: the Cayley symbol has no finite norm bound ({nb.why})")
            self.last_train_bound = nb.value if self.training else self.last_train_bound
            n, h, _ = self.schedule_steps(torch.tensor(nb.value * (1 + 1e-6), dtype=self.weight.dtype))
            return self.flow(x, h, n, q)
        if self.step_scale == "diagonal":
            t_inv, nb = self.diagonal_scale()
            if nb is not None and not nb.rigorous:
                raise FloatingPointError(f"NonExpansiveBlock: the diagonal step scale has no finite bound ({nb.why})")
            n, h, _ = self.schedule_steps(self._train_sigma() if self.training else self._eval_sigma())
            return self.flow(x, h, n, t_inv=t_inv)
        sigma = (self._train_sigma() if self.training else self._eval_sigma())
        n, h, nu = self.schedule_steps(sigma)
        if not self.training and self._eval_bound() is None and self.norm.cheap_was_low():
            _, h_c, _ = self.schedule_steps(self.norm.cheap_sigma)
            if float(h_c * nu) / self.norm.safety**2 > self.step_bound * (1 + 1e-3):  # without the safety factor
                warnings.warn(
                    f"NonExpansiveBlock: the cheap training estimate |A| = {float(self.norm.cheap_sigma):.4g} is below the "
                    f"exact {float(sigma) / self.norm.safety:.4g}; the training steps had h*nu = {float(h_c * nu) / self.norm.safety**2:.4g} "
                    f"> {self.step_bound:.4g}. "
                    "Evaluation uses the exact norm.",
                    NormConstraintWarning,
                    stacklevel=2,
                )
        return self.flow(x, h, n)

    # -- certificates -------------------------------------------------------------------------
    def norm_condition(self, mode: str = "rigorous") -> dict:
        """The steps evaluation takes and ``h * nu`` against ``2 r c``.

        ``n, h`` are those of the evaluation forward (from the estimate it uses, or the last training
        estimate for ``mode="cheap"``); ``nu = L |A|^2`` with ``|A|`` the rigorous bound of
        :func:`proxnets.norm_bounds.norm_bound` (``"rigorous"``/``"upper"``) or the estimate
        (``"estimate"``/``"exact"``, ``"cheap"``). Keys: ``n, h, h_nu, limit`` (``2 r``), ``step_bound``
        (``2 r c``), ``rigorous``, ``method``, ``why``, ``sigma`` (the |A| used for nu), ``sigma_used``.
        """
        check_choice("mode", mode, ("cheap", "exact", "estimate", "upper", "rigorous"))
        if self.weight_param == "cayley" or self.step_scale == "diagonal":  # no estimate is kept: the bound is the only norm
            mode = "rigorous"
        if mode == "cheap":
            sigma = self.norm.cheap_sigma if torch.isfinite(self.norm.cheap_sigma) else self.norm.cheap(self.weight).detach()
        else:
            sigma = self._eval_sigma(exact=True).detach()
        with torch.no_grad():
            n, h, nu = self.schedule_steps(sigma)
        out = {"n": int(n), "h": float(h), "sigma_used": float(sigma), "limit": 2.0 * RK_METHODS[self.method].radius,
               "step_bound": self.step_bound}
        if mode in ("upper", "rigorous"):
            nb = self._eval_bound() or self.norm.upper_bound(self.weight)
            nu = self.lipschitz_activation * nb.value**2
            out.update(sigma=nb.value, rigorous=nb.rigorous, method=nb.method, why=nb.why)
        else:
            if mode != "cheap" and self._eval_bound() is not None:  # nu from the estimate, the steps from the bound
                sigma = self.norm.exact(self.weight).detach()
                nu = self.lipschitz_activation * sigma**2
            out.update(sigma=float(sigma), rigorous=False, method="power iteration",
                       why=f"mode {mode!r}: |A| from a power-iteration (lower) estimate")
        out["h_nu"] = float(h) * float(nu)
        return out

    def _steps_lipschitz(self, n: int, h_nu: float) -> float:
        if h_nu <= 2.0 * RK_METHODS[self.method].radius * (1 + 1e-12):
            return 1.0
        if self.method == "euler":
            return max(1.0, h_nu - 1.0) ** n
        stages = RK_METHODS[self.method].stages
        return sum(h_nu**j / math.factorial(j) for j in range(stages + 1)) ** n

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        """1 when ``h nu <= 2 r`` (``h`` the evaluation step, ``nu`` from the rigorous ``|A|``); otherwise
        Euler: ``max(1, h nu - 1)^n`` (the step's Jacobian ``I - h A^T D A``, ``0 <= D <= L``, has its
        spectrum in ``[1 - h nu, 1]``), other methods: ``(sum_{j <= s} (h nu)^j / j!)^n``."""
        c = self.norm_condition(mode)
        value = self._steps_lipschitz(c["n"], c["h_nu"])
        return LipschitzBound(value, c["rigorous"], f"step rule (|A|: {c['method']})", c["why"],
                              {"h_nu": c["h_nu"], "limit": c["limit"], "n": c["n"]})

    def averagedness(self, mode: str = "rigorous") -> float:
        """``alpha`` with the block ``alpha``-averaged: < 1 averaged, 1.0 non-expansive only, ``inf`` not
        proved non-expansive (``h nu > 2 r``), ``nan`` unknown (RK4). ``nu`` from the rigorous ``|A|``."""
        c = self.norm_condition(mode)
        return compose_averaged([step_averagedness(self.method, c["h_nu"])] * c["n"])

    def extra_repr(self) -> str:
        return (
            f"in_shape={self.in_shape}, features={self.features}, method={self.method!r}, schedule={self.schedule!r}, "
            f"time={self.time}, averaged_margin={self.averaged_margin}, stiffness_budget={self.stiffness_budget}, "
            f"norm_size={self.norm_size!r}, weight_param={self.weight_param!r}, step_scale={self.step_scale!r}"
        )


class ResNetBlock(nn.Module):
    """``x -> x + B sigma(A x + b_A) + b_B`` with unconstrained ``A``, ``B`` (or ``|A|, |B| <= 1`` if
    ``normalized``). Same shapes and activations as :class:`NonExpansiveBlock`."""

    def __init__(
        self,
        in_shape: Sequence[int],
        features: int | None = None,
        *,
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        normalized: bool = False,
    ):
        super().__init__()
        self.in_shape = _check_shape(in_shape)
        self.activation = check_choice("activation", activation, list(MONOTONE_ACTIVATIONS))
        c = self.in_shape[0]
        features = check_int("features", features if features is not None else c, low=1)
        if len(self.in_shape) == 3:
            self.a = nn.Conv2d(c, features, kernel_size, padding=kernel_size // 2)
            self.b = nn.Conv2d(features, c, kernel_size, padding=kernel_size // 2)
            mid_shape = (features, *self.in_shape[1:])
        else:
            self.a = nn.Linear(c, features)
            self.b = nn.Linear(features, c)
            mid_shape = (features,)
        kind = "conv2d" if len(self.in_shape) == 3 else "linear"
        pad = kernel_size // 2 if kind == "conv2d" else 0
        if normalized:
            constrain_operator_norm(self.a, self.in_shape)
            constrain_operator_norm(self.b, mid_shape)
        self.normalized = normalized
        self._norm_a = OperatorNorm(kind, self.in_shape, padding=pad)
        self._norm_b = OperatorNorm(kind, mid_shape, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = MONOTONE_ACTIVATIONS[self.activation][0]
        return x + self.b(sigma(self.a(x)))  # (B, C, H, W) or (B, d)

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        """``1 + L |B| |A|`` with rigorous bounds of the norms of the weights in use (``"estimate"``: power iteration)."""
        check_choice("mode", mode, ("cheap", "exact", "estimate", "upper", "rigorous"))
        with torch.no_grad():
            if mode in ("upper", "rigorous"):
                # the weights evaluation applies (the constrained ones when normalized)
                ba, bb = _plain_bound(self._norm_a, self.a.weight), _plain_bound(self._norm_b, self.b.weight)
                value = 1.0 + MONOTONE_ACTIVATIONS[self.activation][1] * float(ba) * float(bb)
                why = "; ".join(b.why for b in (ba, bb) if not b.rigorous)
                return LipschitzBound(value, ba.rigorous and bb.rigorous, "1 + L |B| |A|", why)
            na = float(self._norm_a.exact(self.a.weight.detach()))
            nb = float(self._norm_b.exact(self.b.weight.detach()))
        return LipschitzBound(1.0 + MONOTONE_ACTIVATIONS[self.activation][1] * na * nb, False, "power iteration",
                              why=f"mode {mode!r}: power-iteration (lower) estimates of |A|, |B|")


def _plain_bound(norm: OperatorNorm, weight: torch.Tensor) -> LipschitzBound:
    nb = norm.upper_bound(weight.detach())
    return LipschitzBound(nb.value, nb.rigorous, nb.method, nb.why)
