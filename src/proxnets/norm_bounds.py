"""Rigorous upper bounds of operator norms ``|A|_2``, in one place.

A power-iteration estimate ``|A v|`` is a *lower* estimate of ``|A|_2`` (it can stall near a lower
singular value); a certificate needs a number proved to be ``>= |A|_2``. :func:`norm_bound` returns
a :class:`NormBound` ``(value, rigorous, method, details)`` by one of:

- ``"dense"``: the exact SVD of the dense matrix of the operator, in float64. A convolution's (or a
  matrix's) entries are weight values, so the float64 matrix is exact; LAPACK's SVD is backward
  stable: the computed values are exact for ``A + E`` with ``|E|_2 <= p(m, n) eps |A|_2``, ``p`` a
  modest function of the sizes. We take ``p = 16 max(m, n)`` (``eps = 2^-53``) and return
  ``sigma_hat (1 + 16 max(m, n) eps)`` -- a relative margin ~1e-12 at the sizes used.
- ``"cholesky"``: an estimate plus a certified a-posteriori correction. With ``M = A^T A`` (order
  ``k``, built by batched convolutions), ``lambda_est`` its top eigenvalue by Lanczos (ARPACK; an
  estimate, not trusted) and a trial ``t = lambda_est (1 + tau)``, a Cholesky
  factorization of ``H = t I - M`` that runs to completion in floating point proves
  ``lambda_min(H) >= -gamma_{k+1} trace(H) / (1 - gamma_{k+1})`` (Demmel 1989; Higham, *Accuracy and
  Stability*, Thm 10.5: ``R^T R = H + dH``, ``|dH_ij| <= gamma_{k+1} sqrt(h_ii h_jj) / (1 - gamma)``,
  ``gamma_j = j eps / (1 - j eps)``); the product ``M`` itself is computed with
  ``|dM|_2 <= gamma_m trace(M)`` and ``t I - M`` with one rounding per diagonal entry. Hence

      |A|_2^2 = lambda_max(M) <= t + gamma_m trace(M) + eps (t + max_i M_ii) + gamma_{k+1} trace(H) / (1 - gamma_{k+1}).

  ``tau`` grows (1e-9 ... 1e-3) until the factorization succeeds. For a convolution, ``M`` ordered
  ``(h, w, c)`` is banded (bandwidth ~ (2 W + 2) C for a 3x3 kernel) and LAPACK's banded Cholesky
  is used (the same error theorem). Cost ~1 s at k = 6272 on 2 cores, where a dense SVD takes ~220 s.
- ``"fourier"``: stride-1 zero-padded convolutions: ``|A|_2 <= max_omega sigma_max(K(omega))``, the
  symbol of the circular convolution on the padded grid (Sedghi, Gupta & Long 2019); loose at small
  sizes (boundary effects), exact for 1x1 kernels. Round-off margin: per-frequency FFT error
  ``<= 8 log2(N) eps sqrt(N) |W|_F`` (Parseval over the N frequencies) plus the SVD margin above.
- ``"gram"``: Gram iteration (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023; our own code):
  ``G_0 = W``, ``G_{j+1} = G_j^H G_j`` (rescaled by ``c_j = |G_j|_F`` to avoid overflow), so
  ``sigma_1(W)^{2^t} = sigma_1(G_t) <= |G_t|_F`` and

      log |W|_2 <= sum_{j=0}^{t} 2^{-j} log c_j,

  converging to ``|W|_2`` from above (overestimate factor ``<= rank^{2^{-(t+1)}}``). Applied to
  matrices and, batched, to the per-frequency symbol of a stride-1 convolution (then an upper bound
  of the Fourier bound). Margin ``1 + 16 n eps`` for the float64 products.
- ``"power"``: power iteration alone, returned with ``rigorous=False`` (a lower estimate).

``"auto"`` computes the cheap rigorous bounds (Fourier or Gram), a power-iteration lower estimate,
and, when they disagree by more than ``rtol``, the tightest affordable exact method (dense SVD
below ``max_dense`` columns, the certified Cholesky below ``max_cholesky``); it returns the smallest
rigorous value. ``details["lower"]`` keeps the lower estimate when one was computed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.operators import LinearOperator, conv2d_operator, linear_operator, operator_matrix, power_iteration
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "NormBound",
    "NORM_METHODS",
    "norm_bound",
    "dense_norm_bound",
    "cholesky_norm_bound",
    "fourier_norm_bound",
    "gram_norm_bound",
    "gram_iteration",
    "as_operator",
]

NORM_METHODS = ("auto", "dense", "cholesky", "fourier", "gram", "power")
EPS = float(torch.finfo(torch.float64).eps) / 2  # unit round-off 2^-53


@dataclasses.dataclass(frozen=True)
class NormBound:
    """``value``: an upper bound of ``|A|_2`` when ``rigorous`` (else an estimate, ``why`` says why)."""

    value: float
    rigorous: bool
    method: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    why: str = ""

    def __post_init__(self) -> None:
        if not self.rigorous and not self.why:
            raise ValueError(f"why: expected the reason the {self.method!r} value is not rigorous, got ''")

    def __float__(self) -> float:
        return float(self.value)


def _gamma(n: int) -> float:
    return n * EPS / (1 - n * EPS)


def as_operator(target: LinearOperator | torch.Tensor | nn.Module, in_shape: Sequence[int] | None = None) -> LinearOperator:
    """The bias-free operator of a matrix, an ``nn.Linear``, an ``nn.Conv2d`` (at ``in_shape = (C, H, W)``;
    the weight the module applies, parametrizations included) or a :class:`LinearOperator`."""
    if isinstance(target, LinearOperator):
        return target
    if isinstance(target, torch.Tensor):
        if target.ndim != 2:
            fail("target", "a 2-D matrix, an nn.Linear / nn.Conv2d or a LinearOperator", f"a {target.ndim}-D tensor")
        check_tensor("target", target)
        return linear_operator(target.detach())
    if isinstance(target, nn.Linear):
        return linear_operator(target.weight.detach())
    if isinstance(target, nn.Conv2d):
        if target.padding_mode != "zeros" or isinstance(target.padding, str):
            fail("target", "an nn.Conv2d with integer zero padding", target)
        if len(set(target.stride)) != 1 or len(set(target.padding)) != 1 or len(set(target.dilation)) != 1:
            fail("target", "an nn.Conv2d with equal stride, padding and dilation on both axes", target)
        if in_shape is None or len(in_shape) != 3 or int(in_shape[0]) != target.in_channels:
            fail("in_shape", f"(C={target.in_channels}, H, W), the convolution's input size", in_shape)
        return conv2d_operator(target.weight.detach(), in_shape, stride=target.stride[0], padding=target.padding[0],
                               dilation=target.dilation[0], groups=target.groups)
    fail("target", "a 2-D matrix, an nn.Linear / nn.Conv2d or a LinearOperator", type(target).__name__, TypeError)


def _sizes(op: LinearOperator) -> tuple[int, int]:
    """``(m, n)``: output and input dimensions."""
    n = math.prod(op.in_shape)
    spec = op.spec or {}
    if spec.get("kind") == "matrix":
        return int(spec["weight"].shape[0]), n
    with torch.no_grad():
        m = op.forward(torch.zeros(op.in_shape, dtype=op.dtype, device=op.device)).numel()
    return int(m), n


# -- the methods -------------------------------------------------------------------------------------
def dense_norm_bound(op: LinearOperator) -> NormBound:
    """Exact SVD of the float64 dense matrix, times ``1 + 16 max(m, n) eps`` (see the module docstring)."""
    A = operator_matrix(op, torch.float64)
    m, n = A.shape
    s = float(torch.linalg.matrix_norm(A, ord=2))
    margin = 16 * max(m, n) * EPS
    if op.spec is None and op.dtype != torch.float64:
        # an operator without a known structure is evaluated in its own dtype: its columns carry that
        # rounding (relative ~ fan-in * eps_dtype); charge it as a relative margin on the norm
        margin += 16 * max(m, n) * float(torch.finfo(op.dtype).eps)
    return NormBound(s * (1 + margin), math.isfinite(s), "dense SVD", {"estimate": s, "margin_rel": margin, "shape": [m, n]},
                     why="" if math.isfinite(s) else "non-finite SVD")


def fourier_norm_bound(weight: torch.Tensor, in_shape: Sequence[int], padding: int = 0) -> NormBound:
    """``max_omega sigma_max(K(omega))`` for a stride-1 zero-padded convolution on ``(C, H, W)``, plus round-off."""
    check_tensor("weight", weight, ndim=4)
    if len(in_shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in in_shape) or in_shape[0] != weight.shape[1]:
        fail("in_shape", f"(C, H, W) of positive integers with C = {weight.shape[1]}", in_shape)
    check_int("padding", padding, low=0)
    c, h, w = (int(v) for v in in_shape)
    kh, kw = weight.shape[-2:]
    n1, n2 = max(h + 2 * padding, kh), max(w + 2 * padding, kw)
    wd = weight.detach().double()
    # real kernel: K(-omega) = conj(K(omega)) has the same singular values, so the half grid of rfft2 covers every
    # frequency of the full one (half the SVDs); complex kernels take the full grid
    fft = torch.fft.fft2 if wd.is_complex() else torch.fft.rfft2
    spectrum = fft(wd, s=(n1, n2))  # (C_out, C_in, n1, n2 or n2 // 2 + 1)
    s = float(torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max())
    N = n1 * n2
    absolute = 8 * math.log2(max(N, 2)) * EPS * math.sqrt(N) * float(wd.norm())
    rel = 16 * max(weight.shape[0], weight.shape[1]) * EPS
    value = s * (1 + rel) + absolute
    return NormBound(value, math.isfinite(value), "Fourier symbol", {"estimate": s, "grid": [n1, n2]},
                     why="" if math.isfinite(value) else "non-finite symbol")


def gram_iteration(mats: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Gram-iteration upper bound of the spectral norm of each matrix in ``mats`` (``(..., m, n)``, real
    or complex), float64: ``exp(sum_j 2^-j log c_j)`` (see the module docstring), without margin."""
    check_int("iterations", iterations, low=0)
    check_tensor("mats", mats, ndim=tuple(range(2, 9)))
    return _gram_iteration(mats, iterations)


