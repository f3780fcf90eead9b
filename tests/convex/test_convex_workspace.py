"""Scratch buffers reused across the chunks of a streamed pass change no value, and no caller that keeps
a chunk is handed one.

- :func:`~proxnets.convex.patches.extract_patches` with ``out`` copies the same patches as ``F.unfold``;
  :func:`~proxnets.convex.patches.pool_features` with ``out`` writes the same pooled values.
- ``StreamedFeatures.chunks(workspace)`` yields bitwise the chunks of ``chunks()``, all in one buffer
  (the reuse happens), while the chunks a cache keeps stay distinct and intact across passes.
- :func:`~proxnets.convex.dual.solve_dual` and :func:`~proxnets.convex.primal.solve_primal` over a streamed
  source (their passes reuse one workspace) give bitwise the trace and iterates of a source that
  computes every chunk afresh.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proxnets.convex.dual import solve_dual
from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.patches import extract_patches, pool_features
from proxnets.convex.sources import CachedFeatures, StreamedFeatures, cache_features, deflation_basis


def _featurizer(n=40):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n, 1, 14, 14, generator=g)
    f = PatchFeaturizer(patch_size=5, n_features=24, gamma=0.2, pool_size=2).fit(x, torch.Generator().manual_seed(0))
    return f, x


class _Fresh:
    """A streamed source that ignores any workspace: every chunk a fresh tensor (the code before reuse)."""

    def __init__(self, source):
        self.source = source
        self.n, self.n_positions, self.dim = source.n, source.n_positions, source.dim

    def chunks(self, workspace=None):
        return self.source.chunks()


@pytest.mark.parametrize("size,stride,padding,channels", [(5, 1, 0, 1), (3, 2, 1, 3), ((2, 4), 3, 2, 2)])
def test_patches_into_a_buffer_equal_unfold(size, stride, padding, channels):
    x = torch.randn(3, channels, 11, 9, generator=torch.Generator().manual_seed(1))
    view = extract_patches(x, size, stride, padding)
    out = torch.full(view.shape, float("nan"))
    got = extract_patches(x, size, stride, padding, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, view)
    with pytest.raises(ValueError, match="out"):
        extract_patches(x, size, stride, padding, out=torch.empty(view.shape[0], view.shape[1] + 1, view.shape[2]))


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 3), (3, 1), (1, 1)])
def test_pooling_into_a_slice_equals_pooling(size, stride):
    grid = (8, 7)
    feats = torch.randn(5, grid[0] * grid[1], 6, generator=torch.Generator().manual_seed(2))
    ref = pool_features(feats, grid, size, stride)
    big = torch.full((9, ref.shape[1], ref.shape[2]), float("nan"))
    got = pool_features(feats, grid, size, stride, out=big[2:7])
    assert torch.equal(got, ref) and torch.equal(big[2:7], ref)
    assert bool(torch.isnan(big[:2]).all() and torch.isnan(big[7:]).all())  # nothing written outside the slice


def test_workspace_chunks_are_the_same_values_in_one_buffer():
    f, x = _featurizer()
    src = StreamedFeatures(f, x, chunk=6)  # 40 = 6 * 6 + 4: a short last chunk
    fresh = [z.clone() for _, z in src.chunks()]
    workspace: dict = {}
    ptrs = set()
    for (rows, z), ref in zip(src.chunks(workspace), fresh):
        assert torch.equal(z, ref), rows
        ptrs.add(z.data_ptr())
    assert len(ptrs) == 1  # every chunk written into the same buffer
    assert torch.equal(f(x), cache_features(f, x, 6))  # no workspace: the whole batch as before


def test_cached_chunks_never_share_the_workspace():
    f, x = _featurizer()
    ref = [z.clone() for _, z in StreamedFeatures(f, x, chunk=8).chunks()]
    src = StreamedFeatures(f, x, chunk=8, cache_bytes=2 * ref[0].nbytes)  # keeps the first two chunks
    workspace: dict = {}
    for _ in range(3):  # the kept chunks survive later chunks being computed in the workspace
        for (rows, z), r in zip(src.chunks(workspace), ref):
            assert torch.equal(z, r), rows  # each chunk checked when it is yielded (later ones overwrite it)
    assert len(src._kept) == 2
    kept = {z.data_ptr() for z in src._kept}
    assert not kept & {b.data_ptr() for b in workspace.values()}
    assert torch.equal(src._kept[0], ref[0]) and torch.equal(src._kept[1], ref[1])


def test_deflation_basis_collects_fresh_chunks():
    f, x = _featurizer()
    streamed = deflation_basis(StreamedFeatures(f, x, chunk=8), rank=4)
    cached = deflation_basis(CachedFeatures(cache_features(f, x, 8), chunk=8), rank=4)
    assert torch.equal(streamed, cached)  # chunks collected, not overwritten by a reused buffer


def test_solver_with_reused_buffers_gives_bitwise_the_same_fit():
    f, x = _featurizer()
    y = torch.arange(40) % 3
    runs = []
    for src in (StreamedFeatures(f, x, chunk=6), _Fresh(StreamedFeatures(f, x, chunk=6))):
        res, trace = solve_dual(src, y, 3, 0.02, max_iter=6, tol=0.0, on_nonconvergence="ignore")
        runs.append((res, trace))
    (a, ta), (b, tb) = runs
    assert ta.primal == tb.primal and ta.dual == tb.dual and ta.gram_norm == tb.gram_norm
    assert torch.equal(a.p, b.p) and torch.equal(a.theta, b.theta) and torch.equal(a.m, b.m)
    assert ta.residuals[-1] < ta.residuals[0]  # the fit moves (not a trivially equal run)


def test_primal_solver_with_reused_buffers_gives_bitwise_the_same_fit():
    from proxnets.convex.primal import solve_primal

    f, x = _featurizer()
    y = torch.arange(40) % 3
    fits = [solve_primal(src, y, 3, lam=0.02, max_iter=6, tol=0.0, on_nonconvergence="ignore")
            for src in (StreamedFeatures(f, x, chunk=6), _Fresh(StreamedFeatures(f, x, chunk=6)))]
    (ta_theta, ta), (tb_theta, tb) = fits
    assert ta.primal == tb.primal and ta.dual == tb.dual
    assert torch.equal(ta_theta, tb_theta)
    assert ta.residuals[-1] < ta.residuals[0]
