"""Physics of restoration: forward operators ``A`` with adjoints, norms and data-fidelity proxes.

Images are ``(B, C, H, W)``. Each physics offers ``A(x)``, ``A_adjoint(y)``, ``norm()`` (``|A|_2``),
``operator(in_shape)`` (a :class:`proxnets.operators.LinearOperator` for adjoint tests and power
iteration) and the prox of the data term ``f(x) = |A x - y|^2 / 2``:

    prox_{gamma f}(z) = argmin_x  |A x - y|^2 / 2 + |x - z|^2 / (2 gamma) = (I + gamma A^T A)^{-1} (z + gamma A^T y).

- :class:`Denoising`: ``A = I``.
- :class:`Blur` with ``boundary="circular"``: ``A x = k (*) x`` (circular convolution, per channel),
  diagonal in Fourier: ``A = F^{-1} diag(k^) F``; ``|A| = max |k^|``; the prox is exact in Fourier.
- :class:`Blur` with ``boundary="valid"``: ``(B, C, H, W) -> (B, C, H - kh + 1, W - kw + 1)``, only
  the pixels whose window lies inside the image (no boundary assumption); adjoint = transposed
  convolution; ``|A|`` by power iteration; the prox by conjugate gradients
  (:func:`proxnets.solvers.solve_linear`, the project's one CG). Each CG solve's info is kept as
  ``last_cg_info``, those that missed ``cg_tol`` are counted in ``cg_unconverged`` (PnP reports the
  count of its run as ``PnPInfo.inner_unconverged``) and go through ``cg_policy`` (warn by default).

Kernels: :func:`gaussian_kernel`, :func:`motion_kernel` (nonnegative, sum 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from proxnets.operators import LinearOperator, power_iteration
from proxnets.solvers import SolverInfo, solve_linear
from proxnets.utils.convergence import POLICIES, handle_nonconvergence
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor

__all__ = ["gaussian_kernel", "motion_kernel", "Denoising", "Blur", "BOUNDARIES"]

BOUNDARIES = ("circular", "valid")


def gaussian_kernel(size: int = 9, sigma: float = 1.6) -> torch.Tensor:
    """``(size, size)`` Gaussian ``exp(-|u|^2 / (2 sigma^2))`` normalized to sum 1 (``size`` odd)."""
    check_int("size", size, low=1)
    if size % 2 == 0:
        raise ValueError(f"size: expected an odd integer, got {size}")
    check_number("sigma", sigma, low=0.0, low_inclusive=False)
    u = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()


def motion_kernel(size: int = 9, angle: float = 0.0, length: float | None = None) -> torch.Tensor:
    """Linear motion blur: a segment of ``length`` pixels (default ``size``) through the centre at
    ``angle`` degrees, rasterized with bilinear weights, normalized to sum 1 (``size`` odd)."""
    check_int("size", size, low=1)
    if size % 2 == 0:
        raise ValueError(f"size: expected an odd integer, got {size}")
    check_number("angle", angle)
    length = float(size) if length is None else check_number("length", length, low=0.0, high=float(size))
    k = torch.zeros(size, size, dtype=torch.float64)
    c = size // 2
    t = torch.linspace(-(length - 1) / 2, (length - 1) / 2, max(2, 4 * size)) if length > 1 else torch.zeros(1)
    a = math.radians(angle)
    xs, ys = c + t * math.cos(a), c - t * math.sin(a)
    for x, y in zip(xs.tolist(), ys.tolist()):
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size:
                k[y0 + dy, x0 + dx] += w
    return (k / k.sum()).float()


def _check_images(name: str, x: torch.Tensor) -> torch.Tensor:
    return check_tensor(name, x, ndim=4, nonempty=True)


class Denoising:
    """``A = I`` (Gaussian denoising: ``y = x + sigma n``)."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def norm(self, in_shape: tuple[int, ...] | None = None) -> float:
        return 1.0

    def operator(self, in_shape: tuple[int, ...]) -> LinearOperator:
        return LinearOperator(lambda x: x, lambda y: y, tuple(in_shape))

    def prox_data(self, z: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
        return (z + gamma * y) / (1.0 + gamma)


class Blur:
    """Per-channel blur by ``kernel`` (``(kh, kw)``, odd sizes) with a ``"circular"`` or ``"valid"`` boundary."""

    def __init__(self, kernel: torch.Tensor, boundary: str = "circular", *, cg_iterations: int = 200, cg_tol: float = 1e-7,
                 cg_policy: str = "warn"):
        check_tensor("kernel", kernel, ndim=2)
        if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel: expected odd sizes (a centred kernel), got shape {tuple(kernel.shape)}")
        self.kernel = kernel
        self.boundary = check_choice("boundary", boundary, BOUNDARIES)
        self.cg_iterations = check_int("cg_iterations", cg_iterations, low=1)
        self.cg_tol = check_number("cg_tol", cg_tol, low=0.0)
        self.cg_policy = check_choice("cg_policy", cg_policy, POLICIES)
        self.last_cg_info: SolverInfo | None = None
        self.cg_unconverged = 0
        self._norms: dict[tuple, float] = {}

    # -- shapes and checks --------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        _check_images("x", x)
        kh, kw = self.kernel.shape
        if kh > x.shape[-2] or kw > x.shape[-1]:
            raise ValueError(f"kernel: expected a kernel no larger than the image {tuple(x.shape[-2:])}, got {tuple(self.kernel.shape)}")

    def _otf(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        """Fourier transform of the kernel centred at pixel (0, 0): ``(h, w // 2 + 1)`` complex."""
        kh, kw = self.kernel.shape
        pad = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        pad[:kh, :kw] = self.kernel.to(x)
        pad = torch.roll(pad, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
        return torch.fft.rfft2(pad)

    def _weight(self, c: int, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.to(x).expand(c, 1, *self.kernel.shape)  # (C, 1, kh, kw)

    # -- operator --------------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.boundary == "circular":
            h, w = x.shape[-2:]
            return torch.fft.irfft2(torch.fft.rfft2(x) * self._otf(h, w, x), s=(h, w))  # (B, C, H, W)
        return F.conv2d(x, self._weight(x.shape[1], x), groups=x.shape[1])  # (B, C, H-kh+1, W-kw+1)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _check_images("y", y)
        if self.boundary == "circular":
            h, w = y.shape[-2:]
            return torch.fft.irfft2(torch.fft.rfft2(y) * self._otf(h, w, y).conj(), s=(h, w))
        return F.conv_transpose2d(y, self._weight(y.shape[1], y), groups=y.shape[1])  # (B, C, H, W)

    def operator(self, in_shape: tuple[int, ...]) -> LinearOperator:
        """``A`` on inputs of ``in_shape = (C, H, W)`` as a :class:`LinearOperator` (batch 1)."""
        shape = (1, *in_shape)
        return LinearOperator(lambda x: self.A(x.reshape(shape)), lambda y: self.A_adjoint(y), shape, self.kernel.dtype)

    def norm(self, in_shape: tuple[int, ...]) -> float:
        """``|A|_2`` on images ``(C, H, W)``: ``max |k^|`` (circular, exact) or power iteration (valid)."""
        key = tuple(in_shape)
        if key not in self._norms:
            c, h, w = key
            if self.boundary == "circular":
                self._norms[key] = float(self._otf(h, w, self.kernel).abs().max())
            else:
                g = torch.Generator().manual_seed(0)
                sigma, _, _ = power_iteration(self.operator(key), iterations=500, tol=1e-8, generator=g)
                self._norms[key] = float(sigma) * 1.001  # the iterate is a lower bound
        return self._norms[key]

    def prox_data(self, z: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
        """``(I + gamma A^T A)^{-1} (z + gamma A^T y)``: Fourier division or conjugate gradients."""
        rhs = z + gamma * self.A_adjoint(y)
        if self.boundary == "circular":
            h, w = z.shape[-2:]
            otf = self._otf(h, w, z)
            return torch.fft.irfft2(torch.fft.rfft2(rhs) / (1.0 + gamma * otf.abs() ** 2), s=(h, w))
        x, info = solve_linear(lambda v: v + gamma * self.A_adjoint(self.A(v)), rhs, z, tol=self.cg_tol,
                               max_iter=self.cg_iterations)
        self.last_cg_info = info
        if not info.converged:
            self.cg_unconverged += 1
            handle_nonconvergence(info, self.cg_policy, "data prox: conjugate gradients")
        return x