def _gram_iteration(mats: torch.Tensor, iterations: int) -> torch.Tensor:
    # unchecked (internal): non-finite weights give a non-finite bound, reported as not rigorous
    G = mats.detach().to(torch.complex128 if mats.is_complex() else torch.float64)
    if G.shape[-2] < G.shape[-1]:  # |W| = |W^H|: iterate on the side with the smaller Gram matrix
        G = G.mH
    log_bound = torch.zeros(G.shape[:-2], dtype=torch.float64, device=G.device)
    for j in range(iterations + 1):
        c = torch.linalg.matrix_norm(G, ord="fro")  # (...)
        zero = c == 0
        c = torch.where(zero, torch.ones_like(c), c)
        log_bound = log_bound + torch.log(c) / 2.0**j
        log_bound = torch.where(zero, torch.full_like(log_bound, -math.inf), log_bound)
        if j == iterations:
            break
        G = G / c[..., None, None].to(G.dtype)
        G = G.mH @ G
    return torch.exp(log_bound)


def gram_norm_bound(op: LinearOperator, iterations: int = 8) -> NormBound:
    """Gram iteration on a matrix, or on the Fourier symbol of a stride-1 convolution."""
    spec = op.spec or {}
    if spec.get("kind") == "matrix":
        W = spec["weight"]
        s = float(_gram_iteration(W, iterations))
        margin = 16 * max(W.shape) * EPS
        return NormBound(s * (1 + margin), math.isfinite(s), "Gram iteration", {"iterations": iterations},
                         why="" if math.isfinite(s) else "non-finite Gram iteration")
    if _fourier_applicable(op):
        c, h, w = op.in_shape[1:]
        weight, p = spec["weight"], spec["padding"]
        kh, kw = weight.shape[-2:]
        n1, n2 = max(h + 2 * p, kh), max(w + 2 * p, kw)
        spectrum = torch.fft.fft2(weight.detach().double(), s=(n1, n2)).permute(2, 3, 0, 1)  # (n1, n2, Co, Ci)
        s = float(_gram_iteration(spectrum, iterations).max())
        N = n1 * n2
        value = s * (1 + 16 * max(weight.shape[:2]) * EPS) + 8 * math.log2(max(N, 2)) * EPS * math.sqrt(N) * float(weight.detach().double().norm())
        return NormBound(value, math.isfinite(value), "Gram iteration (Fourier symbol)", {"iterations": iterations, "grid": [n1, n2]},
                         why="" if math.isfinite(value) else "non-finite Gram iteration")
    fail("op", "a matrix or a stride-1 convolution for the Gram bound", op.spec and op.spec.get("kind"))


