"""The classifier's layout knobs (issue 19): padded pooling before the head, space-to-depth transitions, per-stage widths
and blocks. Each new layer's claimed constant must be >= the spectral norm of its dense float64 Jacobian, and a broken
variant of it must fail that test; the whole network's product bound must stay >= the norm of its Jacobian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from proxnets.stable import ClassifierConfig, NonExpansiveClassifier, ScaledAvgPool2d, SpaceToDepth, lipschitz_bound, num_parameters


def _jacobian_norm(f, shape) -> float:
    x = torch.randn(*shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(f, x).reshape(-1, x.numel())  # (out, in)
    return float(torch.linalg.matrix_norm(jac, ord=2))


def _holds(layer: nn.Module, shape) -> bool:
    """The layer's claimed Lipschitz constant covers its dense Jacobian (linear layers: the Jacobian is the operator)."""
    return float(layer.lipschitz_constant()) >= _jacobian_norm(layer, shape) * (1 - 1e-12)


class _CeilPool(ScaledAvgPool2d):
    """Broken: ``avg_pool2d(ceil_mode=True)`` divides a clipped border window by the entries it has, not by k^2."""

    def forward(self, x):
        return self.kernel_size * F.avg_pool2d(x, self.kernel_size, ceil_mode=True)


class _ScaledS2D(SpaceToDepth):
    """Broken: the space-to-depth scaled by k as if it were the pooling."""

    def forward(self, x):
        return self.factor * super().forward(x)


