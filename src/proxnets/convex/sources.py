"""Where the solvers read the features ``Z_i`` from, a chunk of samples at a time.

- :class:`CachedFeatures` -- a tensor ``Q`` of shape ``(n, P, D)`` held in memory (CCNN's reference
  way: fast per pass, memory ``n P D``).
- :class:`StreamedFeatures` -- images plus a fitted :class:`~proxnets.convex.features.PatchFeaturizer`;
  every pass recomputes ``Z`` chunk by chunk: memory ``chunk P D`` besides the images.

Both expose ``n``, ``n_positions`` (P), ``dim`` (D) and ``chunks()`` yielding ``(rows, Z[rows])``.
:func:`score_operator` turns a source into the ``LinearOperator`` ``Theta -> A Theta / sqrt(n)``
on which the project's power iteration estimates ``lambda_max(A^* A / n)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Iterator

import torch

from proxnets.convex.duality import scores, scores_adjoint
from proxnets.convex.features import PatchFeaturizer
from proxnets.operators import LinearOperator, power_iteration
from proxnets.utils.validation import check_int, check_labels, check_tensor

__all__ = ["CachedFeatures", "StreamedFeatures", "cache_features", "score_operator", "gram_norm", "fixed_mmap_threshold"]


class CachedFeatures:
    """Features held in memory: ``z (n, P, D)``."""

    def __init__(self, z: torch.Tensor, chunk: int = 512):
        self.z = check_tensor("z", z, ndim=3, nonempty=True)
        self.chunk = check_int("chunk", chunk, low=1)

    @property
    def n(self) -> int:
        return self.z.shape[0]

    @property
    def n_positions(self) -> int:
        return self.z.shape[1]

    @property
    def dim(self) -> int:
        return self.z.shape[2]

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for i in range(0, self.n, self.chunk):
            sl = slice(i, min(i + self.chunk, self.n))
            yield sl, self.z[sl]

    def subset(self, idx: torch.Tensor) -> "CachedFeatures":
        return CachedFeatures(self.z[idx], self.chunk)


class StreamedFeatures:
    """Features recomputed on every pass from ``images (n, C, H, W)``.

    ``cache_bytes``: a bound on memory spent keeping feature chunks between passes (default 0:
    none). The first pass keeps the chunks it computes, in order, while their total size stays
    within the bound; later passes read those chunks back instead of recomputing them. The kept
    tensors are the ones the featurizer returned, so every pass sees bitwise the same features as
    without a cache (same chunks, same values): the solvers' iterates and certificates are
    unchanged, only the time per pass falls with the fraction cached.
    """

    def __init__(self, featurizer: PatchFeaturizer, images: torch.Tensor, chunk: int = 256, cache_bytes: int = 0):
        self.featurizer = featurizer
        self.images = images
        self.chunk = check_int("chunk", chunk, low=1)
        self.cache_bytes = check_int("cache_bytes", cache_bytes, low=0)
        self._kept: list[torch.Tensor] = []  # features of the first len(_kept) chunks
        self._kept_bytes = 0
        self._full = cache_bytes == 0  # no more chunks will be kept

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def n_positions(self) -> int:
        return self.featurizer.n_positions

    @property
    def dim(self) -> int:
        return self.featurizer.dim

    @property
    def cached_fraction(self) -> float:
        """Fraction of the samples whose features are kept between passes."""
        return min(1.0, len(self._kept) * self.chunk / self.n)

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        with torch.no_grad():
            for c, i in enumerate(range(0, self.n, self.chunk)):
                sl = slice(i, min(i + self.chunk, self.n))
                if c < len(self._kept):
                    yield sl, self._kept[c]
                    continue
                z = self.featurizer(self.images[sl])
                if not self._full and c == len(self._kept) and self._kept_bytes + z.nbytes <= self.cache_bytes:
                    self._kept.append(z)
                    self._kept_bytes += z.nbytes
                else:
                    self._full = True
                yield sl, z

    def subset(self, idx: torch.Tensor) -> "StreamedFeatures":
        return StreamedFeatures(self.featurizer, self.images[idx], self.chunk)


def cache_features(featurizer: PatchFeaturizer, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The feature tensor ``Q (n, P, D)`` filled chunk by chunk into one preallocated tensor."""
    out = None
    with torch.no_grad():
        for rows, z in featurizer.chunks(images, chunk):
            if out is None:
                out = torch.empty(images.shape[0], *z.shape[1:], dtype=z.dtype, device=z.device)
            out[rows] = z
    return out