def _fourier_applicable(op: LinearOperator) -> bool:
    spec = op.spec or {}
    return spec.get("kind") == "conv2d" and spec["stride"] == 1 and spec["dilation"] == 1 and spec["groups"] == 1


def _power(op: LinearOperator, iterations: int, tol: float, generator: torch.Generator | None) -> tuple[float, bool]:
    op64 = _double(op)
    sigma, _, info = power_iteration(op64, iterations=iterations, tol=tol, generator=generator)
    return float(sigma), bool(info.converged)


def _double(op: LinearOperator) -> LinearOperator:
    spec = op.spec or {}
    if spec.get("kind") == "matrix":
        return linear_operator(spec["weight"].detach().double())
    if spec.get("kind") == "conv2d":
        return conv2d_operator(spec["weight"].detach().double(), op.in_shape[1:],
                               **{k: spec[k] for k in ("stride", "padding", "dilation", "groups")})
    return op


def _gram_matrix(op: LinearOperator) -> tuple[torch.Tensor, int]:
    """``(M, m)``: ``M = A^T A`` in float64 from the exact dense matrix, and the output dimension."""
    A = operator_matrix(op, torch.float64)
    return A.T @ A, int(A.shape[0])


def _banded_gram(op: LinearOperator):
    """``M = A^T A`` of a stride-1, dilation-1 convolution in the ``(h, w, c)`` ordering, by probing.

    ``M`` couples pixels at most ``R = k - 1`` apart per axis, so ``(2R+1)^2 C`` probe vectors (one per
    spatial colour class mod ``2R+1`` and channel) recover every entry: ``(M v)`` at a pixel is the entry
    of the unique probed pixel within reach. Returns ``(rows, cols, vals, k, u, m)`` (all entries, COO),
    ``u`` the bandwidth, ``m`` the output dimension.
    """
    spec = op.spec
    c, h, w = op.in_shape[1:]
    wt = spec["weight"].detach().double()
    kh, kw = wt.shape[-2:]
    rh, rw = kh - 1, kw - 1
    ph, pw = 2 * rh + 1, 2 * rw + 1
    ii, jj = torch.arange(h), torch.arange(w)
    probes = torch.zeros(ph * pw * c, c, h, w, dtype=torch.float64)
    labels = []
    for a in range(ph):
        for b in range(pw):
            for ch in range(c):
                idx = len(labels)
                probes[idx, ch][(ii % ph == a)[:, None] & (jj % pw == b)[None, :]] = 1.0
                labels.append((a, b, ch))
    with torch.no_grad():
        y = F.conv2d(probes, wt, padding=spec["padding"], groups=spec["groups"])
        r = F.conv_transpose2d(y, wt, padding=spec["padding"], groups=spec["groups"])  # (P, C, H, W)
    m = y[0].numel()
    lab = torch.tensor(labels)  # (P, 3)
    a, b, cin = lab[:, 0].view(-1, 1, 1, 1), lab[:, 1].view(-1, 1, 1, 1), lab[:, 2].view(-1, 1, 1, 1)
    io, jo, co = ii.view(1, 1, -1, 1), jj.view(1, 1, 1, -1), torch.arange(c).view(1, -1, 1, 1)
    # the probed input pixel within reach of the output pixel (io, jo): offset in [-R, R]
    di = (a - io) % ph
    di = torch.where(di > rh, di - ph, di)
    dj = (b - jo) % pw
    dj = torch.where(dj > rw, dj - pw, dj)
    i_in, j_in = io + di, jo + dj
    shape = r.shape
    valid = ((i_in >= 0) & (i_in < h) & (j_in >= 0) & (j_in < w)).expand(shape)
    rows = ((io * w + jo) * c + co).expand(shape)[valid]
    cols = ((i_in * w + j_in) * c + cin).expand(shape)[valid]
    vals = r[valid]
    u = int((rows - cols).abs().max()) if len(rows) else 0
    return rows, cols, vals, c * h * w, u, m


