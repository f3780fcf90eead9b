"""Linear operators, their adjoints and their spectral norms.

The norm that matters for a constrained layer is that of the *operator* the layer applies -- a
convolution with its padding and stride at a given input size -- not that of its reshaped kernel.
Power iteration on ``A^T A``:

    v <- A^T A v / |A^T A v|,     |A|_2 >= |A v|         (v of unit norm)

needs only the forward map and its adjoint. Every iterate ``|A v|`` is a LOWER estimate of
``|A|_2`` (it can stall far below it when the start is nearly orthogonal to the top singular
vector); it is never a certificate. Rigorous upper bounds live in :mod:`proxnets.norm_bounds`. For a convolution the adjoint is the
transposed convolution with the same stride/padding (``output_padding`` fixing the size).

Public pieces:

- :func:`power_iteration` -- generic, on any ``(forward, adjoint)`` pair, optional warm start; a
  zero or null-space start is replaced by a random one (a zero start would return 0, "converged").
- :func:`conv2d_operator` -- the forward/adjoint pair of ``F.conv2d`` at an input shape.
- :func:`adjoint_test` -- ``<A x, y> - <x, A^T y>`` relative error, for any pair.
- :func:`operator_matrix` -- the dense matrix of a small operator (tests, exact norms).
- :class:`OperatorNormEstimator` -- a module with a persistent singular vector as a buffer: a cheap
  estimate per training step (one iteration, warm-started) and an exact mode (many iterations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.utils.convergence import IterInfo
from proxnets.utils.validation import check_int, check_number

__all__ = [
    "LinearOperator",
    "PowerIterationInfo",
    "power_iteration",
    "conv2d_operator",
    "linear_operator",
    "adjoint_test",
    "operator_matrix",
    "OperatorNormEstimator",
]

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LinearOperator:
    """A linear map ``forward`` with its adjoint, acting on tensors of ``in_shape`` (batch 1)."""

    forward: Map
    adjoint: Map
    in_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    # what the operator is, when known (``{"kind": "conv2d", "weight": W, "stride": ..., "padding": ...,
    # "dilation": ..., "groups": ...}`` or ``{"kind": "matrix", "weight": M}``): lets the rigorous
    # bounds of :mod:`proxnets.norm_bounds` use the structure (Fourier symbol, exact dense matrix)
    spec: dict | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class PowerIterationInfo(IterInfo):
    """``residuals[k]``: relative change of the norm estimate at iteration k.

    ``converged`` means the estimate stopped changing (relative change <= tol), NOT that it equals
    ``|A|_2``: the estimate is a lower bound (``lower_estimate``). ``restarts``: random restarts taken
    because the start (or an iterate) lay in the null space.
    """

    estimates: list[float] = dataclasses.field(default_factory=list)
    restarts: int = 0
    lower_estimate: bool = True


def power_iteration(
    op: LinearOperator,
    v0: torch.Tensor | None = None,
    *,
    iterations: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, PowerIterationInfo]:
    """Largest singular value of ``op`` by power iteration on ``A^T A``.

    Returns ``(sigma, v, info)``: ``sigma = |A v|`` (a lower bound of |A|_2 that converges to it),
    ``v`` the unit right singular vector estimate (feed it back as ``v0`` to warm-start).
    Runs without autograd; callers that need a differentiable sigma recompute ``|A v|`` with
    ``v`` detached (the standard spectral-normalization trick).
    """
    check_int("iterations", iterations, low=1)
    check_number("tol", tol, low=0.0)

    def fresh() -> torch.Tensor:
        r = torch.randn(op.in_shape, generator=generator, dtype=op.dtype).to(op.device)
        return r / r.norm()

    with torch.no_grad():
        info = PowerIterationInfo()
        if v0 is None:
            v = fresh()
        else:
            v = v0.detach().to(dtype=op.dtype, device=op.device).reshape(op.in_shape).clone()
            nv = v.norm()
            if not bool(torch.isfinite(nv)) or float(nv) == 0.0:  # a zero start would "converge" to 0
                v, info.restarts = fresh(), 1
            else:
                v = v / nv
        sigma = torch.zeros((), dtype=op.dtype, device=op.device)
        for k in range(iterations):
            w = op.forward(v)
            sigma_new = w.norm()
            u = op.adjoint(w)
            n = u.norm()
            if not bool(torch.isfinite(n)):
                info.iterations, info.converged = k + 1, False
                sigma = torch.as_tensor(float("nan"), dtype=op.dtype)
                return sigma, v, info
            if n == 0:
                # v in the null space of A: restart from a random vector (at most 3 times; a random
                # vector lies in a proper null space with probability 0, so A = 0 after that)
                if info.restarts < 3:
                    v, info.restarts = fresh(), info.restarts + 1
                    continue
                sigma = sigma_new
                info.iterations, info.converged = k + 1, True
                break
            v = u / n
            rel = float((sigma_new - sigma).abs() / sigma_new.clamp_min(1e-30))
            sigma = sigma_new
            info.estimates.append(float(sigma))
            info.residuals.append(rel)
            info.iterations = k + 1
            if k > 0 and rel <= tol:
                info.converged = True
                break
        sigma = op.forward(v).norm()
        if not bool(torch.isfinite(sigma)):
            info.converged = False
    return sigma, v, info


def conv2d_operator(
    weight: torch.Tensor,
    in_shape: Sequence[int],
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
) -> LinearOperator:
    """The bias-free convolution ``x -> conv2d(x, weight)`` on inputs of shape ``(C, H, W)``."""
    c, h, w = (int(s) for s in in_shape)
    if c != weight.shape[1] * groups:
        raise ValueError(f"in_shape: expected {weight.shape[1] * groups} channels for this weight, got {c}")
    shape = (1, c, h, w)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.reshape(shape), weight, stride=stride, padding=padding, dilation=dilation, groups=groups)

    out_h, out_w = forward(torch.zeros(shape, dtype=weight.dtype, device=weight.device)).shape[-2:]
    kh, kw = weight.shape[-2:]
    # output_padding recovers the input size lost to integer division by the stride
    op_h = h + 2 * padding - dilation * (kh - 1) - 1 - (out_h - 1) * stride
    op_w = w + 2 * padding - dilation * (kw - 1) - 1 - (out_w - 1) * stride

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            y, weight, stride=stride, padding=padding, output_padding=(op_h, op_w), dilation=dilation, groups=groups
        )

    spec = {"kind": "conv2d", "weight": weight, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return LinearOperator(forward, adjoint, shape, weight.dtype, weight.device, spec)


def linear_operator(matrix: torch.Tensor) -> LinearOperator:
    """``x -> matrix @ x`` on vectors of length ``matrix.shape[1]``."""
    return LinearOperator(
        lambda x: matrix @ x.reshape(-1), lambda y: matrix.T @ y.reshape(-1), (matrix.shape[1],), matrix.dtype, matrix.device,
        {"kind": "matrix", "weight": matrix},
    )


def adjoint_test(op: LinearOperator, *, generator: torch.Generator | None = None) -> float:
    """Relative error ``|<A x, y> - <x, A^T y>| / (|A x| |y|)`` for random ``x, y``."""
    with torch.no_grad():
        x = torch.randn(op.in_shape, generator=generator, dtype=op.dtype).to(op.device)
        ax = op.forward(x)
        y = torch.randn(ax.shape, generator=generator, dtype=op.dtype).to(op.device)
        aty = op.adjoint(y)
        lhs = (ax.double() * y.double()).sum()
        rhs = (x.double() * aty.double()).sum()
        scale = ax.double().norm() * y.double().norm()
        return float((lhs - rhs).abs() / scale.clamp_min(1e-300))


def operator_matrix(op: LinearOperator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense matrix of a small operator (for tests and exact norms), in ``dtype`` (default ``op.dtype``).

    A convolution or matrix with a known ``spec`` is built in ``dtype`` from its weight, in batches of
    unit vectors: each entry is then one weight value exactly (a convolution of a unit vector sums one
    product with zeros). Other operators are applied column by column in their own dtype.
    """
    dtype = op.dtype if dtype is None else dtype
    n = 1
    for s in op.in_shape:
        n *= s
    spec = op.spec or {}
    with torch.no_grad():
        if spec.get("kind") == "matrix":
            return spec["weight"].detach().to(dtype).clone()
        if spec.get("kind") == "conv2d":
            w = spec["weight"].detach().to(dtype)
            opts = {k: spec[k] for k in ("stride", "padding", "dilation", "groups")}
            cols = []
            for start in range(0, n, 1024):
                m = min(1024, n - start)
                eye = torch.zeros(m, n, dtype=dtype, device=w.device)
                eye[torch.arange(m), torch.arange(start, start + m)] = 1.0
                cols.append(F.conv2d(eye.reshape(m, *op.in_shape[1:]), w, **opts).reshape(m, -1))
            return torch.cat(cols).T.contiguous()
        cols = []
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        for j in range(n):
            cols.append(op.forward(eye[j].reshape(op.in_shape)).reshape(-1))
    return torch.stack(cols, dim=1).to(dtype)


