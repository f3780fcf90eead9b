"""PairReflection (a learned fold of each channel pair across ``n . x = c``; Householder activation of Singla, Singla &
Feizi, ICLR 2022, with an offset) and the ``glue_activation="reflect"`` classifier: MaxMin at initialization, 1-Lipschitz
for every angle and offset (a broken fold fails the same check), gradients reach the angle and the offset, the model's
rigorous bound holds, and the parameter count is the MaxMin glue's (22,202 at the benchmark's layout)."""

import math

import pytest
import torch

from proxnets.stable import (
    ClassifierConfig, MaxMin, NonExpansiveClassifier, PairReflection, empirical_lipschitz, lipschitz_bound, num_parameters,
)


class _ScaledFold(PairReflection):
    """Broken: the reflected side scaled by 1.1 (discontinuous at the line, unbounded ratio across it)."""

    def forward(self, x):
        y = super().forward(x)
        a, b = x.chunk(2, dim=1)
        view = (1, self.channels // 2) + (1,) * (x.ndim - 2)
        folded = (self.theta.cos().view(view) * a + self.theta.sin().view(view) * b < self.offset.view(view)).repeat(1, 2, *[1] * (x.ndim - 2))
        return torch.where(folded, 1.1 * y, y)


class _OverFold(PairReflection):
    """Broken: ``x - 3 (n . x - c) n`` on the folded side (slope -2 along ``n``)."""

    def forward(self, x):
        return x + 1.5 * (super().forward(x) - x)


class _UnitlessFold(PairReflection):
    """Broken: the normal not normalized (``|n| = 1.3``): ``I - 2 n n^T`` has the eigenvalue ``1 - 2 * 1.69``."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        view = (1, self.channels // 2) + (1,) * (x.ndim - 2)
        ca, sa, c = 1.3 * self.theta.cos().view(view), 1.3 * self.theta.sin().view(view), self.offset.view(view)
        t = 2 * (ca * a + sa * b - c).clamp(max=0)
        return torch.cat([a - t * ca, b - t * sa], dim=1)


def _randomized(cls, channels: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    m = cls(channels).double()
    with torch.no_grad():
        m.theta.copy_(2 * math.pi * torch.rand(channels // 2, generator=g, dtype=torch.float64))
        m.offset.copy_(torch.randn(channels // 2, generator=g, dtype=torch.float64))
    return m


def _pairs(m: PairReflection, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs of inputs (B, 2m, 3, 3): a third anywhere, a third straddling the fold closely (one point just on
    each side of each pair's line), a third both on the folded side."""
    g = torch.Generator().manual_seed(seed)
    k = m.channels // 2
    view = (1, k, 1, 1)
    nrm = torch.stack([m.theta.cos(), m.theta.sin()]).detach().view(2, *view)  # (2, 1, k, 1, 1)
    tang = torch.stack([-m.theta.sin(), m.theta.cos()]).detach().view(2, *view)
    c = m.offset.detach().view(view)

    def at(s, u):  # the point with n . x = c + s and tangential coordinate u, as (B, 2k, 3, 3)
        p = nrm * (c + s) + tang * u
        return torch.cat([p[0], p[1]], dim=1)

    shape = (n, k, 3, 3)
    r = lambda scale=1.0: scale * torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    u = r(2)
    any_x, any_y = at(r(), r(2)), at(r(), r(2))
    near_x, near_y = at(r(1e-3).abs(), u), at(-r(1e-3).abs(), u + r(1e-3))  # across the line, close
    neg_x, neg_y = at(-r().abs() - 0.1, u), at(-r().abs() - 0.1, u + r(0.1))  # both folded
    return torch.cat([any_x, near_x, neg_x]), torch.cat([any_y, near_y, neg_y])


def _max_ratio(m: PairReflection, seed: int) -> float:
    x, y = _pairs(m, 64, seed)
    with torch.no_grad():
        return float(((m(x) - m(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max())


def test_pair_reflection_is_maxmin_at_initialization():
    torch.manual_seed(0)
    m = PairReflection(6)
    for x in (torch.randn(32, 6, 4, 4), torch.randn(32, 6)):
        assert torch.allclose(m(x), MaxMin()(x), atol=1e-6, rtol=0)
    assert num_parameters(m) == 6
    moved = _randomized(PairReflection, 6, 0).float()  # and it is not MaxMin once the fold moves
    x = torch.randn(32, 6, 4, 4)
    assert not torch.allclose(moved(x), MaxMin()(x), atol=1e-2)


@pytest.mark.parametrize("seed", range(4))
def test_pair_reflection_is_one_lipschitz_for_random_folds_and_attains_one(seed):
    # theory: identity on one convex half-plane, an isometric reflection on the other, equal on the line => 1-Lipschitz
    m = _randomized(PairReflection, 8, seed)
    assert _max_ratio(m, seed) <= 1 + 1e-9
    assert _max_ratio(m, seed) > 1 - 1e-6  # same-side pairs keep their distance: the bound 1 is attained
    L = lipschitz_bound(m)
    assert L.rigorous and float(L) == 1.0


@pytest.mark.parametrize("broken", [_ScaledFold, _OverFold, _UnitlessFold])
def test_pair_reflection_check_catches_broken_folds(broken):
    m = _randomized(broken, 8, 0)
    assert _max_ratio(m, 0) > 1.05, broken.__name__


def test_pair_reflection_dropping_the_two_is_a_projection_and_still_one_lipschitz():
    # x - (n . x - c) n on the folded side is the projection onto the half-plane: non-expansive (not a broken variant)
    class Projection(PairReflection):
        def forward(self, x):
            return x + 0.5 * (super().forward(x) - x)

    assert _max_ratio(_randomized(Projection, 8, 1), 1) <= 1 + 1e-9


def test_pair_reflection_gradients_reach_the_angle_and_the_offset():
    m = _randomized(PairReflection, 4, 3)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    fn = lambda x, th, c: torch.func.functional_call(m, {"theta": th, "offset": c}, (x,))  # noqa: E731
    th, c = m.theta.detach().clone().requires_grad_(True), m.offset.detach().clone().requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, th, c))  # exact gradients in x, theta and c (random points: off the fold a.s.)
    out = (fn(x, th, c) * torch.randn(5, 4, 3, 3, dtype=torch.float64)).sum()
    g_th, g_c = torch.autograd.grad(out, (th, c))
    assert bool((g_th.abs() > 0).all()) and bool((g_c.abs() > 0).all())


def test_pair_reflection_rejects_bad_input():
    with pytest.raises(ValueError, match="channels: expected an even number"):
        PairReflection(5)
    with pytest.raises(ValueError, match="channels"):
        PairReflection(0)
    with pytest.raises(ValueError, match=r"x: expected \(B, 6, \.\.\.\)"):
        PairReflection(6)(torch.randn(2, 4, 3, 3))


def test_reflect_glue_classifier_is_certified_and_its_bound_is_never_beaten():
    torch.manual_seed(6)
    cfg = ClassifierConfig(in_channels=1, image_size=8, num_classes=3, width=4, stages=1, blocks_per_stage=1, head="flatten",
                           glue="orthogonal", glue_activation="reflect", block_weight="cayley", schedule="fixed", steps=1)
    model = NonExpansiveClassifier(cfg).double()
    folds = [m for m in model.modules() if isinstance(m, PairReflection)]
    assert len(folds) == 2  # after the lift and the transition
    with torch.no_grad():
        for f in folds:
            f.theta.uniform_(0, 2 * math.pi)
            f.offset.normal_()
    model.eval()
    L = lipschitz_bound(model)
    assert L.rigorous and float(L) <= 1 + 1e-5
    emp, _ = empirical_lipschitz(model, torch.rand(6, 1, 8, 8, dtype=torch.float64), steps=30, lr=0.05,
                                 generator=torch.Generator().manual_seed(0))
    assert emp <= float(L) * (1 + 1e-4)
    with pytest.raises(ValueError, match="width: expected an even width"):
        ClassifierConfig(width=5, glue_activation="reflect").validate()
    with pytest.raises(ValueError, match="stage_widths: expected even widths"):
        ClassifierConfig(in_channels=1, image_size=28, width=8, stages=2, stage_widths=(8, 16, 33), glue_activation="reflect").validate()


@pytest.mark.parametrize("glue", ["orthogonal", "norm"])
def test_reflect_glue_keeps_the_benchmark_parameter_count(glue):
    # the fold's angle and offset (one pair each per two channels) replace the bias of the 1x1 conv before it
    base = dict(in_channels=1, image_size=28, num_classes=10, width=8, stages=2, blocks_per_stage=2, head="flatten", glue=glue,
                block_weight="cayley", schedule="fixed", steps=1)
    counts = {a: num_parameters(NonExpansiveClassifier(ClassifierConfig(**base, glue_activation=a))) for a in ("none", "maxmin", "reflect")}
    # torchlip's layout (1x1 convs with bias, 3x3 block convs with bias, flatten head), as in the benchmark
    assert counts["reflect"] == counts["maxmin"] == counts["none"] == 16 + 2 * 584 + 144 + 2 * 2320 + 544 + 15690 == 22202
    reflect = NonExpansiveClassifier(ClassifierConfig(**base, glue_activation="reflect"))
    biases = [m.bias for m in reflect.layers[:-1] if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert biases and all(b is None for b in biases)  # every glue conv followed by a fold is bias-free


def test_reflect_glue_matches_deel_torchlip_parameter_count():
    tl = pytest.importorskip("deel.torchlip")
    layers = [tl.SpectralConv2d(1, 8, 1)]
    for c, c2 in ((8, 16), (16, 32)):
        layers += [tl.SpectralConv2d(c, c, 3, padding=1) for _ in range(2)] + [tl.SpectralConv2d(c, c2, 1)]
    layers.append(tl.SpectralLinear(32 * 7 * 7, 10))
    theirs = sum(p.numel() for m in layers for p in m.parameters() if p.requires_grad)
    ours = NonExpansiveClassifier(ClassifierConfig(in_channels=1, image_size=28, num_classes=10, width=8, stages=2, blocks_per_stage=2,
                                                   head="flatten", glue="orthogonal", glue_activation="reflect", block_weight="cayley",
                                                   schedule="fixed", steps=1))
    assert num_parameters(ours) == theirs == 22202