def _top_eigenvalue(M) -> float:
    """An estimate of ``lambda_max(M)`` (ARPACK Lanczos; dense ``eigvalsh`` for small or failed cases)."""
    k = M.shape[0]
    if k > 256:
        try:
            import numpy as np
            from scipy.sparse.linalg import ArpackNoConvergence, eigsh

            # a fixed start: ARPACK's own random start makes the estimate (and so the certified bound,
            # in its last bits) differ between two runs with the same seed
            v0 = np.random.default_rng(0).standard_normal(k)
            return float(eigsh(M, k=1, which="LA", tol=1e-13, v0=v0, return_eigenvectors=False)[0])
        except ArpackNoConvergence:  # fall back to the dense solver (an estimate either way: the proof is the Cholesky step)
            pass
    dense = M.toarray() if hasattr(M, "toarray") else M
    return float(torch.linalg.eigvalsh(torch.as_tensor(dense))[-1])


def _banded_applicable(op: LinearOperator) -> bool:
    spec = op.spec or {}
    return spec.get("kind") == "conv2d" and spec["stride"] == 1 and spec["dilation"] == 1


def _banded_cholesky_bound(op: LinearOperator) -> NormBound:
    import numpy as np
    from scipy.linalg import LinAlgError, cholesky_banded
    from scipy.sparse import coo_matrix

    rows, cols, vals, k, u, m = _banded_gram(op)
    M = coo_matrix((vals.numpy(), (rows.numpy(), cols.numpy())), shape=(k, k)).tocsr()
    diag = M.diagonal()
    trace_m, diag_max = float(diag.sum()), float(diag.max())
    if trace_m == 0.0:
        return NormBound(0.0, True, "certified eigenvalue (banded Cholesky)", {"k": k, "zero": True})
    upper = rows <= cols
    base = np.zeros((u + 1, k))
    base[(u + rows[upper] - cols[upper]).numpy(), cols[upper].numpy()] = -vals[upper].numpy()
    lam_est = _top_eigenvalue(M)
    g = _gamma(k + 1)
    for tries, tau in enumerate((1e-9, 1e-7, 1e-5, 1e-3), start=1):
        t = lam_est * (1 + tau) + 1e-300
        ab = base.copy()
        ab[u] += t  # the diagonal of t I - M
        try:
            cholesky_banded(ab, lower=False, check_finite=True)
        except LinAlgError:
            continue
        trace_h = float(ab[u].sum())
        lam = t + _gamma(m) * trace_m + EPS * (t + diag_max) + g * trace_h / (1 - g)
        return NormBound(math.sqrt(lam), True, "certified eigenvalue (banded Cholesky)",
                         {"estimate": math.sqrt(max(lam_est, 0.0)), "t": t, "k": k, "bandwidth": u, "tries": tries})
    return NormBound(math.sqrt(max(lam_est, 0.0)), False, "Lanczos", {"k": k},
                     why="the Cholesky certificate failed at every trial")


