"""Issue 19 item 5: intervals over training seeds and photos (the crossed interval), the colour firm denoiser.

- ``crossed_interval`` on a hand-computed table, its coverage under the two-way random-effects model, and the broken
  variants (an interval over photos only, over seeds only) that under-cover;
- the colour (3-channel) Heun denoiser is certified firmly non-expansive at the size it is applied at (64x64, not its
  32x32 patches), no pair of images asks for more, and broken variants are caught;
- the colour training photographs exclude every held-out photograph and are the grey training set's photographs.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from proxnets.stable import AveragedDenoiser, DenoiserConfig
from proxnets.stable.experiments import _empirical_averagedness
from proxnets.stable.restore import TEST_PHOTOS, VAL_PHOTO, train_denoiser, training_photos
from proxnets.utils.stats import crossed_difference_interval, crossed_interval, mean_interval


def test_crossed_interval_matches_the_hand_computed_anova():
    # x_ij = a_i + b_j, a = (0, 1, 2), b = (0, 3): MS_S = 2 * 2 / 2 = 2, MS_P = 3 * 4.5 / 1 = 13.5, MS_E = 0
    x = [[a + b for b in (0.0, 3.0)] for a in (0.0, 1.0, 2.0)]
    var = (2.0 + 13.5 - 0.0) / 6
    df = var**2 / ((2.0 / 6) ** 2 / 2 + (13.5 / 6) ** 2 / 1)  # Satterthwaite (the MS_E term is 0)
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    m, lo, hi = crossed_interval(x)
    assert m == pytest.approx(2.5)
    assert (lo, hi) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    # one seed: the interval over the photos; one photo: over the seeds
    assert crossed_interval([[1.0, 2.0, 4.0]]) == pytest.approx(mean_interval([1.0, 2.0, 4.0]))
    assert crossed_interval([[1.0], [2.0], [4.0]]) == pytest.approx(mean_interval([1.0, 2.0, 4.0]))
    # paired differences; a seed-free baseline (one row) is paired with every seed
    b = [[0.5, 1.0]]
    assert crossed_difference_interval(x, b) == pytest.approx(crossed_interval([[v - w for v, w in zip(r, b[0])] for r in x]))
    with pytest.raises(ValueError, match="b: expected a table of 3 x 2"):
        crossed_difference_interval(x, [[1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="table: expected"):
        crossed_interval([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="table: expected finite"):
        crossed_interval([[1.0, math.nan], [3.0, 4.0]])


@pytest.mark.parametrize("sa,sb", [(1.0, 1.0), (1.0, 0.1), (0.1, 1.0)])
def test_crossed_interval_covers_under_seed_and_photo_randomness(sa, sb):
    # x_ij = a_i + b_j + e_ij, true mean 0; 3 seeds x 6 photos as in the benchmark
    rng = np.random.default_rng(0)
    n, hits, photos_only, seeds_only = 1000, 0, 0, 0
    for _ in range(n):
        x = sa * rng.standard_normal((3, 1)) + sb * rng.standard_normal((1, 6)) + 0.3 * rng.standard_normal((3, 6))
        _, lo, hi = crossed_interval(x.tolist())
        hits += lo <= 0.0 <= hi
        _, lo, hi = mean_interval(x.mean(0).tolist())  # broken variant: photos random, seeds ignored
        photos_only += lo <= 0.0 <= hi
        _, lo, hi = mean_interval(x.mean(1).tolist())  # broken variant: seeds random, photos ignored
        seeds_only += lo <= 0.0 <= hi
    assert 0.91 <= hits / n <= 0.995
    if sa > sb:  # training randomness dominates: the photo interval under-covers
        assert photos_only / n < 0.85
    if sb > sa:
        assert seeds_only / n < 0.85


def _colour_firm(**over) -> AveragedDenoiser:
    torch.manual_seed(0)
    den = AveragedDenoiser(DenoiserConfig.firm(channels=3, image_size=32, width=6, depth=3, max_steps=2, **over)).double().eval()
    with torch.no_grad():  # as if training had grown |A|: the stiffness budget must act; biases non-trivial
        for b in den.blocks:
            b.weight.mul_(2.0)
            b.bias.normal_(0, 0.3)
    return den


def test_colour_firm_denoiser_certified_at_the_applied_size():
    den = _colour_firm()
    alpha = den.averagedness("rigorous")
    assert alpha <= 0.5 + 1e-12  # firmly non-expansive, from the rigorous size-independent norms
    found = {}
    for size in (64, 32):  # the benchmark applies it to 64x64 photos; it was built for 32x32 patches
        x = torch.rand(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        found[size] = _empirical_averagedness(den, x, seed=0, steps=5)
        assert found[size] <= alpha + 1e-9
    assert found[64] > 0.06  # the search has power: the pairs it finds are far from alpha 0
    # broken variant 1: the residual scaled past the bound (D' = I - 8 (I - D), (8 alpha)-averaged at best): the same
    # search finds alpha > 1/2
    broken = lambda v: v - 8.0 * (v - den(v))  # noqa: E731
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(64))
    assert _empirical_averagedness(broken, x, seed=0, steps=5) > 0.5
    # broken variant 2: no stiffness budget (each block at h nu <= 2): the certificate no longer says firm
    assert _colour_firm(stiffness_budget=None).averagedness("rigorous") > 0.5


def test_colour_training_photos_exclude_the_held_out_photos():
    grey, colour = training_photos(), training_photos(colour=True)
    assert list(grey) == list(colour)  # the same photographs (grey ones repeated over RGB)
    held_out = set(TEST_PHOTOS) | {VAL_PHOTO, "retina"}
    assert not held_out & set(colour)
    assert all(v.shape[0] == 3 for v in colour.values()) and all(v.shape[0] == 1 for v in grey.values())
    assert all(min(v.shape[-2:]) >= 200 for v in training_photos(min_side=200).values())
    with pytest.raises(ValueError, match="min_side"):
        training_photos(min_side=0)


def test_train_denoiser_colour_is_a_certified_three_channel_denoiser():
    torch.set_num_threads(1)
    den = train_denoiser(firm=True, channels=3, width=4, depth=2, patch=16, n_patches=32, epochs=1, progress=False,
                         log=lambda *_: None)
    assert den.config.channels == 3 and den.averagedness("rigorous") <= 0.5 + 1e-12
    y = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert den(y).shape == y.shape
    with pytest.raises(ValueError, match="channels"):
        train_denoiser(channels=2, progress=False)
