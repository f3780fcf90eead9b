"""Filter-level (structured) L0: the group closed form is the exact maximizer; removing zero filters keeps the function."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from pmp_closures import full_batch_steps
from proxnets.pmp import BSQH, SmallLeNet5, SparseRegularizer, remove_zero_filters, sparsity_param_groups


@pytest.mark.parametrize("lam1,lam2,bound", [(0.0, 0.0, float("inf")), (0.0, 1.0, float("inf")),
                                             (0.3, 0.5, float("inf")), (0.0, 0.5, 0.6), (0.2, 0.0, 0.8)])
def test_group_prox_equals_brute_force(lam1, lam2, bound):
    """argmin_v (1/2)|v - z|^2 + t r(v) over filters of 2 weights, on a 2-d grid covering the box."""
    gen = torch.Generator().manual_seed(1)
    lim = min(bound, 3.0)
    axis = torch.linspace(-lim, lim, 241, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # includes (0, 0) (241 is odd)
    for _ in range(25):
        reg = SparseRegularizer(beta=float(torch.rand(1, generator=gen)) * 3, lam1=lam1, lam2=lam2, bound=bound,
                                structure="filter")
        t = float(torch.rand(1, generator=gen)) * 0.8 + 0.05
        z = torch.randn(4, 2, generator=gen, dtype=torch.float64) * 1.5
        v = reg.prox(z, t)
        assert (v.abs() <= bound + 1e-15).all()
        for o in range(4):
            def obj(u):
                on = (u != 0).any(-1).to(u.dtype)
                return (0.5 * ((u - z[o]) ** 2).sum(-1) + t * (reg.beta * 2 * on + lam1 * u.abs().sum(-1)
                                                               + 0.5 * lam2 * (u * u).sum(-1)))
            best = float(obj(grid).min())
            ours = float(obj(v[o:o + 1]))
            assert ours <= best + 1e-9, (o, ours, best)
            # the filter is all zero or all its weights move together (no partial zeros without L1)
            if lam1 == 0.0 and v[o].abs().sum() > 0:
                assert (v[o] != 0).all()


def test_filter_value_prices_every_weight_of_a_nonzero_filter():
    w = torch.zeros(3, 2, 5)
    w[0, 1, 2] = 0.5  # one nonzero weight makes filter 0 nonzero: 10 weights priced
    w[2] = 1.0
    reg = SparseRegularizer(beta=1.0, normalize="layer", structure="filter")
    assert float(reg.value(w)) == pytest.approx(20 / 30)
    assert float(SparseRegularizer(beta=1.0, normalize="layer").value(w)) == pytest.approx(11 / 30)


def _lenet64(seed=0):
    torch.manual_seed(seed)
    return SmallLeNet5().double()


def test_removing_zero_filters_keeps_the_outputs():
    model = _lenet64()
    with torch.no_grad():
        for m in (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3):
            m.bias.uniform_(-0.5, 0.5)  # dead filters with positive biases feed constants onward
        model.conv1.weight[[0, 2]] = 0.0
        model.conv2.weight[[1, 4, 5]] = 0.0
        model.conv2.weight[6, [1, 3]] = 0.0
        model.conv2.weight[6, [0, 2]] = 0.0  # nonzero only on... nothing: dead too
        model.conv2.weight[7][[1, 3]] = 0.0  # reads live channels: stays
        model.conv2.weight[3][[1, 3]] = 1.0
        model.conv2.weight[3][[0, 2]] = 0.0  # reads only conv1's dead channels 0 and 2: zero after removal
        model.fc1.weight[::3] = 0.0
        model.fc2.weight[[0, 5, 7]] = 0.0
        model.conv1.bias[0], model.conv1.bias[2] = 0.3, -0.2  # one dead channel with a constant, one without
    small = remove_zero_filters(model)
    c1, c2, f1, f2 = small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features, small.fc2.out_features
    assert (c1, c2) == (2, 8 - 5), (c1, c2)  # conv2 filters 1, 3, 4, 5, 6 removed
    assert f1 == 32 - len(range(0, 32, 3)) and f2 == 29
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        diff = float((small(x) - model(x)).abs().max())
    assert diff <= 1e-12, diff
    # without folding the constants of the dead channels the outputs differ (the test can fail)
    with torch.no_grad():
        bad = remove_zero_filters(model)
        bad.conv2.bias.copy_(model.conv2.bias[[0, 2, 7]])
        assert float((bad(x) - model(x)).abs().max()) > 1e-3


def test_structured_bsqh_zeroes_whole_filters_and_exports_them():
    torch.manual_seed(0)
    model = SmallLeNet5()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    reg = SparseRegularizer(beta=1.0, lam2=1e-3, normalize="group", bound=1.0, structure="filter")
    opt = BSQH(sparsity_param_groups(model, 1.0), eps=5.0, eps_min=1.0, regularizer=reg, target_density=0.4,
               eps_rule="curvature")
    full_batch_steps(model, opt, x, y, 4)
    weights = [m.weight for m in (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3)]
    total = sum(w.numel() for w in weights)
    nnz = sum(int((w != 0).sum()) for w in weights)
    largest = max(w[0].numel() for w in weights)
    assert abs(nnz - 0.4 * total) <= largest  # the nearest density a whole number of filters can make
    for w in weights:  # every filter all zero or all nonzero (no L1: a kept filter has no exact zeros)
        rows = w.detach().reshape(w.shape[0], -1) != 0
        assert bool((rows.all(1) | ~rows.any(1)).all())
    small = remove_zero_filters(model)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) <= 1e-5


def test_bad_input():
    with pytest.raises(ValueError, match="structure: expected"):
        SparseRegularizer(structure="channel")
    with pytest.raises(TypeError, match="model: expected a LeNet5"):
        remove_zero_filters(torch.nn.Linear(2, 2))


def test_mac_groups_price_the_fraction_of_multiply_adds_kept():
    from proxnets.pmp import mac_param_groups, sparsity_report

    model = SmallLeNet5()
    with torch.no_grad():
        model.conv1.weight[1] = 0.0
        model.fc1.weight[:5] = 0.0
    groups = mac_param_groups(model, 1.0, (1, 28, 28), lam2=0.0)
    value = sum(float(g["regularizer"].value(p)) for g in groups if g["rho"] for p in g["params"])
    rep = sparsity_report(model, (1, 28, 28))["total"]
    assert value == pytest.approx(rep["macs_sparse"] / rep["macs_dense"], rel=1e-6)


def test_the_audit_counts_filters_as_the_regularizer_does():
    from proxnets.pmp import penalty

    model = SmallLeNet5()
    reg = SparseRegularizer(beta=1.0, normalize="layer", structure="filter")
    opt = BSQH(sparsity_param_groups(model, 2.0), regularizer=reg)
    with torch.no_grad():
        model.conv2.weight[0] = 0.0
        model.conv2.weight[1, 0] = 0.0  # a zero entry inside a kept filter is still priced
    value, independent = penalty(opt)
    expected = sum(2.0 * float(reg.value(p)) for p in opt.param_groups[0]["params"])
    assert independent and value == pytest.approx(expected, rel=1e-9)


def test_fast_pool_equals_max_pool2d_bit_for_bit_and_keeps_its_gradient():
    from proxnets.pmp.models import MaxPool2x2

    pool = MaxPool2x2()
    # even and contiguous: the two-pass path; odd, 3-d or a transposed view: the four strided views
    for shape in ((3, 2, 28, 28), (2, 3, 9, 7), (4, 16, 10, 10), (2, 6, 8), (2, 3, 12, 6)):
        x = torch.randn(shape)
        x.view(-1, *shape[-2:])[0, :2, :2] = 0.0  # ties
        with torch.no_grad():
            assert torch.equal(pool(x), F.max_pool2d(x, 2))
            xt = x.transpose(-1, -2)
            assert not xt.is_contiguous() and torch.equal(pool(xt), F.max_pool2d(xt, 2))
            xn = x.clone()
            xn[..., 1, 0] = float("nan")  # a NaN propagates to its window, as in max_pool2d
            assert torch.equal(pool(xn).isnan(), F.max_pool2d(xn, 2).isnan())
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(F.max_pool2d(x, 2))
        pool(a).backward(g)
        F.max_pool2d(b, 2).backward(g)
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("norm,allocation", [("l1", "uniform"), ("l2", "mac")])
@pytest.mark.parametrize("target", [0.6, 0.3, 0.1])
def test_filter_prune_lands_on_the_mac_target_with_whole_filters(norm, allocation, target):
    """The structured baseline: whole filters only, the classifier intact, MACs within one cheapest filter of the
    target (the comparison with the filter-level L0 is at equal MACs), the export of it exact."""
    from proxnets.pmp import LeNet5, export_sparse, sparsity_report
    from proxnets.pmp.baselines import filter_prune

    torch.manual_seed(0)
    model = LeNet5()
    dense_fc3 = model.fc3.weight.detach().clone()
    filter_prune(model, target, (1, 28, 28), norm=norm, allocation=allocation)
    t = sparsity_report(model, (1, 28, 28))["total"]
    fraction = t["macs_sparse"] / t["macs_dense"]
    cheapest = model.fc2.weight.shape[1] / t["macs_dense"]  # one fc2 row
    assert target <= fraction < target + cheapest + 1e-12, fraction
    for m in (model.conv1, model.conv2, model.fc1, model.fc2):
        rows = (m.weight.detach().reshape(m.weight.shape[0], -1) != 0)
        assert (rows.all(1) | ~rows.any(1)).all()  # a filter is all zero or untouched
        assert rows.any(1).sum() >= 1
    assert torch.equal(model.fc3.weight.detach(), dense_fc3)
    export_sparse(model)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert float((remove_zero_filters(model)(x) - model(x)).abs().max()) <= 1e-5


def test_filter_prune_by_mac_removes_the_filters_that_cost_compute_first():
    """allocation="mac" ranks a filter's norm per multiply-add saved: conv filters go first (fc rows only fill
    the last gap to the target); "uniform" takes about the same fraction of every layer."""
    from proxnets.pmp import LeNet5
    from proxnets.pmp.baselines import filter_prune

    torch.manual_seed(0)
    model = filter_prune(LeNet5(), 0.6, (1, 28, 28), allocation="mac")
    kept = [int((m.weight.detach().reshape(m.weight.shape[0], -1) != 0).any(1).sum())
            for m in (model.conv1, model.conv2, model.fc1, model.fc2)]
    share = [k / n for k, n in zip(kept, (6, 16, 120, 84))]
    assert share[0] < 0.5 and min(share[2:]) > max(share[:2]), kept
    torch.manual_seed(0)
    model = filter_prune(LeNet5(), 0.6, (1, 28, 28), allocation="uniform")
    kept = [int((m.weight.detach().reshape(m.weight.shape[0], -1) != 0).any(1).sum())
            for m in (model.conv1, model.conv2, model.fc1, model.fc2)]
    assert share[0] < min(kept[0] / 6, kept[1] / 16), kept
    with pytest.raises(ValueError, match="allocation"):
        filter_prune(LeNet5(), 0.5, (1, 28, 28), allocation="global")


def test_no_grad_lenet_pools_before_relu_with_the_same_outputs_bit_for_bit():
    """The no-grad forward (trial forward, evaluation) pools before the ReLU: equal to the autograd order exactly;
    with a non-monotone activation (GELU: pooling does not commute with it) the seed's order is kept."""
    from proxnets.pmp import LeNet5

    torch.manual_seed(0)
    model = LeNet5()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        fast = model(x)
    assert torch.equal(fast, model(x).detach())
    model.act = torch.nn.GELU()
    assert not model._pool_commutes()
    with torch.no_grad():
        kept = model(x)
    assert torch.equal(kept, model(x).detach())
    swapped = model.fc3(model.act(model.fc2(model.act(model.fc1(
        model.act(model.pool(model.conv2(model.act(model.pool(model.conv1(x)))))).flatten(1))))))
    assert not torch.equal(kept, swapped.detach())  # the order matters for GELU: the guard is needed