def cholesky_norm_bound(op: LinearOperator, estimate: float | None = None) -> NormBound:
    """Certified correction of a norm estimate: Cholesky of ``t I - M`` proves ``|A|_2^2 <= t + margin``.

    ``estimate``: a (lower) estimate of ``|A|_2``; by default the top eigenvalue of ``M = A^T A`` by
    Lanczos. The proof does not depend on how ``t`` was found (see the module docstring).
    """
    if _banded_applicable(op) and estimate is None:
        return _banded_cholesky_bound(op)
    M, m = _gram_matrix(op)
    k = M.shape[0]
    trace_m = float(M.diagonal().sum())
    diag_max = float(M.diagonal().max())
    if trace_m == 0.0:
        return NormBound(0.0, True, "certified eigenvalue (Cholesky)", {"k": k, "zero": True})
    def certify(t: float) -> float | None:
        H = -M
        H.diagonal().add_(t)
        _, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            return None
        trace_h = float(H.diagonal().sum())
        g = _gamma(k + 1)
        # M's entries: dot products of length <= m of exact values (A^T (A e_j)), |dM|_2 <= gamma_m trace(M)
        return t + _gamma(m) * trace_m + EPS * (t + diag_max) + g * trace_h / (1 - g)

    lam_est = float(torch.linalg.eigvalsh(M)[-1]) if estimate is None else float(estimate) ** 2
    tries = 0
    for tau in (1e-9, 1e-7, 1e-5, 1e-3):
        t = lam_est * (1 + tau) + 1e-300
        tries += 1
        lam = certify(t)
        if lam is not None:
            return NormBound(math.sqrt(lam), True, "certified eigenvalue (Cholesky)",
                             {"estimate": math.sqrt(max(lam_est, 0.0)), "t": t, "k": k, "tries": tries})
        if estimate is not None and tries == 2:  # the given estimate stalled low: compute the eigenvalue
            lam_est = float(torch.linalg.eigvalsh(M)[-1])
    return NormBound(math.sqrt(max(lam_est, 0.0)), False, "Lanczos", {"k": k},
                     why="the Cholesky certificate failed at every trial")


