"""The feature tensor ``Z(x)`` of one CCNN layer, computed in chunks of images.

For an image ``x`` the layer's features are

    Z(x)[p] = ( pool_p( phi( zca( cn( x_j ) ) ) ) - center[p] ) / scale        p = 1..P

with ``x_j`` the patches (:mod:`proxnets.convex.patches`), ``cn`` contrast normalization, ``phi`` a
feature map (:mod:`proxnets.convex.kernels`), ``pool_p`` the average over the ``p``-th pooling
window, ``center (P, D)`` the mean over training images and ``scale`` the scalar that makes the
average ``|Z(x)|_F^2`` equal to ``P``. A :class:`PatchFeaturizer` holds only the fitted pieces
(``O(d^2 + d D + P D)`` numbers); :meth:`PatchFeaturizer.chunks` streams ``Z`` for ``chunk`` images
at a time, so no caller needs the ``(N, P, D)`` tensor ``Q`` in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from proxnets.convex.kernels import RandomFourierFeatures, _cos_, make_feature_map
from proxnets.convex.patches import ZCA, contrast_normalize, extract_patches, fit_zca, grid_shape, pair, pool_features
from proxnets.utils.buffers import workspace_buffer
from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["PatchFeaturizer"]

# the fused random-feature path's (block J, D) buffer: at most this many bytes (well inside a core's L2 with the
# block's patches and the projection beside it); the block size never changes a feature (tested), only the time
RFF_BLOCK_BYTES = 5 * 2**18  # 1.25 MiB


class PatchFeaturizer(nn.Module):
    """Patches -> contrast normalization -> ZCA -> feature map -> average pooling -> centering.

    Parameters mirror CCNN's reference pipeline: ``patch_size`` (int or pair), ``stride``,
    ``padding``, ``contrast_eps`` (``None`` skips contrast normalization), ``zca_eps`` (``None``
    skips whitening), ``kernel`` / ``feature_map`` / ``n_features`` / ``gamma``, ``pool_size`` /
    ``pool_stride`` (average pooling on the patch grid). Call :meth:`fit` once on training images.
    """

    def __init__(
        self,
        *,
        patch_size: int | tuple[int, int] = 5,
        stride: int = 1,
        padding: int = 0,
        contrast_eps: float | None = 0.1,
        zca_eps: float | None = 0.1,
        kernel: str = "rbf",
        feature_map: str = "rff",
        n_features: int = 256,
        gamma: float = 0.2,
        pool_size: int = 2,
        pool_stride: int | None = None,
        max_fit_patches: int = 20000,
        max_fit_images: int = 1000,
    ):
        super().__init__()
        self.patch_size = pair("patch_size", patch_size)
        self.stride = check_int("stride", stride, low=1)
        self.padding = check_int("padding", padding, low=0)
        self.contrast_eps = None if contrast_eps is None else check_number("contrast_eps", contrast_eps, low=0.0, low_inclusive=False)
        self.zca_eps = None if zca_eps is None else check_number("zca_eps", zca_eps, low=0.0, low_inclusive=False)
        self.kernel, self.feature_map_name = kernel, feature_map
        self.n_features = check_int("n_features", n_features, low=1)
        self.gamma = check_number("gamma", gamma, low=0.0, low_inclusive=False)
        self.pool_size = check_int("pool_size", pool_size, low=1)
        self.pool_stride = check_int("pool_stride", pool_stride if pool_stride is not None else pool_size, low=1)
        self.max_fit_patches = check_int("max_fit_patches", max_fit_patches, low=2)
        self.max_fit_images = check_int("max_fit_images", max_fit_images, low=1)
        self.input_shape: tuple[int, int, int] | None = None
        self.grid: tuple[int, int] | None = None  # patch grid (H', W')
        self.pooled_grid: tuple[int, int] | None = None  # (Hp, Wp), P = Hp * Wp
        self.zca: ZCA | None = None
        self.phi: nn.Module | None = None
        self.register_buffer("center", torch.zeros(0))
        self.scale = 1.0
        self.input_scale = 1.0  # multiplies the whitened patches before phi (inverse_poly: into the unit ball)
        self.filters: torch.Tensor | None = None  # (D, r), set by the estimator after solving

    # ------------------------------------------------------------------ fitting
    def fit(self, images: torch.Tensor, generator: torch.Generator | None = None) -> "PatchFeaturizer":
        check_tensor("images", images, ndim=4)
        self.input_shape = tuple(int(s) for s in images.shape[1:])
        self.grid = grid_shape(self.input_shape[1:], self.patch_size, self.stride, self.padding)
        if self.pool_size > min(self.grid):
            fail("pool_size", f"at most the patch grid size {min(self.grid)}", self.pool_size)
        self.pooled_grid = tuple((g - self.pool_size) // self.pool_stride + 1 for g in self.grid)
        n_img = min(images.shape[0], self.max_fit_images)
        perm = torch.randperm(images.shape[0], generator=generator)[:n_img]
        # random subsets, each taken in sorted order: when every image / patch is taken the fit does not
        # depend on the generator at all (sorting before taking a prefix would bias the subset)
        img_idx = perm.sort().values
        # ZCA and landmarks from random patches of a few images (about twice the patches needed)
        n_zca = max(1, min(n_img, -(-2 * self.max_fit_patches // (self.grid[0] * self.grid[1]))))
        zca_img = perm[:n_zca].sort().values
        j = self.grid[0] * self.grid[1]
        pidx = torch.randperm(n_zca * j, generator=generator)[: self.max_fit_patches].sort().values
        picked = []  # the sampled patches, gathered 32 images at a time (not all n_zca J patches at once)
        for c in range(0, n_zca, 32):
            local = pidx[(pidx >= c * j) & (pidx < (c + 32) * j)] - c * j
            picked.append(self._normalized_patches(images[zca_img[c : c + 32]]).reshape(-1, self._patch_dim())[local])
        patches = torch.cat(picked)
        self.zca = fit_zca(patches, self.zca_eps) if self.zca_eps is not None else None
        white = self.zca(patches) if self.zca is not None else patches
        # the inverse polynomial kernel 1 / (2 - <x, y>) lives on the unit ball: scale into it
        self.input_scale = 1.0 / (1.05 * float(white.norm(dim=1).max())) if self.kernel == "inverse_poly" else 1.0
        white = white * self.input_scale
        self.phi = make_feature_map(
            self.feature_map_name, self.kernel, white.shape[1], self.n_features, self.gamma, sample=white, generator=generator
        ).to(images.device)
        del patches, white
        self.center = torch.zeros(0, device=images.device)
        # centering and scale from running sums over chunks (no (n_img, P, D) tensor)
        total = sq_total = None
        workspace: dict = {}  # every chunk's featurization in the same buffers (each chunk is summed before the next)
        for i in range(0, n_img, 16):
            raw = self._raw(images[img_idx[i : i + 16]], workspace).double()  # (b, P, D)
            total = raw.sum(0) if total is None else total + raw.sum(0)
            sq = (raw * raw).sum()
            sq_total = sq if sq_total is None else sq_total + sq
        mean = total / n_img  # (P, D)
        var = sq_total / n_img - (mean * mean).sum()  # mean |Z_i - center|_F^2
        self.center = mean.to(images.dtype)
        self.scale = float((var.clamp_min(0) / mean.shape[0]).sqrt().clamp_min(1e-12))
        return self

    # ---------------------------------------------------------------- transform
    @property
    def n_positions(self) -> int:
        self._check_fitted()
        return self.pooled_grid[0] * self.pooled_grid[1]

    @property
    def dim(self) -> int:
        """``D``, the feature dimension after the feature map."""
        self._check_fitted()
        return int(self.center.shape[1])

    def forward(self, images: torch.Tensor, workspace: dict | None = None) -> torch.Tensor:
        """``Z`` for a batch: ``(N, C, H, W) -> (N, P, D)``.

        ``workspace``: a dict of scratch buffers (:func:`~proxnets.utils.buffers.workspace_buffer`)
        that the fused RFF path computes in and *returns a view of*: the next call with the same
        workspace overwrites the result. Only for a caller that is done with one batch's features
        before it asks for the next (a solver's pass); the values are bitwise those without it.
        """
        self._check_fitted()
        self.check_images(images)
        if self._fused(images):  # _raw_rff's output is its own preallocated tensor: centred in place, the same values
            return self._raw_rff(images, workspace=workspace).sub_(self.center).div_(self.scale)
        return (self._raw(images) - self.center) / self.scale

    def chunks(self, images: torch.Tensor, chunk: int, workspace: dict | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, Z[rows])`` for consecutive slices of ``chunk`` images (``workspace``: see :meth:`forward`;
        each chunk then overwrites the previous one)."""
        check_int("chunk", chunk, low=1)
        for i in range(0, images.shape[0], chunk):
            sl = slice(i, min(i + chunk, images.shape[0]))
            yield sl, self(images[sl], workspace)

    def next_input(self, images: torch.Tensor) -> torch.Tensor:
        """The filter maps that feed the next layer: ``(N, r, Hp, Wp)`` from ``Z(x) @ filters``."""
        if self.filters is None:
            raise RuntimeError("PatchFeaturizer: no filters set; solve the layer first")
        h = self(images) @ self.filters  # (N, P, r)
        return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *self.pooled_grid)

    def check_images(self, images: torch.Tensor) -> None:
        check_tensor("X", images, ndim=4)
        if tuple(images.shape[1:]) != self.input_shape:
            fail("X", f"images of shape (N, {', '.join(map(str, self.input_shape))}) as in fit", f"shape {tuple(images.shape)}")

    # ----------------------------------------------------------------- helpers
    def _patch_dim(self) -> int:
        return self.input_shape[0] * self.patch_size[0] * self.patch_size[1]

    def _normalized_patches(self, images: torch.Tensor) -> torch.Tensor:
        x = extract_patches(images, self.patch_size, self.stride, self.padding)  # (N, H'W', d)
        return contrast_normalize(x, self.contrast_eps) if self.contrast_eps is not None else x

    def whitened_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``zca(cn(x_j)) * input_scale`` for every patch: ``(N, H' W', d)``."""
        x = self._normalized_patches(images)
        x = self.zca(x) if self.zca is not None else x
        return x * self.input_scale if self.input_scale != 1.0 else x

    def _raw(self, images: torch.Tensor, workspace: dict | None = None) -> torch.Tensor:
        if self._fused(images):
            return self._raw_rff(images, workspace=workspace)
        feats = self.phi(self.whitened_patches(images))  # (N, H'W', D)
        return pool_features(feats, self.grid, self.pool_size, self.pool_stride)  # (N, P, D)

    def _fused(self, images: torch.Tensor) -> bool:
        """Whether the fused RFF path runs (it works in place, so not when gradients are needed)."""
        return isinstance(self.phi, RandomFourierFeatures) and not (torch.is_grad_enabled() and images.requires_grad)

    def _raw_rff(self, images: torch.Tensor, block: int | None = None, workspace: dict | None = None) -> torch.Tensor:
        """``pool(sqrt(2/D) cos(zca(cn(x_j)) s W + b))`` with ZCA and ``s`` folded into the projection.

        ``zca(x) s W + b = x (s Z W) + (b - s mu Z W)`` (``Z`` the ZCA matrix, ``mu`` its mean), so one
        GEMM with a bias maps the (contrast-normalized in place) patches to the cosine's argument (no whitened copy, no
        separate bias pass); the cosine is taken in place (:func:`~proxnets.convex.kernels._cos_`), pooling (linear)
        runs before the factor ``sqrt(2/D)``, and ``block`` images at a time keep the ``(block J, D)`` buffer in cache
        (default: as many images as fit in ``RFF_BLOCK_BYTES``; measured at ``J = 576, D = 256`` on cores with a
        2 MiB L2, one thread: blocks of 3, 4 and 8 images (1.7, 2.3, 4.7 MiB) took 1.14x, 1.21x and 1.34x the
        time of 2 images (1.1 MiB), 1 image 1.04x; the features are bitwise the same). The same
        function as :meth:`whitened_patches` followed by ``phi`` and :func:`pool_features`, up to
        rounding (tested); every solver reads the features from here, so cached and streamed
        features are identical. With a ``workspace`` the patches, the ``(block J, D)`` buffer and the
        output are its reused buffers (see :meth:`forward`), else fresh tensors; the same values.
        """
        n, j, d = images.shape[0], self.grid[0] * self.grid[1], self._patch_dim()
        x = workspace_buffer(workspace, "patches", (n, j, d), images)
        x = extract_patches(images, self.patch_size, self.stride, self.padding,
                            out=x if x is not None else torch.empty(n, j, d, dtype=images.dtype, device=images.device))
        if self.contrast_eps is not None:  # contrast_normalize's formula, in place on the contiguous copy
            x.sub_(x.mean(dim=-1, keepdim=True))
            x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).add_(self.contrast_eps))
        w64, b64 = self.phi.weight.double(), self.phi.bias.double()
        if self.zca is not None:
            zw = self.zca.matrix.double() @ w64 * self.input_scale
            bias = b64 - self.zca.mean.double() @ zw
        else:
            zw, bias = w64 * self.input_scale, b64
        zw, bias = zw.to(x.dtype), bias.to(x.dtype)
        dim = zw.shape[1]

        def buffer(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            buf = workspace_buffer(workspace, name, shape, x)
            return buf if buf is not None else torch.empty(shape, dtype=x.dtype, device=x.device)

        out = buffer("features", (n, self.n_positions, dim))
        if block is None:
            block = max(1, RFF_BLOCK_BYTES // (j * dim * x.element_size()))
        # one (block J, D) buffer for every block: a buffer per block is a fresh mmap where the allocator
        # returns large blocks to the system (the benchmark's fixed mmap threshold), i.e. page faults per block
        work = buffer("rff", (min(block, n) * j, dim))
        for i in range(0, n, block):
            xb = x[i : i + block]
            pre = _cos_(torch.addmm(bias, xb.reshape(-1, d), zw, out=work[: xb.shape[0] * j]))  # (b J, D)
            pool_features(pre.view(xb.shape[0], j, dim), self.grid, self.pool_size, self.pool_stride, out=out[i : i + block])
        return out.mul_(self.phi.scale)

    def _check_fitted(self) -> None:
        if self.phi is None:
            raise RuntimeError("PatchFeaturizer: call fit(images) before transforming")
