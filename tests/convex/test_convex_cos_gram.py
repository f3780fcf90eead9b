"""The random-feature cosine and the step bound's per-position eigenvalues, as the fit computes them.

- :func:`~proxnets.convex.kernels._cos_` (numpy's float32 cosine on CPU float32) is within its stated
  ``COS_ERROR = 2^-23`` of the float64 cosine of the same inputs; a half-precision cosine (a broken
  variant) is not. An element's value does not depend on where it sits in the array, so chunk and
  block sizes never change a feature; a cosine that treats an array's tail differently (broken) does.
  The fused featurization, hence CCNN's cached and DCCNN's streamed features, takes it.
- :meth:`~proxnets.convex.sources.GramBound.block_tops` (the ``lambda_max(C_pp)`` in groups of
  positions) equals one batched eigenvalue call bitwise, for every group size; a loop that loses the
  last partial group (broken) does not. A non-finite block anywhere, not only in the first group,
  makes the bound refuse.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proxnets.convex import features as features_module
from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.kernels import COS_ERROR, _cos_
from proxnets.convex.sources import GramBound, StreamedFeatures


def _cos_error(cos) -> float:
    """Max ``|cos(x) - cos_float64(x)|`` over float32 inputs: dense near 0, random up to 200."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-8.0, 8.0, 400_001), (torch.rand(600_000, generator=g) - 0.5) * 400.0])
    ref = x.double().cos()
    return float((cos(x.clone()).double() - ref).abs().max())


def _half_cos(x: torch.Tensor) -> torch.Tensor:  # broken: the argument rounded to float16 first
    return x.copy_(x.half().float()).cos_()


def test_cosine_within_its_stated_error_and_a_coarse_cosine_is_not():
    err = _cos_error(_cos_)
    assert err <= COS_ERROR
    assert err > 0.0  # it is numpy's float32 cosine, not a float64 one rounded (which would be <= 2^-25)
    assert _cos_error(_half_cos) > 100 * COS_ERROR  # the check can fail


def _tail_torch_cos(x: torch.Tensor) -> torch.Tensor:  # broken: the last numel % 16 elements by torch
    body = x.numel() // 16 * 16
    _cos_(x[:body])
    x[body:].cos_()
    return x


def _position_dependent(cos) -> bool:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4099, generator=g) * 5
    ref = cos(x.clone())
    for off in range(0, 18):
        for length in (1, 3, 15, 16, 17, 33, 1000):
            if not torch.equal(cos(x[off : off + length].clone()), ref[off : off + length]):
                return True
    return False


def test_cosine_does_not_depend_on_an_elements_position():
    assert not _position_dependent(_cos_)
    assert _position_dependent(_tail_torch_cos)  # the check can fail


def test_cosine_falls_back_to_torch_where_numpy_does_not_apply():
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(300, generator=g, dtype=torch.float64) * 4
    assert torch.equal(_cos_(x64.clone()), x64.cos())  # float64: torch's
    x = torch.randn(40, 30, generator=g) * 4
    strided = x.clone().T  # not contiguous: torch's, in place on the view
    assert torch.equal(_cos_(strided), x.T.cos())
    y = x.clone()
    assert _cos_(y) is y  # in place


def _featurizer():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(23, 1, 14, 14, generator=g)
    f = PatchFeaturizer(patch_size=5, n_features=32, gamma=0.2, pool_size=2)
    f.fit(x, torch.Generator().manual_seed(0))
    return f, x


def test_fused_features_take_the_cosine_and_do_not_depend_on_chunks(monkeypatch):
    f, x = _featurizer()
    calls = []

    def counting(t):
        calls.append(t.numel())
        return _cos_(t)

    monkeypatch.setattr(features_module, "_cos_", counting)
    with torch.no_grad():
        whole = f(x)
        assert calls  # the fused path (every solver's features) computes its cosine here
        for chunk in (1, 5, 7):
            parts = torch.cat([z.clone() for _, z in StreamedFeatures(f, x, chunk=chunk).chunks({})])
            assert torch.equal(parts, whole), chunk
        for block in (1, 3, 4):  # the (block J, D) buffer's size (the default: RFF_BLOCK_BYTES)
            assert torch.equal(f._raw_rff(x, block=block), f._raw_rff(x)), block


def _accumulated(p=7, d=6, n=50, seed=4):
    g = torch.Generator().manual_seed(seed)
    acc = GramBound(torch.zeros(p * d, 0, dtype=torch.float64), p, d, batch=8)
    acc.add(torch.randn(n, p, d, generator=g))
    acc._flush()
    return acc


def _dropping_last_group(acc, group):  # broken: positions beyond the last full group are lost
    full = acc.c.shape[0] // group * group
    tops = [torch.linalg.eigvalsh(acc.c[i : i + group].double() / acc.n)[:, -1] for i in range(0, full, group)]
    return torch.cat(tops) if tops else torch.zeros(0, dtype=torch.float64)


@pytest.mark.parametrize("group", [1, 3, 7, 20])
def test_block_tops_equal_one_batched_eigenvalue_call(group):
    acc = _accumulated()
    ref = torch.linalg.eigvalsh(acc.c.double() / acc.n)[:, -1]
    assert torch.equal(acc.block_tops(group), ref)
    # each top is the largest eigenvalue of its (symmetric PSD) block: checked against a dense one
    dense = torch.stack([torch.linalg.eigvals(b).real.max() for b in acc.c.double() / acc.n])
    assert torch.allclose(ref, dense, rtol=1e-10, atol=0)
    if acc.c.shape[0] % group:
        broken = _dropping_last_group(acc, group)
        assert broken.shape != ref.shape or not torch.equal(broken, ref)  # the check can fail


def test_a_non_finite_block_beyond_the_first_group_is_refused():
    acc = _accumulated()
    value = acc.value()
    assert math.isfinite(value) and value > 0
    acc.c[6, 2, 1] = float("nan")  # the last position: not in the first group
    with pytest.raises(FloatingPointError, match="positions 4 to 6"):
        acc.block_tops(4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        acc.value()
    with pytest.raises(ValueError, match="group"):
        _accumulated().block_tops(0)


def test_numpy_cosine_is_what_cos_computes_on_float32():
    x = torch.linspace(-30, 30, 1001)
    assert torch.equal(_cos_(x.clone()), torch.from_numpy(np.cos(x.numpy())))