def _conv_fourier(op: LinearOperator) -> NormBound:
    spec = op.spec
    return fourier_norm_bound(spec["weight"], op.in_shape[1:], spec["padding"])


def norm_bound(
    target: LinearOperator | torch.Tensor | nn.Module,
    in_shape: Sequence[int] | None = None,
    *,
    method: str = "auto",
    max_dense: int = 1024,
    max_cholesky: int = 20000,
    gram_iterations: int = 8,
    power_iterations: int = 200,
    tol: float = 1e-10,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> NormBound:
    """An upper bound of ``|A|_2`` for ``target`` (see the module docstring for the methods).

    Args:
        target: a 2-D matrix, an ``nn.Linear``, an ``nn.Conv2d`` (with ``in_shape = (C, H, W)``) or a
            :class:`~proxnets.operators.LinearOperator` (a ``spec`` lets the structured methods apply).
        method: one of :data:`NORM_METHODS`; ``"auto"`` returns the tightest affordable rigorous bound.
        max_dense: ``"auto"`` uses the dense SVD when ``min(m, n) <= max_dense``.
        max_cholesky: ``"auto"`` uses the certified (banded) Cholesky correction of a stride-1 convolution when
            ``min(m, n) <= max_cholesky`` (other operators: dense Cholesky up to ``4 max_dense``).
        rtol: ``"auto"`` stops at a cheap rigorous bound within ``1 + rtol`` of the power estimate.
    """
    check_choice("method", method, NORM_METHODS)
    check_int("max_dense", max_dense, low=0)
    check_int("max_cholesky", max_cholesky, low=0)
    check_number("rtol", rtol, low=0.0)
    op = as_operator(target, in_shape)
    if method == "dense":
        return dense_norm_bound(op)
    if method == "cholesky":
        return cholesky_norm_bound(op)
    if method == "fourier":
        if not _fourier_applicable(op):
            fail("method", "'fourier' only for stride-1, dilation-1, groups-1 convolutions", op.spec and op.spec.get("kind"))
        return _conv_fourier(op)
    if method == "gram":
        return gram_norm_bound(op, gram_iterations)
    if method == "power":
        s, conv = _power(op, power_iterations, tol, generator)
        return NormBound(s, False, "power iteration", {"converged": conv},
                         why="power iteration is a lower estimate of the norm")
    # auto
    spec = op.spec or {}
    m, n = _sizes(op)
    k = min(m, n)
    if spec.get("kind") == "matrix":
        return dense_norm_bound(op) if k <= 4 * max_dense else gram_norm_bound(op, gram_iterations)
    candidates: list[NormBound] = []
    if _fourier_applicable(op):
        candidates.append(_conv_fourier(op))
        kh, kw = spec["weight"].shape[-2:]
        if kh == kw == 1 and spec["padding"] == 0:  # a 1x1 convolution is I (x) W: the symbol bound is exact
            return dataclasses.replace(candidates[0], details={**candidates[0].details, "exact": "1x1 kernel"})
    lower, lower_conv = None, False
    if _banded_applicable(op) and n <= max_cholesky and n > max_dense:
        candidates.append(cholesky_norm_bound(op))
        lower = candidates[-1].details.get("estimate")
    else:
        lower, lower_conv = _power(op, power_iterations, tol, generator)
        best = min(candidates, key=lambda b: b.value) if candidates else None
        if best is None or best.value > lower * (1 + rtol):
            if k <= max_dense:
                candidates.append(dense_norm_bound(op))
            elif k <= 4 * max_dense:
                candidates.append(cholesky_norm_bound(op))
    rigorous = [b for b in candidates if b.rigorous]
    if not rigorous:
        return NormBound(lower, False, "power iteration", {"converged": lower_conv, "lower": lower},
                         why=f"no rigorous bound is affordable for this operator (min(m, n) = {k}, not a stride-1 convolution "
                             f"below max_cholesky = {max_cholesky} columns)")
    best = min(rigorous, key=lambda b: b.value)
    return dataclasses.replace(best, details={**best.details, "lower": lower, "lower_converged": lower_conv,
                                              "candidates": {b.method: b.value for b in candidates}})