@pytest.mark.parametrize("shape,k", [((1, 2, 7, 7), 2), ((1, 1, 5, 6), 3), ((1, 2, 8, 8), 2)])
def test_stable_padded_pool_is_one_lipschitz_and_keeps_every_input(shape, k):
    pool = ScaledAvgPool2d(k, pad=True)
    assert _holds(pool, shape)
    assert _jacobian_norm(pool, shape) == pytest.approx(1.0, abs=1e-9)  # tight: a constant image in one window
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    pool(x).sum().backward()
    assert bool((x.grad != 0).all())  # no row or column dropped (the unpadded pooling drops the last of an odd size)
    assert pool(x).shape[-2:] == (-(-shape[-2] // k), -(-shape[-1] // k))


@pytest.mark.parametrize("shape,k", [((1, 2, 7, 7), 2), ((1, 1, 5, 6), 3)])
def test_stable_broken_ceil_pool_breaks_the_bound(shape, k):
    assert not _holds(_CeilPool(k), shape)  # a 1-entry border window times k: norm k


@pytest.mark.parametrize("shape,k", [((1, 2, 4, 6), 2), ((2, 1, 6, 6), 3)])
def test_stable_space_to_depth_is_orthogonal(shape, k):
    s2d = SpaceToDepth(k)
    assert _holds(s2d, shape)
    x = torch.randn(*shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(s2d, x).reshape(-1, x.numel())
    assert torch.equal(jac.T @ jac, torch.eye(x.numel(), dtype=torch.float64))  # a permutation: J^T J = I exactly
    assert not _holds(_ScaledS2D(k), shape)


def test_stable_space_to_depth_rejects_sizes_not_a_multiple():
    with pytest.raises(ValueError, match="multiples of 2"):
        SpaceToDepth(2)(torch.zeros(1, 1, 7, 8))


def _small(**layout) -> NonExpansiveClassifier:
    cfg = ClassifierConfig(in_channels=1, image_size=8, num_classes=3, width=2, stages=2, head="flatten", glue="orthogonal",
                           block_weight="cayley", schedule="fixed", steps=1, block_bias_init=-0.5, **layout)
    return NonExpansiveClassifier(cfg).double().eval()


LAYOUTS = {
    "deep": {"stage_widths": (2, 4, 4), "stage_blocks": (0, 3)},
    "s2d + head pool": {"stage_widths": (2, 2, 4), "stage_blocks": (1, 2), "downsample": "s2d", "head_pool": 2},
    "pool + odd head pool": {"stage_widths": (3, 3, 5), "stage_blocks": (1, 1), "head_pool": 3},
}


def _every_layer_holds(model: NonExpansiveClassifier) -> bool:
    """Each layer's bound (the factors of the certificate's product) >= the norm of its Jacobian at the input it sees."""
    h = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    ok = True
    for m in model.layers:
        jac = torch.autograd.functional.jacobian(m, h).reshape(-1, h.numel())
        ok &= float(lipschitz_bound(m)) >= float(torch.linalg.matrix_norm(jac, ord=2)) * (1 - 1e-9)
        h = m(h)
    return ok


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stable_layout_product_bound_covers_the_jacobian(name):
    torch.manual_seed(0)
    model = _small(**LAYOUTS[name])
    bound = lipschitz_bound(model)
    assert bound.rigorous and float(bound) <= 1 + 1e-5
    for _ in range(3):
        assert _jacobian_norm(model, (1, 1, 8, 8)) <= float(bound) * (1 + 1e-9)
        assert _every_layer_holds(model)


def test_stable_layout_with_a_broken_layer_fails_the_bound():
    torch.manual_seed(0)
    model = _small(**LAYOUTS["pool + odd head pool"])  # 5 x 2 x 2 -> padded to 3 x 3 -> 1 x 1
    i = next(i for i, m in enumerate(model.layers) if isinstance(m, ScaledAvgPool2d) and m.pad)
    model.layers[i] = _CeilPool(3)  # still claims 1; is 3 / 4 * 2 = 1.5 on the clipped 2 x 2 window
    assert not _every_layer_holds(model)
    model = _small(**LAYOUTS["s2d + head pool"])
    i = next(i for i, m in enumerate(model.layers) if isinstance(m, SpaceToDepth))
    model.layers[i] = _ScaledS2D(2)
    assert not _every_layer_holds(model)


def test_stable_layout_parameter_counts():
    base = dict(in_channels=1, image_size=28, num_classes=10, width=8, stages=2, blocks_per_stage=2, head="flatten",
                glue="orthogonal", block_weight="cayley", schedule="fixed", steps=1)
    # 1x1 conv a -> b: a b + b; Cayley block c: 9 c^2 + c; head f -> 10: 10 f + 10
    today = NonExpansiveClassifier(ClassifierConfig(**base))
    deep = NonExpansiveClassifier(ClassifierConfig(**base, stage_widths=(8, 16, 16), stage_blocks=(0, 6)))
    s2d = NonExpansiveClassifier(ClassifierConfig(**base, stage_widths=(16, 16, 32), stage_blocks=(2, 4), downsample="s2d", head_pool=2))
    assert num_parameters(today) == 16 + 2 * 584 + 144 + 2 * 2320 + 544 + 15690 == 22202
    assert num_parameters(deep) == 16 + 144 + 6 * 2320 + 272 + 7850 == 22202
    assert num_parameters(s2d) == 32 + 2 * 2320 + (64 * 16 + 16) + 4 * 2320 + (64 * 32 + 32) + (32 * 16 * 10 + 10) == 22202


@pytest.mark.parametrize("field,value,match", [
    ("stage_widths", (8, 16), "stage_widths: expected a tuple of 3"),
    ("stage_blocks", (1, 2, 3), "stage_blocks: expected a tuple of 2"),
    ("stage_widths", (8, 0, 16), "stage_widths"),
    ("downsample", "stride", "downsample"),
    ("head_pool", 0, "head_pool"),
])
def test_stable_layout_rejects_bad_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        ClassifierConfig(in_channels=1, image_size=28, width=8, stages=2, **{field: value}).validate()


def test_stable_s2d_needs_a_multiple_of_two_per_stage():
    with pytest.raises(ValueError, match=r"image_size: expected a multiple of 2\*\*stages = 8"):
        ClassifierConfig(in_channels=1, image_size=28, width=8, stages=3, downsample="s2d").validate()
