"""Exactly orthogonal circular convolutions by the Cayley transform in the Fourier domain.

Trockman & Kolter 2021 ("Orthogonalizing Convolutional Layers with the Cayley Transform"). A circular
convolution ``C -> C`` on ``H x W`` images is block-diagonalized by the 2-D DFT: per frequency ``f`` it
multiplies the ``C``-vector of DFT coefficients by a ``C x C`` complex matrix. From a kernel ``V``
(``(C, C, k, k)``, taps centred) take its symbol ``K(f)`` (the DFT of ``V`` zero-padded to ``H x W``), its
skew-Hermitian part ``S(f) = K(f) - K(f)^H`` and

    Q(f) = (I + S(f))^{-1} (I - S(f))        (= (I - S)(I + S)^{-1}: the factors commute),

which is unitary (``I + S`` is invertible: ``S`` has imaginary eigenvalues). ``V`` real gives
``Q(-f) = conj(Q(f))``, so the operator is a real circular convolution, orthogonal on ``R^{C H W}``.

What is applied and what is certified. Real inputs need only the half grid ``W // 2 + 1`` of ``rfft2``. On the
self-conjugate columns (``v = 0`` and ``v = W / 2``) ``Q`` is made exactly Hermitian-consistent,
``Q(u, v) := (Q(u, v) + conj(Q(-u, v))) / 2`` (what it is in exact arithmetic), so the stored half grid is
exactly the half of a full symbol ``Q~`` with ``Q~(-f) = conj(Q~(f))``. The forward applies

    A x = irfft2(Q rfft2(x)),        A^T z = irfft2(Q^H rfft2(z)),

which in exact arithmetic are the real circular convolutions with symbols ``Q~`` and ``Q~^H``: exact adjoints of
each other, whatever round-off did to ``Q``, and ``|A| = max_f |Q~(f)|_2 = max over the half grid of |Q(f)|_2``
(conjugate matrices have the same singular values). The block built on ``A`` is therefore a gradient step of a
convex potential with an operator whose norm is bounded by :func:`unitary_symbol_bound` of the very ``Q`` used:
a rigorous float64 bound from the Gram matrices (no power estimate):

    |Q|_2^2 = |Q^H Q|_2 <= 1 + |Q^H Q - I|_2 <= 1 + |Q^H Q - I|_F,

with the float64 round-off of forming ``Q^H Q`` (``|err_ij| <= 2 (C + 4) u sum_k |q_ki| |q_kj|``, so
``|err|_F <= 2 (C + 4) u |Q|_F^2``) and of the norm added. In float32 ``Q`` is unitary to ~1e-7, so the bound
is ``1 + O(1e-7)``.
"""

from __future__ import annotations

import math

import torch

from proxnets.norm_bounds import NormBound
from proxnets.utils.validation import check_int, check_tensor

__all__ = ["cayley_symbol", "cayley_apply", "unitary_symbol_bound"]

_U = 2.0**-53  # unit round-off of float64