def score_operator(source, n_classes: int) -> LinearOperator:
    """``Theta (D, K P) -> A Theta / sqrt(n)`` (n, K) and its adjoint, one pass over ``source`` each."""
    scale = source.n ** -0.5

    def forward(theta: torch.Tensor) -> torch.Tensor:
        return torch.cat([scores(z, theta) for _, z in source.chunks()]) * scale

    def adjoint(c: torch.Tensor) -> torch.Tensor:
        out = None
        for rows, z in source.chunks():
            g = scores_adjoint(z, c[rows].to(z.dtype))
            out = g if out is None else out + g
        return out * scale

    shape = (source.dim, n_classes * source.n_positions)
    sample = next(iter(source.chunks()))[1]
    return LinearOperator(forward, adjoint, shape, sample.dtype, sample.device)


def gram_norm(source, n_classes: int, *, max_samples: int = 512, iterations: int = 50, seed: int = 0) -> float:
    """``lambda_max(A^* A / n)`` estimated by power iteration on at most ``max_samples`` samples.

    ``A^* A`` acts on each class block alike, so one class suffices; a subsample estimates the
    mean ``(1/n) sum_i Z_i^* Z_i``. The solvers only take step sizes from it (x 1.1 margin): the
    duality gap they report is valid whatever its error.
    """
    g = torch.Generator().manual_seed(seed)
    sub = source if source.n <= max_samples else source.subset(torch.randperm(source.n, generator=g)[:max_samples])
    if isinstance(sub, StreamedFeatures):
        return _fused_power(sub, iterations, 1e-4, g)
    op = score_operator(sub, 1)
    sigma, _, _ = power_iteration(op, iterations=iterations, tol=1e-4, generator=g)
    return float(sigma) ** 2


def _fused_power(source, iterations: int, tol: float, g: torch.Generator) -> float:
    """``power_iteration(score_operator(source, 1), ...)`` with ``A v`` and ``A^* A v`` in one pass.

    Over streamed features each of the power iteration's two products would recompute them; here
    one pass per iteration yields both (``w_c = Z_c v / sqrt(n)`` kept, ``n x 1`` numbers, then
    ``Z_c^T w_c``), with the same start, the same stopping rule (relative change of ``|A v|``
    ``<= tol`` after the first step) and the same accumulation order, so the same estimate
    (tested) at half the feature computations and no cached features.
    """
    scale = source.n ** -0.5
    sample = next(iter(source.chunks()))[1]
    r = torch.randn((source.dim, source.n_positions), generator=g, dtype=sample.dtype).to(sample.device)
    v = r / r.norm()
    w = torch.empty(source.n, 1, dtype=sample.dtype, device=sample.device)
    sigma = None
    for k in range(iterations):
        out = None
        for rows, z in source.chunks():
            w[rows] = scores(z, v) * scale
            gc = scores_adjoint(z, w[rows])
            out = gc if out is None else out + gc
        u = out * scale
        sigma_new = w.norm()
        nu = u.norm()
        if not bool(torch.isfinite(nu)) or float(nu) == 0.0:  # degenerate: the general routine handles restarts
            op = score_operator(source, 1)
            s, _, _ = power_iteration(op, iterations=iterations, tol=tol, generator=g)
            return float(s) ** 2
        v = u / nu
        rel = float((sigma_new - sigma).abs() / sigma_new.clamp_min(1e-30)) if sigma is not None else math.inf
        sigma = sigma_new
        if k > 0 and rel <= tol:
            break
    final = torch.cat([scores(z, v) for _, z in source.chunks()]) * scale  # |A v| at the last v, as power_iteration
    return float(final.norm()) ** 2


def fixed_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold so that freed large buffers go back to the system.

    glibc raises the threshold after each freed mmap'd block (up to 32 MiB), after which freed
    feature chunks stay in the heap and count in the resident set: peak-RSS measurements then
    reflect allocator history rather than live memory. Returns False where unavailable.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def check_problem_labels(source, y, n_classes) -> None:
    """``y``: ``(n,)`` class indices in ``[0, n_classes)`` for the ``n`` samples of ``source``."""
    check_int("n_classes", n_classes, low=2)
    check_labels("y", y, source.n, n_classes)
