"""The matrix-valued patch kernel of DCCNN, evaluated in streamed blocks (no factor, no feature map).

For images ``x_i`` with whitened patches ``x_ia`` (``a = 1..J`` patch positions, see
:mod:`proxnets.convex.patches`) and a patch kernel ``k``, the pooled position ``p`` averages the
patches of its window ``W_p``. With the pooling matrix ``S (J, P)`` (``S[a, p] = 1/|W_p|`` for
``a in W_p``) the kernel of the pooled RKHS features ``Z_i[p] = sum_a S[a, p] phi(x_ia)`` is the
``P x P`` matrix

    K(x_i, x_j)[p, q] = <Z_i[p], Z_j[q]> / s = (S^T k(X_i, X_j) S)[p, q] / s,

``k(X_i, X_j)`` the ``J x J`` patch Gram block and ``s`` one global scale (the mean of
``tr K(x_i, x_i) / P`` over training images equals 1, as CCNN's features are scaled). A block of
``b_1 x b_2`` images is one GEMM on the stacked patches, the kernel applied elementwise, then the
pooling as two small GEMMs: no patch pair is formed twice and nothing of size ``n^2 P^2`` is held.

:class:`PatchKernel` holds the fitted patch pipeline and the training images (patches are
recomputed per block);
:meth:`PatchKernel.contract` computes ``C_i = sum_j b_j K(x_i, x_j)`` for several weight vectors
``b`` at once, streaming ``(rows, support)`` blocks, reduced on the fly when asked
(``sum_i a_i C_i`` or ``V^T C_i V``): memory ``n r^2`` per weight vector plus one block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.kernels import KERNELS, kernel as named_kernel
from proxnets.utils.validation import fail

__all__ = ["PatchKernel", "check_psd_kernel"]

BLOCK_PATCHES = 1024  # patches per side of one Gram block: 1024^2 float64 = 8 MiB


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
        patches = torch.cat([feat.whitened_patches(images[i : i + 256]).norm(dim=-1).amax(1) for i in range(0, images.shape[0], 256)])
        if self.kernel_name == "inverse_poly":  # 1 / (2 - <x, y>) lives on the unit ball
            self.input_scale = 1.0 / (1.05 * float(patches.max().clamp_min(1e-12)))
        if not callable(self.kernel_name) and self.kernel_name not in KERNELS:
            fail("kernel", f"one of {list(KERNELS)} or a callable (a, b) -> k(a, b)", self.kernel_name)
        sub = self._patches_of(images[torch.randperm(images.shape[0], generator=generator)[:200].sort().values])
        flat = sub.reshape(-1, sub.shape[-1])
        check_psd_kernel(self._k, flat[torch.randperm(flat.shape[0], generator=generator)[:300]])
        # scale: mean tr K(x_i, x_i) / P = 1 over (a sample of) training images
        self.scale = 1.0
        tr = torch.stack([torch.diagonal(self._block(sub[i : i + 1], sub[i : i + 1])[0, :, 0, :]).sum() for i in range(sub.shape[0])])
        self.scale = float(tr.mean() / self.n_positions)
        if not self.scale > 0:
            fail("kernel", "a kernel with positive values k(x, x) on the training patches", f"mean trace {self.scale}")
        return self

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
    def _block(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """``K(x_a, x_b)`` for image blocks ``(b1, J, d)``, ``(b2, J, d)`` -> ``(b1, P, b2, P)``."""
        b1, j, d = xa.shape
        b2 = xb.shape[0]
        g = self._k(xa.reshape(b1 * j, d), xb.reshape(b2 * j, d))  # (b1 J, b2 J) patch Gram block
        g = (self.pool.T @ g.reshape(b1, j, b2 * j)).reshape(b1 * self.n_positions * b2, j)  # pool rows: (b1 P b2, J)
        g = (g @ self.pool).reshape(b1, self.n_positions, b2, self.n_positions)  # pool columns
        return g / self.scale

    def contract(self, weights: torch.Tensor, rows: torch.Tensor | None = None, support: torch.Tensor | None = None,
                 *, left: torch.Tensor | None = None, project: torch.Tensor | None = None) -> torch.Tensor:
        """``C[k, i] = sum_j weights[k, j] K(x_i, x_j)`` over training ``j`` (only ``weights != 0``).

        ``weights (m, n)``; ``rows``: images ``(N, C, H, W)`` ``i`` (default: the training images).
        Returns ``(m, N, P, P)``, or reduced while streaming: with ``left (m, N)`` the matrix
        ``sum_i left[k, i] C[k, i]`` ``(m, P, P)``; with ``project (m, P, r)`` the blocks
        ``V_k^T C[k, i] V_k`` ``(m, N, r, r)``. Patches are recomputed per block from the images
        (memory: the images, one block of at most :data:`BLOCK_PATCHES` patches per side, the output).
        """
        train = rows is None
        rows = self.train_images if train else rows
        if support is None:
            support = torch.nonzero((weights != 0).any(0)).flatten()
        m, n_rows, p = weights.shape[0], rows.shape[0], self.n_positions
        if left is not None:
            out = torch.zeros(m, p, p, dtype=self.dtype, device=rows.device)
        elif project is not None:
            out = torch.zeros(m, n_rows, project.shape[2], project.shape[2], dtype=self.dtype, device=rows.device)
        else:
            out = torch.zeros(m, n_rows, p, p, dtype=self.dtype, device=rows.device)
        if support.numel() == 0:
            return out
        step = max(1, BLOCK_PATCHES // self.n_patches)
        ws = weights[:, support].to(self.dtype)  # (m, s)
        for a in range(0, n_rows, step):
            xa = self._patches_of(rows[a : a + step])
            acc = torch.zeros(m, xa.shape[0], p, p, dtype=self.dtype, device=rows.device)
            for b in range(0, support.numel(), step):
                xb = self._patches_of(self.train_images[support[b : b + step]])
                acc += torch.einsum("ipjq,mj->mipq", self._block(xa, xb), ws[:, b : b + step])  # (m, b1, P, P)
            if left is not None:
                out += torch.einsum("mipq,mi->mpq", acc, left[:, a : a + step].to(self.dtype))
            elif project is not None:
                out[:, a : a + step] = torch.einsum("mpl,mipq,mqr->milr", project, acc, project)
            else:
                out[:, a : a + step] = acc
        return out