class OperatorNormEstimator(nn.Module):
    """Persistent power-iteration state for one operator.

    ``v`` (a buffer, saved with the model) carries the right singular vector estimate across
    training steps, so one iteration per step suffices while weights move slowly
    (``mode="cheap"``). ``mode="exact"`` runs up to ``exact_iterations`` iterations to ``tol``;
    use it before estimating, never as a certificate (an estimate is a lower bound: certify with
    :func:`proxnets.norm_bounds.norm_bound`). ``forward(make_op)`` returns a sigma that is
    differentiable with respect to the weights inside ``make_op()``.
    """

    def __init__(self, in_shape: Sequence[int], *, cheap_iterations: int = 1, exact_iterations: int = 1000, tol: float = 1e-7):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.cheap_iterations = check_int("cheap_iterations", cheap_iterations, low=1)
        self.exact_iterations = check_int("exact_iterations", exact_iterations, low=1)
        self.tol = check_number("tol", tol, low=0.0)
        self.register_buffer("v", torch.randn(self.in_shape) / float(torch.tensor(self.in_shape).prod()) ** 0.5)
        self.last_info: PowerIterationInfo | None = None

    def forward(self, op: LinearOperator, mode: str = "cheap") -> torch.Tensor:
        """A LOWER estimate of ``|A|_2`` (differentiable in the weights); ``self.last_info`` keeps the
        power iteration's record (its ``converged`` flag is what callers must pass on)."""
        if mode not in ("cheap", "exact"):
            raise ValueError(f"mode: expected one of ['cheap', 'exact'], got {mode!r}")
        iters = self.cheap_iterations if mode == "cheap" else self.exact_iterations
        tol = 0.0 if mode == "cheap" else self.tol
        _, v, info = power_iteration(op, self.v, iterations=iters, tol=tol)
        self.last_info = info
        self.v.copy_(v.reshape(self.in_shape))
        return op.forward(v.detach()).norm()

