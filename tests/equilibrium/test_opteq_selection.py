"""Equilibrium selection at |W|_2 = 1 (theory as tests).

The layer with ``eps > 0`` outputs the minimizer of ``G + eps/2 |z - a(x)|^2``. Theorems checked:
its limit as eps -> 0 is the projection of the anchor onto the set of minimizers of G (two cases where
that set is known in closed form); implicit gradients through it equal finite differences; its
certificate claims convexity (not uniqueness) of G and bounds only the distance to the selected point.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from proxnets.equilibrium import OptEq, OptEqClassifier, OptEqConfig, certify_equilibrium, certify_opteq
from proxnets.solvers import solve


class _Given(nn.Module):
    """``W -> given``: a fixed weight (registered after the norm constraint: the layer applies exactly it)."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, _):
        return self.w


def _layer(w: torch.Tensor, inj: torch.Tensor, eps: float, anchor: nn.Module, activation="relu") -> OptEq:
    """OptEq with weight ``w`` (|w|_2 = 1), constant injection ``inj`` (U = 0, b = inj), anchor module."""
    k, n = w.shape
    layer = OptEq(anchor.in_features if hasattr(anchor, "in_features") else n, n, width=k, activation=activation,
                  target_norm=1.0, eps=eps, anchor=anchor, solver="anderson", tol=1e-13, max_iter=50000,
                  backward_tol=1e-12, backward_max_iter=5000, policy="raise").double()
    with torch.no_grad():
        layer.U.weight.zero_()
        layer.U.bias.copy_(inj)
    parametrize.register_parametrization(layer.W, "weight", _Given(w))
    return layer.eval()


def _identity(n: int) -> nn.Linear:
    lin = nn.Linear(n, n).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n, dtype=torch.float64))
        lin.bias.zero_()
    return lin