def test_lenet_checks_a_repeated_batch_once_but_a_changed_one_again(tmp_path):
    """The trial forward's batch is the sweep's: the input check is skipped only for the same, unchanged tensor."""
    import copy

    from proxnets.pmp import LeNet5

    model = LeNet5()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        model(x)
        model(x)
        x[0, 0, 0, 0] = float("nan")  # in place: a new version of the same tensor is checked again
        with pytest.raises(ValueError, match="x: expected"):
            model(x)
        with pytest.raises(ValueError, match="x: expected"):
            model(x.clone())
    copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")  # the weak reference is not pickled
    assert torch.load(tmp_path / "m.pt", weights_only=False)._checked is None


def test_input_shape_named_in_errors():
    from proxnets.pmp import mac_param_groups
    from proxnets.pmp.baselines import filter_prune

    model = SmallLeNet5()
    with pytest.raises(ValueError, match=r"input_shape: expected the shape of one input of the model, got \(28,\)"):
        filter_prune(model, 0.3, (28,))
    with pytest.raises(ValueError, match="input_shape: expected a non-empty tuple of positive integers, got 'abc'"):
        mac_param_groups(model, 1.0, "abc")
    assert not model._forward_hooks and not model.conv1._forward_hooks  # no hook left behind by the failed pass
