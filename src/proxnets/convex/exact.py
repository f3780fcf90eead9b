"""The matrix-valued patch kernel of DCCNN, evaluated in streamed blocks (no factor, no feature map).

For images ``x_i`` with whitened patches ``x_ia`` (``a = 1..J`` patch positions, see
:mod:`proxnets.convex.patches`) and a patch kernel ``k``, the pooled position ``p`` averages the
patches of its window ``W_p``. With the pooling matrix ``S (J, P)`` (``S[a, p] = 1/|W_p|`` for
``a in W_p``) the kernel of the pooled RKHS features ``Z_i[p] = sum_a S[a, p] phi(x_ia)`` is the
``P x P`` matrix

    K(x_i, x_j)[p, q] = <Z_i[p], Z_j[q]> / s = (S^T k(X_i, X_j) S)[p, q] / s,

``k(X_i, X_j)`` the ``J x J`` patch Gram block and ``s`` one global scale (the mean of
``tr K(x_i, x_i) / P`` over training images equals 1, as CCNN's features are scaled). A block of
``b_1 x b_2`` images (at most :data:`BLOCK_PATCHES` patches per side, sized to stay in cache) is one
GEMM on the stacked patches (for RBF the exponent itself, see :meth:`PatchKernel._gram`), the kernel
applied in place, then the pooling applied once to the Gram block as sums of strided slices: no
patch pair is formed twice and nothing of size ``n^2 P^2`` is held.

:class:`PatchKernel` holds the fitted patch pipeline and the training images (patches are
recomputed per block);
:meth:`PatchKernel.quadratic` computes ``M_k = sum_ij w_ki w_kj K(x_i, x_j)`` over half the block
pairs (symmetry); :meth:`PatchKernel.contract` computes ``C_i = sum_j b_j K(x_i, x_j)`` for several
weight vectors ``b`` at once, streaming ``(rows, support)`` blocks, each reduced on the fly by a
caller's function (e.g. ``v^T C_i v``): memory one block plus the reduced output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.kernels import KERNELS, kernel as named_kernel
from proxnets.utils.validation import fail

__all__ = ["ExactLayer", "PatchKernel", "check_psd_kernel"]

BLOCK_PATCHES = 512  # patches per side of one Gram block: at most 512^2 float64 = 2 MiB (the L2/L3 cache, not RAM)
PATCH_CACHE_BYTES = 2 * 2**20  # the training patches (n J d numbers) are kept when they fit in this: small problems only
SYMMETRIC_BYTES = 4 * 2**20  # contract over the training set holds every C_i (m n P^2 numbers) when they fit in this


def check_psd_kernel(k: Callable, sample: torch.Tensor, name: str = "kernel") -> float:
    """Raise unless ``k`` is positive semi-definite on ``sample (m, d)``; returns the smallest
    relative eigenvalue. A kernel with a negative eigenvalue has no RKHS: the dual's
    ``lambda_max`` constraint would not be a spectral norm and weak duality could fail."""
    g = k(sample, sample).double()
    if not torch.isfinite(g).all():
        fail(name, "a kernel with finite values on the training patches", "non-finite kernel values")
    if (g - g.T).abs().max() > 1e-8 * g.abs().max().clamp_min(1e-300):
        fail(name, "a symmetric kernel k(x, y) = k(y, x)", "an asymmetric kernel matrix")
    ev = torch.linalg.eigvalsh((g + g.T) / 2)
    rel = float(ev[0] / ev[-1].abs().clamp_min(1e-300))
    if rel < -1e-8:  # rounding of a PSD Gram matrix of this size stays far above this
        fail(name, "a positive semi-definite kernel", f"a kernel matrix on {sample.shape[0]} training patches with "
             f"eigenvalue {float(ev[0]):.3g} (largest {float(ev[-1]):.3g})")
    return rel


class PatchKernel:
    """Pooled patch kernel ``K(x, x') (P x P)`` of one layer (see the module docstring).

    ``featurizer`` gives patches, contrast normalization, ZCA and the pooling geometry (its own
    feature map is not used); ``kernel`` is a name of :data:`~proxnets.convex.kernels.KERNELS` or a
    callable ``(a (m, d), b (m', d)) -> (m, m')`` (checked positive semi-definite on training patches).
    """

    def __init__(self, featurizer: PatchFeaturizer, kernel: str | Callable = "rbf", gamma: float = 0.2,
                 dtype: torch.dtype = torch.float64):
        self.featurizer, self.kernel_name, self.gamma, self.dtype = featurizer, kernel, gamma, dtype
        self.scale = 1.0
        self.input_scale = 1.0
        self.dense: torch.Tensor | None = None  # only the broken memory variant holds the full kernel
        self._cache: torch.Tensor | None = None  # the whitened training patches, when they fit in PATCH_CACHE_BYTES

    # ------------------------------------------------------------------ fitting
    def fit(self, images: torch.Tensor, generator: torch.Generator | None = None) -> "PatchKernel":
        feat = self.featurizer.fit(images, generator)
        grid, pooled = feat.grid, feat.pooled_grid
        j = grid[0] * grid[1]
        eye = torch.eye(j, dtype=self.dtype, device=images.device).reshape(j, 1, *grid)
        pool = F.avg_pool2d(eye, feat.pool_size, stride=feat.pool_stride) if (feat.pool_size, feat.pool_stride) != (1, 1) else eye
        self.pool = pool.reshape(j, pooled[0] * pooled[1]).contiguous()  # S (J, P)
        self.train_images = images  # patches are recomputed per block: n C H W numbers, not n J d
        self.n_patches = j
        patches = torch.cat([feat.whitened_patches(images[i : i + 32]).norm(dim=-1).amax(1) for i in range(0, images.shape[0], 32)])
        if self.kernel_name == "inverse_poly":  # 1 / (2 - <x, y>) lives on the unit ball
            self.input_scale = 1.0 / (1.05 * float(patches.max().clamp_min(1e-12)))
        if not callable(self.kernel_name) and self.kernel_name not in KERNELS:
            fail("kernel", f"one of {list(KERNELS)} or a callable (a, b) -> k(a, b)", self.kernel_name)
        # 200 images (all when n <= 200: no dependence on the generator) in chunks of 16: 300 patches
        # for the PSD check, and the scale: mean tr K(x_i, x_i) / P = 1 over these images
        pick = torch.randperm(images.shape[0], generator=generator)[:200].sort().values
        flat_idx = torch.randperm(pick.numel() * j, generator=generator)[:300]
        self.scale, tr, sample = 1.0, [], []
        for c in range(0, pick.numel(), 16):
            sub = self._patches_of(images[pick[c : c + 16]])  # (b, J, d)
            local = flat_idx[(flat_idx >= c * j) & (flat_idx < c * j + sub.shape[0] * j)] - c * j
            sample.append(sub.reshape(-1, sub.shape[-1])[local])
            tr += [torch.diagonal(self._block(sub[i : i + 1], sub[i : i + 1])[0, :, 0, :]).sum() for i in range(sub.shape[0])]
        check_psd_kernel(self._k, torch.cat(sample))  # a permutation of the sampled patches: the same spectrum
        self.scale = float(torch.stack(tr).mean() / self.n_positions)
        if not self.scale > 0:
            fail("kernel", "a kernel with positive values k(x, x) on the training patches", f"mean trace {self.scale}")
        # every pass recomputes the patches of each block (profile, quick variant fits: 17% of a fit); a
        # small training set keeps them instead, a fixed cap: memory stays O(1) in n above it
        d = self.featurizer._patch_dim()
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self._cache = None
        if images.shape[0] * j * d * itemsize <= PATCH_CACHE_BYTES:
            self._cache = torch.cat([self._patches_of(images[i : i + 32]) for i in range(0, images.shape[0], 32)])
        return self

    def _train_patches(self, idx: torch.Tensor) -> torch.Tensor:
        """Whitened patches ``(b, J, d)`` of the training images ``idx`` (cached or recomputed)."""
        return self._cache[idx] if self._cache is not None else self._patches_of(self.train_images[idx])

    def _k(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The patch kernel (looked up per call: no closure is stored, the object pickles)."""
        k = self.kernel_name if callable(self.kernel_name) else named_kernel(self.kernel_name, self.gamma)
        return k(a, b)

    @property
    def n(self) -> int:
        return self.train_images.shape[0]

    def _patches_of(self, images: torch.Tensor) -> torch.Tensor:
        return self.featurizer.whitened_patches(images).to(self.dtype) * self.input_scale

    @property
    def n_positions(self) -> int:
        return self.pool.shape[1]

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """New images checked against the fitted shape (``rows`` of :meth:`contract`)."""
        self.featurizer.check_images(images)
        return images

    # ----------------------------------------------------------------- blocks
    def materialize(self) -> None:
        """Hold the full kernel tensor ``(n, P, n, P)`` (``n^2 P^2`` numbers): the suite's deliberately
        broken memory variant only -- what the streamed passes avoid."""
        idx = torch.arange(self.n, device=self.train_images.device)
        self.dense = torch.cat([torch.cat([self._pair(idx[a : a + 8], idx[b : b + 8]) for b in range(0, self.n, 8)], 2)
                                for a in range(0, self.n, 8)], 0)

    def _gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Patch Gram block ``k(a, b)`` ``(m1, m2)``: one GEMM, then the named kernel in place.

        RBF: the exponent ``-gamma |a - b|^2 = [sqrt(2 gamma) a, -gamma |a|^2, 1] . [sqrt(2 gamma) b, 1, -gamma |b|^2]``
        comes out of one GEMM with two extra columns, so the block is swept three times (GEMM,
        clamp, exp) instead of six; blocks of :data:`BLOCK_PATCHES` patches per side stay in cache."""
        if callable(self.kernel_name):
            return self._k(a, b).to(self.dtype)
        if self.kernel_name == "rbf":
            r, one_a, one_b = math.sqrt(2 * self.gamma), a.new_ones(a.shape[0], 1), b.new_ones(b.shape[0], 1)
            la = torch.cat([r * a, -self.gamma * (a * a).sum(1, keepdim=True), one_a], 1)
            rb = torch.cat([r * b, one_b, -self.gamma * (b * b).sum(1, keepdim=True)], 1)
            return (la @ rb.T).clamp_max_(0.0).exp_()
        g = a @ b.T
        if self.kernel_name == "inverse_poly":  # 1 / (2 - <a, b>)
            return g.neg_().add_(2.0).reciprocal_()
        return g  # linear

    def _window_mean(self, v: torch.Tensor, axis: int) -> torch.Tensor:
        """Average pooling of the patch grid held at dims ``(axis, axis + 1)`` of ``v``: a sum of
        ``|W|`` strided slices (no copy of ``v``; the same windows as ``avg_pool2d``, overlapping or not)."""
        feat = self.featurizer
        size, stride, (hp, wp) = feat.pool_size, feat.pool_stride, feat.pooled_grid
        out = None
        for du in range(size):
            for dv in range(size):
                idx = [slice(None)] * v.ndim
                idx[axis] = slice(du, du + stride * (hp - 1) + 1, stride)
                idx[axis + 1] = slice(dv, dv + stride * (wp - 1) + 1, stride)
                part = v[tuple(idx)]
                out = part.clone(memory_format=torch.contiguous_format) if out is None else out.add_(part)
        return out.mul_(1.0 / (size * size))

    def _pool_block(self, g: torch.Tensor, b1: int, b2: int) -> torch.Tensor:
        """``S^T k S`` of a patch Gram block ``(b1 J, b2 J)`` as ``(b1, P, b2, P)``: pooling of the
        columns, then of the rows (``|W|`` adds per output; the dense pooling matrix would cost ``J``)."""
        feat, j, p = self.featurizer, self.n_patches, self.n_positions
        if (feat.pool_size, feat.pool_stride) == (1, 1):
            return g.reshape(b1, j, b2, j)
        hg, wg = feat.grid
        t = self._window_mean(g.reshape(b1 * j * b2, hg, wg), 1)  # (b1 J b2, Hp, Wp)
        t = self._window_mean(t.reshape(b1, hg, wg, b2 * p), 1)  # (b1, Hp, Wp, b2 P)
        return t.reshape(b1, p, b2, p)

    def _pair(self, ia: torch.Tensor | None, ib: torch.Tensor | None, xa: torch.Tensor | None = None,
              xb: torch.Tensor | None = None) -> torch.Tensor:
        """``K(x_a, x_b)`` ``(b1, P, b2, P)`` (scaled) for training indices ``ia``, ``ib`` (or given
        patches ``xa (b1, J, d)``, ``xb``)."""
        if self.dense is not None and ia is not None:
            return self.dense[ia][:, :, ib]
        xa = self._train_patches(ia) if xa is None else xa
        xb = self._train_patches(ib) if xb is None else xb
        b1, j, d = xa.shape
        return self._pool_block(self._gram(xa.reshape(b1 * j, d), xb.reshape(-1, d)), b1, xb.shape[0]).div_(self.scale)

    def _block(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """``K(x_a, x_b)`` for patch blocks ``(b1, J, d)``, ``(b2, J, d)`` -> ``(b1, P, b2, P)``."""
        return self._pair(None, None, xa, xb)

    @property
    def _step(self) -> int:
        return max(1, BLOCK_PATCHES // self.n_patches)  # images per block side

    def quadratic(self, weights: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
        """``M_k = sum_ij w_ki w_kj K(x_i, x_j)`` ``(m, P, P)`` over the training images ``support``
        (default: those with a nonzero weight). ``K(x_j, x_i) = K(x_i, x_j)^T``, so only block pairs
        ``A <= B`` are evaluated, each off-diagonal one added with its transpose: half the pass."""
        if support is None:
            support = torch.nonzero((weights != 0).any(0)).flatten()
        m, p = weights.shape[0], self.n_positions
        out = torch.zeros(m, p, p, dtype=self.dtype, device=weights.device)
        ws, step = weights[:, support].to(self.dtype), self._step
        blocks = [(support[a : a + step], ws[:, a : a + step]) for a in range(0, support.numel(), step)]
        for ia_pos, (ia, wa) in enumerate(blocks):
            xa = self._train_patches(ia) if self.dense is None else None
            for ib, wb in blocks[ia_pos:]:
                t = torch.einsum("apbq,ma,mb->mpq", self._pair(ia, ib, xa), wa, wb)
                out += t if ib is ia else t + t.transpose(1, 2)
        return (out + out.transpose(1, 2)) / 2

    def contract(self, weights: torch.Tensor, rows: torch.Tensor | None = None, support: torch.Tensor | None = None,
                 reduce: Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]] | None = None):
        """``C[k, i] = sum_j weights[k, j] K(x_i, x_j)`` over training ``j`` (only ``weights != 0``).

        ``weights (m, n)``; ``rows``: images ``(N, C, H, W)`` ``i`` (default: the training images).
        Returns ``(m, N, P, P)``; with ``reduce`` the blocks ``C[:, rows]`` ``(m, b, P, P)`` are reduced
        while streaming by ``reduce(block, rows) -> tensors with the row axis at dim 1`` and the
        pieces concatenated: memory one Gram block of at most :data:`BLOCK_PATCHES` patches per side,
        one ``(m, b, P, P)`` block and the reduced output. Patches are recomputed per block from the images.
        """
        train = rows is None
        n_rows = self.n if train else rows.shape[0]
        if support is None:
            support = torch.nonzero((weights != 0).any(0)).flatten()
        m, p, step = weights.shape[0], self.n_positions, self._step
        if train and self.dense is None and m * n_rows * p * p * torch.empty(0, dtype=self.dtype).element_size() <= SYMMETRIC_BYTES:
            return self._contract_symmetric(weights, reduce)
        ws = weights[:, support].to(self.dtype)  # (m, s)
        out: tuple[torch.Tensor, ...] | None = None  # allocated from the first block's shapes: no concatenation copy
        idx = torch.arange(n_rows, device=weights.device)
        cols = [(support[b : b + step], ws[:, b : b + step]) for b in range(0, support.numel(), step)]
        for a in range(0, n_rows, step):
            ia = idx[a : a + step] if train else None
            xa = None if (train and self.dense is not None) else (
                self._train_patches(ia) if train else self._patches_of(rows[a : a + step]))
            acc = torch.zeros(m, min(step, n_rows - a), p, p, dtype=self.dtype, device=weights.device)
            for ib, wb in cols:
                acc += torch.einsum("apbq,mb->mapq", self._pair(ia, ib, xa), wb)
            sl = slice(a, a + acc.shape[1])
            piece = (acc,) if reduce is None else reduce(acc, sl)
            if out is None:
                out = tuple(t.new_zeros(t.shape[0], n_rows, *t.shape[2:]) for t in piece)
            for o, t in zip(out, piece):
                o[:, sl] = t
        if out is None:
            return torch.zeros(m, n_rows, p, p, dtype=self.dtype, device=weights.device)
        return out[0] if reduce is None else out

    def _contract_symmetric(self, weights: torch.Tensor, reduce):
        """:meth:`contract` over the training set for a small problem: every ``C_i`` is held
        (``m n P^2`` numbers, at most :data:`SYMMETRIC_BYTES`), so each block pair ``A <= B`` of the
        training images is evaluated once and serves both row blocks (``K_BA = K_AB^T``): about half the
        Gram blocks of the streamed pass when the support is most of the set. Same sums, other order."""
        m, p, step, n = weights.shape[0], self.n_positions, self._step, self.n
        ws = weights.to(self.dtype)
        acc = torch.zeros(m, n, p, p, dtype=self.dtype, device=weights.device)
        idx = torch.arange(n, device=weights.device)
        blocks = [slice(a, min(a + step, n)) for a in range(0, n, step)]
        live = [bool((ws[:, sl] != 0).any()) for sl in blocks]
        for ia_pos, sa in enumerate(blocks):
            ia = idx[sa]
            xa = self._train_patches(ia)
            for ib_pos in range(ia_pos, len(blocks)):
                sb = blocks[ib_pos]
                if not (live[ib_pos] or live[ia_pos]):
                    continue
                kab = self._pair(ia, idx[sb], xa)  # (b1, P, b2, P)
                if live[ib_pos]:  # C_i for i in A: sum_j in B w_j K_ij
                    acc[:, sa] += torch.einsum("apbq,mb->mapq", kab, ws[:, sb])
                if ib_pos != ia_pos and live[ia_pos]:  # C_j for j in B: sum_i in A w_i K_ji, K_ji[q, p] = K_ij[p, q]
                    acc[:, sb] += torch.einsum("apbq,ma->mbqp", kab, ws[:, sa])
        return acc if reduce is None else reduce(acc, slice(0, n))


class ExactLayer:
    """One exact-kernel layer: its :class:`PatchKernel` and the recovered binary problems ``binary``
    (:class:`~proxnets.convex.hinge.BinaryDual`: ``b = alpha y``, position weights ``phi (P, r_k)``,
    head ``(r_k, P)``), with the traces of their solve in ``traces``.

    Filter ``l`` of problem ``k`` is the RKHS function ``g_kl = sum_j b_kj sum_q phi_kl[q] Z~_j[q]``
    (a kernel expansion over the support patches; unit RKHS norm, see :mod:`proxnets.convex.hinge`).
    Its response to patch ``z`` is ``<g_kl, phi(z)> = sum_j b_kj sum_a k(z, x_ja) (S phi_kl)[a] / s``
    (kernel values against the support patches), and pooled over the windows of image ``x``

        h_kl(x)[p] = sum_a' S[a', p] <g_kl, phi(x_a')> = sum_j b_kj (K(x, x_j) phi_kl)[p],

    which :meth:`maps` streams in :meth:`PatchKernel.contract` blocks. The next layer reads the maps
    of the channels ``filters`` (set by the estimator) on the pooled grid ``(Hp, Wp)``, as the
    random-feature layers do.
    """

    def __init__(self, kernel: PatchKernel):
        self.kernel = kernel
        self.binary: list = []
        self.traces: list = []
        self.filters: torch.Tensor | None = None  # indices into the R = sum_k r_k filters passed on

    @property
    def scales(self) -> torch.Tensor:
        """``sigma`` of every filter ``(R,)``: the norm of its head row (the singular value of ``S``)."""
        return torch.cat([b.head.norm(dim=1) for b in self.binary])

    def select(self, r: int | None) -> torch.Tensor:
        """Indices of the ``r`` filters of largest scale (all for ``None``), in filter order."""
        sig = self.scales
        if r is None or r >= sig.numel():
            return torch.arange(sig.numel())
        return torch.argsort(-sig, stable=True)[:r].sort().values

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """``h_kl(x)[p]`` for every filter of every problem: ``(N, R, P)`` (float64)."""
        kern = self.kernel
        kern.patches(x)
        w = torch.stack([b.weights for b in self.binary])  # (m, n)
        r_tot = sum(b.phi.shape[1] for b in self.binary)
        if not bool((w != 0).any()):  # no support: every filter is the zero function
            return torch.zeros(x.shape[0], r_tot, kern.n_positions, dtype=kern.dtype, device=x.device)

        def reduce(c: torch.Tensor, rows: slice) -> tuple[torch.Tensor]:  # c (m, b, P, P) -> (1, b, R, P)
            return (torch.cat([torch.einsum("ipq,ql->ilp", c[k], b.phi) for k, b in enumerate(self.binary)], 1)[None],)

        return kern.contract(w, rows=x, reduce=reduce)[0][0]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``f_k(x) = sum_l sum_p head_k[l, p] h_kl(x)[p]`` per binary problem: ``(N, m)``."""
        h, out, start = self.maps(x), [], 0
        for b in self.binary:
            r = b.phi.shape[1]
            out.append(torch.einsum("ilp,lp->i", h[:, start : start + r], b.head))
            start += r
        return torch.stack(out, 1)

    def next_input(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen filters' maps ``(N, r, Hp, Wp)``: the next layer's images."""
        if self.filters is None:
            raise RuntimeError("ExactLayer: no filters chosen; solve the layer first")
        h = self.maps(x)[:, self.filters]
        return h.reshape(h.shape[0], h.shape[1], *self.kernel.featurizer.pooled_grid)