def cayley_symbol(weight: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``Q(f)`` on the half grid of an ``H x W`` image: ``(C, C, k, k) -> (H, W // 2 + 1, C, C)`` complex (see the module docstring).

    Differentiable in ``weight`` (FFT, batched complex solve)."""
    check_tensor("weight", weight, ndim=4)
    c_out, c_in, kh, kw = weight.shape
    if c_out != c_in:
        raise ValueError(f"weight: expected a square kernel (C, C, k, k) for an orthogonal convolution, got {tuple(weight.shape)}")
    h, w = (check_int("hw", int(s), low=1) for s in hw)
    if kh > h or kw > w:
        raise ValueError(f"hw: expected an image at least as large as the kernel {kh}x{kw}, got {h}x{w}")
    padded = weight.new_zeros(c_out, c_in, h, w)
    padded[:, :, :kh, :kw] = weight
    padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(2, 3))  # centre tap at offset (0, 0)
    k = torch.fft.rfft2(padded).permute(2, 3, 0, 1)  # (H, W // 2 + 1, C, C)
    s = k - k.conj().transpose(-2, -1)  # skew-Hermitian
    eye = torch.eye(c_in, dtype=s.dtype, device=s.device)
    q = torch.linalg.solve(eye + s, eye - s)  # (I + S)^{-1} (I - S), unitary
    # the self-conjugate columns hold f and -f: make Q(-u, v) = conj(Q(u, v)) exact there (module docstring)
    mirror = (-torch.arange(h, device=q.device)) % h

    def fix(col: torch.Tensor) -> torch.Tensor:  # (H, C, C) -> the Hermitian-consistent column
        return (col + col[mirror].conj()) / 2

    if w % 2:  # only v = 0 is self-conjugate
        return torch.cat([fix(q[:, 0])[:, None], q[:, 1:]], dim=1)
    return torch.cat([fix(q[:, 0])[:, None], q[:, 1:w // 2], fix(q[:, w // 2])[:, None]], dim=1)  # (H, W // 2 + 1, C, C)


def cayley_apply(x: torch.Tensor, q: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """``irfft2(Q rfft2 x)`` (``adjoint``: ``Q^H``): ``(B, C, H, W) -> (B, C, H, W)``; ``q`` is ``(H, W // 2 + 1, C, C)``
    from :func:`cayley_symbol` at the same ``H x W``."""
    check_tensor("x", x, ndim=4, finite=False)  # shapes only: this is every step of a block (NaN propagates, checked there)
    _check_symbol(q)
    c, hw = x.shape[1], tuple(x.shape[-2:])
    if tuple(q.shape) != (hw[0], hw[1] // 2 + 1, c, c):
        raise ValueError(f"q: expected the symbol of a {c}-channel {hw[0]}x{hw[1]} convolution, shape "
                         f"{(hw[0], hw[1] // 2 + 1, c, c)}, got {tuple(q.shape)}")
    xf = torch.fft.rfft2(x).permute(2, 3, 1, 0)  # (H, W // 2 + 1, C, B)
    m = q.conj().transpose(-2, -1) if adjoint else q
    yf = (m @ xf.to(m.dtype)).permute(3, 2, 0, 1)  # (B, C, H, W // 2 + 1)
    return torch.fft.irfft2(yf, s=hw).to(x.dtype)


def _check_symbol(q: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor) or not q.is_complex() or q.ndim < 2 or q.shape[-1] != q.shape[-2]:
        got = f"{q.dtype} tensor of shape {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q: expected a complex tensor (..., C, C) of square symbol matrices, got {got}")


def unitary_symbol_bound(q: torch.Tensor) -> NormBound:
    """A rigorous upper bound of ``max_f |Q(f)|_2`` (the norm of the operator :func:`cayley_apply` applies), from the
    float64 Gram matrices ``Q^H Q`` with their round-off (module docstring). ``q``: ``(..., C, C)`` complex."""
    _check_symbol(q)
    qd = q.detach().to(torch.complex128)  # exact: complex64 -> complex128
    n = qd.shape[-1]
    if not bool(torch.isfinite(torch.view_as_real(qd)).all()):
        return NormBound(math.inf, False, "cayley gram", {}, why="the symbol Q has non-finite entries")
    gram = qd.conj().transpose(-2, -1) @ qd  # (..., C, C)
    dev = torch.linalg.matrix_norm(gram - torch.eye(n, dtype=gram.dtype), "fro")  # (...,)
    fro2 = torch.linalg.matrix_norm(qd, "fro") ** 2  # (...,)
    # forming the Gram: 2 (n + 4) u |Q|_F^2 (doubled for the float64 evaluation of |Q|_F^2 itself); the subtraction of I
    # and the Frobenius norm: relative 8 (n^2 + 2) u on dev
    slack = dev * (8 * (n * n + 2) * _U) + 2 * 2 * (n + 4) * _U * fro2
    t = float((dev + slack).max())
    value = math.sqrt((1.0 + t) * (1 + 4 * _U)) * (1 + 4 * _U)  # rounding of 1 + t, of sqrt, of the product
    return NormBound(value, math.isfinite(value), "cayley gram",
                     {"max_gram_deviation": float(dev.max()), "frequencies": int(dev.numel())}, why="")