def test_regularized_equilibrium_converges_to_the_projection_on_a_segment():
    # T(z) = relu(P z + b), P the projection on span(u): Fix(T) = argmin G = {b + t u : |t| <= sqrt 2}
    u = torch.tensor([[1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    anchors = torch.tensor([[3.0, 1.0], [-1.0, 0.5], [0.5, 3.5], [2.5, 2.0], [4.0, -3.0]], dtype=torch.float64)
    t = ((anchors - b) @ u.T).clamp(-math.sqrt(2), math.sqrt(2))
    proj = b + t * u  # the nearest minimizer, in closed form
    errors = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        with torch.no_grad():
            z = _layer(u, b, eps, _identity(2))(anchors)  # a(x) = x
        err = (z - proj).norm(dim=1)
        # Tikhonov: z_eps lies in the ball around the projection of radius |a - p|
        assert (err <= (anchors - proj).norm(dim=1) + 1e-9).all()
        errors.append(float(err.max()))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] <= 1e-3, errors
    # the limit depends on the anchor: distinct anchors select distinct equilibria of one problem
    assert float(torch.cdist(proj, proj).max()) > 1.0


def test_regularized_equilibrium_in_closed_form_for_an_affine_layer():
    # identity activation (f = 0), W with orthonormal rows (P = W^T W a projection, |W|_2 = 1) and
    # P inj = 0: argmin G = {inj + P y}, the projection of a is inj + P a, and the minimizer of G_eps is
    # z_eps = P a + (inj + eps (I - P) a) / (1 + eps), i.e. z_eps - p = eps ((I - P) a - inj) / (1 + eps)
    gen = torch.Generator().manual_seed(0)
    n, k = 12, 5
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    w = q[:, :k].T  # (k, n), orthonormal rows
    proj_w = w.T @ w
    inj = (torch.eye(n, dtype=torch.float64) - proj_w) @ torch.randn(n, dtype=torch.float64, generator=gen)
    anchor = nn.Sequential(nn.Linear(3, n), nn.Tanh()).double()  # a nonlinear input-dependent anchor
    anchor.in_features = 3
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        a = anchor(x)
        p = inj + a @ proj_w
        for eps in (1e-1, 1e-3):
            z = _layer(w, inj, eps, anchor, activation="identity")(x)
            expected = eps * (a @ (torch.eye(n, dtype=torch.float64) - proj_w) - inj) / (1 + eps)
            assert torch.allclose(z - p, expected, atol=1e-10), float((z - p - expected).abs().max())


@pytest.mark.parametrize("anchor", ["linear", "feedforward"])
def test_gradient_through_the_selected_equilibrium_matches_finite_differences(anchor):
    torch.manual_seed(0)
    layer = OptEq(4, 6, width=5, target_norm=1.0, eps=0.05, anchor=anchor, solver="anderson", tol=1e-13,
                  max_iter=20000, backward_tol=1e-13, backward_max_iter=5000, policy="raise").double()
    with torch.no_grad():
        layer.W.parametrizations.weight.original.mul_(20.0)  # the bound |W|_2 = 1 is active
        layer.U.bias.add_(0.5)
    layer.eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    c = torch.randn(3, 6, dtype=torch.float64)
    loss = lambda: (layer(x) * c).sum()  # noqa: E731
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(), params)
    assert layer.last_info.backward.converged
    h = 1e-6
    for p, g in zip(params, grads):
        flat, gflat = p.data.view(-1), g.reshape(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + h
                up = float(loss())
                flat[i] = old - h
                down = float(loss())
                flat[i] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - float(gflat[i])) <= 1e-5 * max(1.0, abs(fd)), (p.shape, i, fd, float(gflat[i]))


def test_selection_certificate_claims_convexity_not_uniqueness():
    torch.manual_seed(1)
    eps = 0.05
    layer = OptEq(4, 6, width=5, target_norm=1.0, eps=eps, solver="anderson", tol=1e-10, max_iter=5000).double()
    with torch.no_grad():
        layer.W.parametrizations.weight.original.mul_(20.0)
    layer.eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    certs = {c.name: c for c in certify_equilibrium(layer, x, tol=1e-6)}
    assert "distance_to_minimizer" not in certs  # no claim about the (non-unique) minimizers of G
    norm = certs["operator_norm"]
    # |W|_2 = 1 is allowed and active: a rigorous upper bound is 1 up to its round-off margin (and then
    # cannot prove G convex); what the selected point needs, G_eps strongly convex, is proved
    assert norm.op == "<=" and abs(norm.value - 1.0) <= 1e-9
    assert certs["strong_convexity"].holds and certs["strong_convexity"].value == pytest.approx(eps, abs=1e-8)
    assert all(c.holds for n, c in certs.items() if n != "operator_norm"), [c.line() for c in certs.values()]
    # the distance bound is a bound on the distance to an independent float64 solve of G_eps's minimizer
    with torch.no_grad():
        inj, w = layer.injection(x), layer.W.weight
        T = layer.fixed_point_map(inj, w)
        z_ref, _ = solve("fixed_point", T, torch.zeros_like(inj), tol=1e-14, max_iter=200000)
        z, _ = solve("anderson", T, torch.zeros_like(inj), tol=1e-4, max_iter=200)
        tz = T(z.clone())
    c = {c.name: c for c in certify_equilibrium(layer, x, z=z, tol=1e-3, distance_tol=1.0)}
    dist = c["distance_to_selected_equilibrium"]
    q = max(eps, norm.value**2 - eps)
    assert dist.details["q"] == pytest.approx(q)
    true = float(((z - z_ref).norm(dim=1) / tz.norm(dim=1)).max())
    assert true <= dist.value and dist.value < math.inf
    # without the selecting term, |W|_2 = 1 is refused (G would not be strongly convex)
    with pytest.raises(ValueError, match="target_norm"):
        OptEq(4, 6, target_norm=1.0)
    with pytest.raises(ValueError, match="anchor: expected"):
        OptEq(4, 6, eps=0.1, anchor="nearest")


def test_selection_classifier_certificate_and_training_step():
    torch.manual_seed(0)
    model = OptEqClassifier((1, 12, 12), 10, OptEqConfig(stem_channels=4, channels=4, pool=2, target_norm=1.0,
                                                         eps=0.1, tol=1e-4, max_iter=200))
    x = torch.rand(4, 1, 12, 12)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    anchor = model.blocks[0].anchor
    assert anchor is not None and anchor.weight.grad is not None and float(anchor.weight.grad.abs().max()) > 0
    certs = {c.name: c for c in certify_opteq(model, x)}
    assert certs["operator_norm"].op == "<=" and certs["strong_convexity"].holds
    assert "distance_to_minimizer" not in certs
    assert certs["equilibrium_residual"].holds and certs["distance_to_selected_equilibrium"].holds
