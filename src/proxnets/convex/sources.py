"""Where the solvers read the features ``Z_i`` from, a chunk of samples at a time.

- :class:`CachedFeatures` -- a tensor ``Q`` of shape ``(n, P, D)`` held in memory (CCNN's reference
  way: fast per pass, memory ``n P D``).
- :class:`StreamedFeatures` -- images plus a fitted :class:`~proxnets.convex.features.PatchFeaturizer`;
  every pass recomputes ``Z`` chunk by chunk: memory ``chunk P D`` besides the images.

Both expose ``n``, ``n_positions`` (P), ``dim`` (D) and ``chunks()`` yielding ``(rows, Z[rows])``.
:func:`score_operator` turns a source into the ``LinearOperator`` ``Theta -> A Theta / sqrt(n)``
on which the project's power iteration estimates ``lambda_max(A^* A / n)``; :class:`GramBound`
accumulates, in one pass, a proved upper bound of it (what the dual solver's step size uses).
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
from proxnets.utils.buffers import workspace_buffer
from proxnets.utils.validation import check_int, check_labels, check_tensor, fail

__all__ = [
    "CachedFeatures",
    "StreamedFeatures",
    "cache_features",
    "score_operator",
    "gram_norm",
    "GramBound",
    "deflation_basis",
    "gram_bound",
    "fixed_mmap_threshold",
]


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

    def chunks(self, workspace: dict | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, z[rows])`` views of the cache (``workspace`` unused: nothing is computed)."""
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

    def chunks(self, workspace: dict | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, Z[rows])`` chunk by chunk.

        ``workspace``: a dict of scratch buffers (:func:`~proxnets.utils.buffers.workspace_buffer`)
        that every computed chunk is written into, so each yielded chunk is overwritten by the next:
        only for a caller that is done with a chunk before asking for the next (a solver's pass; not
        one that collects the chunks). Chunks this source keeps (``cache_bytes``) are never computed
        in it. The same values either way.
        """
        with torch.no_grad():
            for c, i in enumerate(range(0, self.n, self.chunk)):
                sl = slice(i, min(i + self.chunk, self.n))
                if c < len(self._kept):
                    yield sl, self._kept[c]
                    continue
                keep = not self._full and c == len(self._kept)  # a candidate for the cache: a fresh tensor
                z = self.featurizer(self.images[sl], workspace=None if keep else workspace)
                if keep and self._kept_bytes + z.nbytes <= self.cache_bytes:
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
    workspace: dict = {}  # each chunk is copied into the result before the next is computed
    with torch.no_grad():
        for rows, z in featurizer.chunks(images, chunk, workspace):
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
    mean ``(1/n) sum_i Z_i^* Z_i``. An estimate, not a bound (it is a lower estimate on the samples
    it sees): CCNN's primal takes its step from it (x 1.1 margin; the duality gap it reports is
    valid whatever its error). The dual solver's step uses the proved bound :class:`GramBound`.
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
    workspace: dict = {}  # each chunk is used before the next is computed
    for k in range(iterations):
        out = None
        for rows, z in source.chunks(workspace):
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
    final = torch.cat([scores(z, v) for _, z in source.chunks(workspace)]) * scale  # |A v| at the last v, as power_iteration
    return float(final.norm()) ** 2


class GramBound:
    """A proved upper bound of ``lambda_max(G)``, ``G = (1/n) sum_i z_i z_i^T``, ``z_i = vec(Z_i)``
    (``P D`` entries), accumulated chunk by chunk in one pass; ``G`` itself (``(P D)^2``) is never formed.

    ``G`` is the per-class block of ``A^* A / n`` (:mod:`proxnets.convex.duality`: ``A^* A`` acts on
    each class alike), so ``lambda_max(A^* A / n) = lambda_max(G)``. Take any ``U`` (``P D`` x ``k``)
    with orthonormal columns (:func:`deflation_basis`: the top eigenvectors of a subsample's ``G``;
    the bound holds for every ``U``, a good one only makes it tight). Split ``z_i = U s_i + z'_i``
    with ``s_i = U^T z_i``, ``z'_i = z_i - U s_i``; in the basis ``[U, U_perp]``

        G = [[A, B^T], [B, C]],   A = (1/n) sum s_i s_i^T,   B = (1/n) sum z'_i s_i^T  (as ``U_perp B``),
                                  C = (1/n) sum z'_i z'_i^T.

    Proof of the bound. For a unit ``x = U x_1 + x_2`` (``x_2 _|_ U``), ``|x_1|^2 + |x_2|^2 = 1`` and
    ``x^T G x = x_1^T A x_1 + 2 x_2^T B x_1 + x_2^T C x_2 <= a |x_1|^2 + 2 b |x_1| |x_2| + c |x_2|^2``
    with ``a = |A|_2``, ``b = |B|_2``, ``c >= |C|_2``; the right side is at most the top eigenvalue of
    the 2 x 2 matrix ``[[a, b], [b, c]]``, i.e. ``(a + c) / 2 + sqrt(((a - c) / 2)^2 + b^2)``. For ``c``:
    with ``y = x_2`` split by positions ``y = (y_1 .. y_P)`` and ``C_pq`` the ``D x D`` blocks,
    ``y^T C y = (1/n) sum_i (sum_p <z'_i[p], y_p>)^2`` and, ``C`` being PSD,
    ``|C_pq|_2 <= sqrt(|C_pp|_2 |C_qq|_2)``, so ``y^T C y <= (sum_p sqrt(|C_pp|_2) |y_p|)^2
    <= (sum_p |C_pp|_2) |y|^2`` (Cauchy-Schwarz): ``c = sum_p lambda_max(C_pp)``, ``P`` eigenvalue
    problems of size ``D``. Also ``lambda_max(G) <= tr(G) = (1/n) sum_i |z_i|^2``; the bound is
    the smaller of the two. Removing the ``k`` directions in which the positions' features are
    coherent is what makes ``c`` small (with ``U = 0`` it is the loose ``sum_p lambda_max(G_pp)``,
    measured 3.4x the true value on mnist5k; with a 256-sample basis of rank 32, 1.007x).

    Round-off: ``A``, ``B``, ``tr G`` and the split are float64 sums of at most ``m = P D + n + k``
    products of the float32 features (exact in float64), so each is within ``gamma_m tr(G)``
    (``gamma_m = m u / (1 - m u)``, ``u = 2^-53``) of its exact value; the ``C_pp`` (``P D^2``
    numbers, the bound's memory) are kept in float32: each entry is a sum over batches of float32
    batch products of the rounded ``z'`` entries, so its error is at most
    ``gamma32 sum_i |z'_i[p]_d| |z'_i[p]_e|`` with ``gamma32 = gamma_{b + N + 2}`` in float32
    (``b`` the batch, ``N`` the number of batches), whose spectral norm is at most
    ``gamma32 sum_i |z'_i[p]|^2``; summed over ``p``, at most ``gamma32 n tr(G)``. ``eigh`` is backward stable
    and ``U``'s departure ``eps = |U^T U - I|_2`` from orthonormality moves the split by ``O(eps)``.
    The value returned adds ``8 (gamma_m + gamma32 + eps) tr(G) + 1e-9 bound`` (about 7e-4 relative
    on mnist5k at n = 4000), a margin that dominates these terms.
    """

    def __init__(self, basis: torch.Tensor, n_positions: int, dim: int, batch: int = 32):
        check_tensor("basis", basis, ndim=2)
        self.batch = check_int("batch", batch, low=1)
        if basis.shape[0] != n_positions * dim:
            fail("basis", f"a ({n_positions * dim}, k) matrix", f"shape {tuple(basis.shape)}")
        self.u = basis.double()
        k = self.u.shape[1]
        self.eps = float(torch.linalg.matrix_norm(self.u.T @ self.u - torch.eye(k, dtype=torch.float64, device=self.u.device), 2)) if k else 0.0
        if not self.eps <= 1e-6:
            fail("basis", "orthonormal columns (|U^T U - I|_2 <= 1e-6)", f"departure {self.eps:.3g}")
        self.n_positions, self.dim, self.n = n_positions, dim, 0
        dev = self.u.device
        self.a = torch.zeros(k, k, dtype=torch.float64, device=dev)
        self.b = torch.zeros(n_positions * dim, k, dtype=torch.float64, device=dev)
        self.c = torch.zeros(n_positions, dim, dim, dtype=torch.float32, device=dev)  # P D^2: float32 (see Round-off)
        self.n_batches = 0
        self.trace = 0.0
        # projected rows wait here until `batch` of them feed one batched product: the (P, D, D)
        # accumulator is read and written once per batch, not once per (small) chunk
        self._buf = torch.empty(self.batch, n_positions * dim, dtype=torch.float32, device=dev)
        self._fill = 0
        self._workspace: dict = {}  # add()'s float64 temporaries, reused by every chunk

    def add(self, z: torch.Tensor) -> None:
        """Accumulate a chunk ``z (b, P, D)``."""
        ws = self._workspace  # the float64 temporaries of every batch in the same buffers (no page faults per chunk)
        pd, k = self.u.shape
        for i in range(0, z.shape[0], self.batch):
            zb = z[i : i + self.batch].reshape(-1, pd)
            b = zb.shape[0]
            q = workspace_buffer(ws, "q", (b, pd), self.u).copy_(zb)  # the chunk in float64
            s = q @ self.u  # (b, k)
            qp = torch.sub(q, torch.mm(s, self.u.T, out=workspace_buffer(ws, "us", (b, pd), q)), out=workspace_buffer(ws, "qp", (b, pd), q))  # z'
            self.a += s.T @ s
            self.b += torch.mm(qp.T, s, out=workspace_buffer(ws, "bs", (pd, k), q))
            self.trace += float(torch.mul(q, q, out=workspace_buffer(ws, "us", (b, pd), q)).sum())
            self.n += b
            take = min(b, self.batch - self._fill)
            self._buf[self._fill : self._fill + take] = qp[:take]
            self._fill += take
            if self._fill == self.batch:
                self._flush()
            if take < b:
                self._buf[: b - take] = qp[take:]
                self._fill = b - take

    def _flush(self) -> None:
        if self._fill:
            zp = self._buf[: self._fill].view(self._fill, self.n_positions, self.dim).transpose(0, 1)  # (P, b, D)
            self.c.baddbmm_(zp.transpose(1, 2), zp)  # C_pp += sum_i z'_i[p] z'_i[p]^T
            self._fill = 0
            self.n_batches += 1

    def block_tops(self, group: int = 4) -> torch.Tensor:
        """``lambda_max(C_pp)`` for every position ``p`` (``(P,)`` float64), ``group`` blocks at a time:
        each block's eigenvalues are those of one eigenvalue problem (bitwise as in one batched call),
        while the float64 copies held at once are ``group D^2`` numbers, not the ``2 P D^2`` of a copy of
        all blocks and its scaled copy; the finiteness check is per group too (the whole-tensor check's
        boolean temporaries were 28 MiB at ``P = 64, D = 256``). Raises ``FloatingPointError`` on a
        non-finite block."""
        check_int("group", group, low=1)
        tops = []
        for i in range(0, self.c.shape[0], group):
            blocks = self.c[i : i + group].double() / self.n
            if not bool(torch.isfinite(blocks).all()):  # checked per group: no (P, D, D) boolean temporaries
                raise FloatingPointError(f"GramBound: non-finite accumulators (C_pp, positions {i} to {i + blocks.shape[0] - 1})")
            tops.append(torch.linalg.eigvalsh(blocks)[:, -1])
        return torch.cat(tops)

    def value(self) -> float:
        """The bound (see the class docstring); raises on non-finite accumulators."""
        if self.n == 0:
            raise RuntimeError("GramBound: no chunk added")
        self._flush()
        self._workspace.clear()  # add()'s temporaries are not held during the eigenvalue problems (peak memory)
        n = self.n
        tr = self.trace / n
        if not (math.isfinite(tr) and bool(torch.isfinite(self.b).all())):
            raise FloatingPointError(f"GramBound: non-finite accumulators (trace {tr})")
        a = float(torch.linalg.eigvalsh(self.a / n)[-1]) if self.a.numel() else 0.0
        b = float(torch.linalg.matrix_norm(self.b / n, 2)) if self.b.numel() else 0.0
        c = float(self.block_tops().clamp_min(0).sum())
        if not all(math.isfinite(v) for v in (a, b, c, tr)):
            raise FloatingPointError(f"GramBound: non-finite accumulators (a={a}, b={b}, c={c}, trace={tr})")
        top = 0.5 * (a + c) + math.sqrt((0.5 * (a - c)) ** 2 + b * b)
        m = self.u.shape[0] + n + self.u.shape[1]
        gamma = m * 2.0**-53 / (1 - m * 2.0**-53)
        m32 = self.batch + self.n_batches + 2
        gamma32 = m32 * 2.0**-24 / (1 - m32 * 2.0**-24)
        bound = min(top, tr)
        return bound + 8.0 * (gamma + gamma32 + self.eps) * tr + 1e-9 * bound


def deflation_basis(source, *, rank: int = 32, max_samples: int = 256, seed: int = 0) -> torch.Tensor:
    """An orthonormal ``(P D, k)`` basis for :class:`GramBound`: the top ``k = min(rank, m)``
    eigenvectors of the Gram ``(1/m) sum z_i z_i^T`` of ``m <= max_samples`` random samples
    (through the ``m x m`` Gram). Only the tightness of the bound depends on it, never its validity."""
    check_int("rank", rank, low=0)
    check_int("max_samples", max_samples, low=1)
    g = torch.Generator().manual_seed(seed)
    sub = source if source.n <= max_samples else source.subset(torch.randperm(source.n, generator=g)[:max_samples].sort().values)
    q = torch.cat([z.reshape(z.shape[0], -1) for _, z in sub.chunks()])  # (m, P D), the features' dtype
    k = min(rank, q.shape[0])
    if k == 0:
        return torch.zeros(q.shape[1], 0, dtype=torch.float64, device=q.device)
    _, vecs = torch.linalg.eigh((q @ q.T).double())
    w = (q.T @ vecs[:, -k:].to(q.dtype)).double()  # (P D, k): Q^T v spans the top eigenvectors of Q^T Q
    del q
    basis, _ = torch.linalg.qr(w)
    return basis


def gram_bound(source, *, rank: int = 32, max_samples: int = 256, seed: int = 0) -> float:
    """A proved upper bound of ``lambda_max(A^* A / n)`` over ``source``: a subsample for the basis,
    then one pass (:class:`GramBound`). :func:`~proxnets.convex.dual.solve_dual` does the same
    inside its first pass."""
    acc = GramBound(deflation_basis(source, rank=rank, max_samples=max_samples, seed=seed), source.n_positions, source.dim)
    for _, z in source.chunks():
        acc.add(z)
    return acc.value()


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
