"""The theory of routing as mirror descent on a concave energy, tested as theory."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from proxnets.capsules import (
    DenseVotes,
    FactoredVotes,
    capsule_length,
    coupling_entropy,
    dynamic_routing,
    energy_gradient,
    routing_energy,
    squash,
)
from proxnets.utils.convergence import NonConvergenceError, NonConvergenceWarning

B, M, N, K, D = 3, 12, 5, 4, 6


def votes(scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, M, N, D, generator=g, dtype=dtype)


def factored(seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, M, K, generator=g, dtype=dtype).requires_grad_(requires_grad)
    w = torch.randn(N, M, K, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return u, w


def couplings_after(u_hat, passes, leaky=False):
    """C used by the output of ``passes`` routing passes (C_{passes-1})."""
    return dynamic_routing(u_hat, passes, leaky=leaky)[1].couplings


def kl_rows(p, q):
    return (torch.special.xlogy(p, p) - p * torch.log(q)).sum(-1).sum(-1)  # (B,)


# --- squash and lengths ------------------------------------------------------------------------

def test_squash_length_is_the_squashing_function_and_below_one():
    s = torch.randn(50, 7, dtype=torch.float64) * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    n = s.norm(dim=-1)
    assert torch.allclose(squash(s).norm(dim=-1), n**2 / (1 + n**2), rtol=1e-6, atol=1e-6)
    assert bool((capsule_length(squash(s), eps=0.0) < 1).all())
    # direction kept
    cos = torch.nn.functional.cosine_similarity(squash(s), s, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos))


def test_no_nan_at_zero_in_value_and_gradient():
    s = torch.zeros(4, 8, requires_grad=True)
    v = squash(s)
    (v.sum() + capsule_length(s).sum()).backward()
    assert torch.equal(v, torch.zeros_like(v))
    assert bool(torch.isfinite(s.grad).all())
    u_hat = torch.zeros(2, 6, 3, 4, requires_grad=True)
    out, info = dynamic_routing(u_hat, 3, gradient="all", trace=True)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(u_hat.grad).all())
    assert bool(torch.isfinite(info.energy).all())


def test_gradcheck_squash_float64_including_zero():
    s = torch.randn(5, 6, dtype=torch.float64)
    s[0] = 0.0
    assert gradcheck(squash, (s.requires_grad_(),))


# --- the energy and its gradient --------------------------------------------------------------

def test_energy_gradient_closed_form_matches_autograd():
    u_hat = votes()
    c = torch.softmax(torch.randn(B, M, N, dtype=torch.float64), -1).requires_grad_()
    (auto,) = torch.autograd.grad(routing_energy(u_hat, c).sum(), c)
    assert torch.allclose(energy_gradient(u_hat, c), auto, rtol=1e-10, atol=1e-12)


def test_energy_is_concave_along_segments():
    """E(t C1 + (1-t) C0) >= t E(C1) + (1-t) E(C0) for couplings on the simplices."""
    u_hat = votes()
    c0 = torch.softmax(3 * torch.randn(B, M, N, dtype=torch.float64), -1)
    c1 = torch.softmax(3 * torch.randn(B, M, N, dtype=torch.float64), -1)
    e0, e1 = routing_energy(u_hat, c0), routing_energy(u_hat, c1)
    for t in torch.linspace(0, 1, 11, dtype=torch.float64):
        mid = routing_energy(u_hat, t * c1 + (1 - t) * c0)
        assert bool((mid >= t * e1 + (1 - t) * e0 - 1e-10).all())


@pytest.mark.parametrize("leaky", [False, True])
def test_routing_step_is_a_mirror_descent_step_on_the_energy(leaky):
    """C_{t+1} = C_t exp(-grad E(C_t)) / Z, with grad E from autograd (the leak has zero gradient)."""
    u_hat = votes(scale=0.7)
    for t in range(4):
        c_t = couplings_after(u_hat, t + 1, leaky)
        c_next = couplings_after(u_hat, t + 2, leaky)
        c = c_t.clone().requires_grad_()
        (grad,) = torch.autograd.grad(routing_energy(u_hat, c).sum(), c)
        logits = torch.log(c_t) - grad
        if leaky:
            leak = 1 - c_t.sum(-1, keepdim=True)  # its logit stays log(leak) - 0
            logits = torch.cat([logits, torch.log(leak)], -1)
            expected = torch.softmax(logits, -1)[..., :-1]
        else:
            expected = torch.softmax(logits, -1)
        assert torch.allclose(c_next, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3])
@pytest.mark.parametrize("leaky", [False, True])
def test_energy_never_increases_at_any_scale(scale, leaky):
    _, info = dynamic_routing(votes(scale, seed=1), 30, trace=True, leaky=leaky)
    e = info.energy  # (T, B)
    slack = 1e-12 * e.abs().amax(0)
    assert bool((e[1:] <= e[:-1] + slack).all()), (e[1:] - e[:-1]).max()


def test_energy_decrease_is_at_least_the_symmetric_kl():
    """E(C_{t+1}) <= E(C_t) - KL(C_{t+1}||C_t) - KL(C_t||C_{t+1}) (concavity + mirror step)."""
    u_hat = votes(scale=2.0, seed=2)
    for t in range(1, 6):
        c_t, c_n = couplings_after(u_hat, t), couplings_after(u_hat, t + 1)
        gap = routing_energy(u_hat, c_t) - routing_energy(u_hat, c_n)
        assert bool((gap >= kl_rows(c_n, c_t) + kl_rows(c_t, c_n) - 1e-10).all())


def test_energy_never_increases_on_real_votes():
    from proxnets.capsules import CapsNet, small_config
    from proxnets.data import load_dataset

    torch.manual_seed(0)
    x = load_dataset("mnist5k").x_test[:16]
    model = CapsNet(small_config(conv_channels=16, primary_channels=4))
    with torch.no_grad():
        u = model.primary_capsules(x)
        votes_real = model.classes.votes(u)
        _, info = dynamic_routing(votes_real, 25, trace=True)
    e = info.energy.double()
    assert bool((e[1:] <= e[:-1] + 1e-5 * e.abs().amax(0)).all())


def test_repeated_routing_polarizes_the_couplings():
    _, info = dynamic_routing(votes(scale=3.0, seed=3), 60, trace=True)
    summary = info.summary()
    assert summary["entropy"][0] == pytest.approx(math.log(N))
    assert summary["entropy"][-1] < 0.05 * math.log(N)
    assert summary["max_coupling"][-1] > 0.98
    assert summary["change"][-1] < summary["change"][0]


# --- the implementation -----------------------------------------------------------------------

def test_dense_and_factored_votes_agree_in_values_and_gradients():
    for gradient in ("last", "all"):
        u, w = factored(requires_grad=True)
        fv = FactoredVotes(u, w)
        v1, i1 = dynamic_routing(fv, 4, gradient=gradient, trace=True)
        g1 = torch.autograd.grad(v1.pow(3).sum(), (u, w))
        v2, i2 = dynamic_routing(DenseVotes(fv.dense()), 4, gradient=gradient, trace=True)
        g2 = torch.autograd.grad(v2.pow(3).sum(), (u, w))
        assert torch.allclose(v1, v2, atol=1e-12)
        assert torch.allclose(i1.energy, i2.energy, atol=1e-10)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-10)


def test_agree_is_the_adjoint_of_combine():
    for vts in (DenseVotes(votes()), FactoredVotes(*factored())):
        c = torch.rand(B, M, N, dtype=torch.float64)
        v = torch.randn(B, N, D, dtype=torch.float64)
        lhs = (vts.combine(c) * v).sum()
        rhs = (c * vts.agree(v)).sum()
        assert float(abs(lhs - rhs)) < 1e-10 * float(abs(lhs))


def small_factored():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    return u, w


def test_gradcheck_routing_through_all_passes_float64():
    """gradient="all" is the true derivative of the routing map (gradient="last" is, by design, not:
    it treats the couplings as constants; see the textbook comparison below)."""
    u, w = small_factored()
    assert gradcheck(lambda u, w: dynamic_routing(FactoredVotes(u, w), 3, gradient="all")[0], (u, w), fast_mode=True)
    u_hat = torch.einsum("bmk,nmkd->bmnd", u.detach(), w.detach()).requires_grad_()
    assert gradcheck(lambda x: dynamic_routing(x, 3, gradient="all", leaky=True)[0], (u_hat,), fast_mode=True)


def test_gradcheck_factored_maps_float64():
    u, w = small_factored()
    c = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda c, u, w: FactoredVotes(u, w).combine(c), (c, u, w))
    assert gradcheck(lambda v, u, w: FactoredVotes(u, w).agree(v), (v, u, w))


def test_last_mode_equals_the_textbook_detached_procedure():
    u_hat = votes(scale=0.8).requires_grad_()
    ours, _ = dynamic_routing(u_hat, 3, gradient="last")
    logits = torch.zeros(B, M, N, dtype=u_hat.dtype)
    for t in range(3):
        c = torch.softmax(logits, dim=2)
        src = u_hat if t == 2 else u_hat.detach()
        out = squash((c.unsqueeze(-1) * src).sum(1))
        if t < 2:
            logits = logits + (u_hat.detach() * out.unsqueeze(1)).sum(-1)
    assert torch.allclose(ours, out, atol=1e-12)
    g1 = torch.autograd.grad(ours.sum(), u_hat)[0]
    g2 = torch.autograd.grad(out.sum(), u_hat)[0]
    assert torch.allclose(g1, g2, atol=1e-12)
    # through all passes the couplings carry gradient too: a different gradient
    g_all = torch.autograd.grad(dynamic_routing(u_hat, 3, gradient="all")[0].sum(), u_hat)[0]
    assert not torch.allclose(g_all, g1, atol=1e-6)


def test_permutation_equivariance_over_children_and_parents():
    u_hat = votes()
    v, info = dynamic_routing(u_hat, 5)
    pc, pp = torch.randperm(M), torch.randperm(N)
    v_c, info_c = dynamic_routing(u_hat[:, pc], 5)
    assert torch.allclose(v_c, v, atol=1e-12)
    assert torch.allclose(info_c.couplings, info.couplings[:, pc], atol=1e-12)
    v_p, _ = dynamic_routing(u_hat[:, :, pp], 5)
    assert torch.allclose(v_p, v[:, pp], atol=1e-12)


def test_softmax_is_over_parents_and_logits_reset_per_sample():
    u_hat = votes()
    _, info = dynamic_routing(u_hat, 4)
    assert torch.allclose(info.couplings.sum(-1), torch.ones(B, M, dtype=torch.float64))
    # a sample's result does not depend on the other samples of the batch
    v_one, _ = dynamic_routing(u_hat[1:2], 4)
    v_all, _ = dynamic_routing(u_hat, 4)
    assert torch.allclose(v_one[0], v_all[1], atol=1e-12)


def test_zero_and_one_pass_are_uniform_couplings():
    u_hat = votes()
    v0, i0 = dynamic_routing(u_hat, 0)
    v1, _ = dynamic_routing(u_hat, 1)
    assert torch.allclose(v0, v1)
    assert torch.allclose(v1, squash(u_hat.mean(1) * M / N))
    assert torch.allclose(i0.couplings, torch.full_like(i0.couplings, 1 / N))


def test_tolerance_stops_early_and_reports_convergence():
    u_hat = votes(scale=3.0, seed=4)
    v, info = dynamic_routing(u_hat, 200, tol=1e-6)
    assert info.converged and info.iterations < 200
    assert info.residuals[-1] < 1e-6 and all(r >= 1e-6 for r in info.residuals[:-1])
    v_fixed, _ = dynamic_routing(u_hat, info.iterations)
    assert torch.allclose(v, v_fixed)


def test_nonconvergence_is_never_silent():
    u_hat = votes(scale=0.3)
    with pytest.warns(NonConvergenceWarning):
        _, info = dynamic_routing(u_hat, 2, tol=1e-12)
    assert not info.converged
    with pytest.raises(NonConvergenceError):
        dynamic_routing(u_hat, 2, tol=1e-12, policy="raise")


def test_trace_fields_and_summary():
    _, info = dynamic_routing(votes(), 7, trace=True, mute_threshold=0.5)
    for name in info.TRACE_FIELDS:
        assert getattr(info, name).shape == (7, B)
    assert set(info.summary()) == set(info.TRACE_FIELDS)
    assert torch.allclose(info.entropy[0], torch.full((B,), math.log(N), dtype=torch.float64))
    assert torch.allclose(coupling_entropy(info.couplings), info.entropy[-1])
    assert bool(((info.muted >= 0) & (info.muted <= 1)).all())
    d = info.to_dict()
    assert d["iterations"] == 7 and len(d["energy"]) == 7


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dynamic_routing(torch.randn(2, 3, 4)), "votes: expected a tensor with 4 dimensions"),
        (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), -1), "iterations: expected an integer >= 0"),
        (lambda: dynamic_routing(torch.full((2, 3, 4, 5), math.nan)), "votes: expected finite values"),
        (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), gradient="some"), "gradient: expected one of"),
        (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), tol=0.0), "tol: expected a number in"),
        (lambda: routing_energy(torch.randn(2, 3, 4, 5), torch.rand(2, 4, 3)), r"couplings: expected shape \(2, 3, 4\)"),
        (lambda: FactoredVotes(torch.randn(2, 3, 5), torch.randn(4, 3, 4, 6)), r"u: expected shape \(\*, 3, 4\)"),
        (lambda: dynamic_routing([1, 2]), "votes: expected a .*Votes object"),
    ],
)
def test_bad_input_names_argument_expected_and_received(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_float32_energy_is_accurate_for_short_capsules():
    """g(r) = r - arctan r cancels in float32 for small r; the series branch keeps E accurate."""
    for scale in (1e-3, 1e-2, 1e-1, 1.0):
        u_hat = votes(scale, seed=6)
        c = torch.softmax(torch.randn(B, M, N, dtype=torch.float64), -1)
        e64 = routing_energy(u_hat, c)
        e32 = routing_energy(u_hat.float(), c.float()).double()
        assert bool(((e32 - e64).abs() <= 1e-5 * e64.abs()).all()), scale
        _, info = dynamic_routing(u_hat.float(), 20, trace=True)
        e = info.energy.double()
        assert bool((e[1:] <= e[:-1] + 1e-5 * e.abs().amax(0)).all()), scale


# --- the three ways factored votes are routed: formed once, in chunks, never formed ----------------

@pytest.mark.parametrize("gradient", ["last", "all"])
@pytest.mark.parametrize("options", [{}, {"leaky": True}, {"routing": "regularized"}, {"bias": True},
                                     {"bias": "per-sample"}, {"init": True}])
def test_formed_chunked_and_factored_routing_agree(monkeypatch, gradient, options):
    """Factored votes are formed once (ParentMajorVotes) when they fit, routed in chunks of the batch when they do
    not (gradient="all": each chunk checkpointed, re-formed and re-routed in backward), or through the factored
    maps (traced runs): the same map, values, couplings and gradients (bias included)."""
    from proxnets.capsules import routing as R
    from proxnets.capsules import votes as V

    u0, w0 = factored(seed=3)
    g = torch.Generator().manual_seed(4)
    shape = (B, N, D) if options.get("bias") == "per-sample" else (N, D)
    bias = 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64) if options.get("bias") else None
    init = 2 * torch.randn(B, M, N, generator=g, dtype=torch.float64) if options.get("init") else None
    kw = {k: v for k, v in options.items() if k in ("leaky", "routing")}
    probe = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    out = {}
    for name, materialize, chunk in (("formed", 1 << 30, 1 << 30), ("chunked", 0, 2 * N * M * D * 8),
                                     ("factored", 0, 0)):
        monkeypatch.setattr(R, "_MATERIALIZE_BYTES", materialize)
        monkeypatch.setattr(R, "_CHUNK_BYTES", chunk)
        # the factored kernels' own chunks: 2 + 1 samples in the chunked run (a short last chunk in backward)
        monkeypatch.setattr(V, "_CHUNK_ELEMENTS", 2 * N * M * K if name == "chunked" else 1 << 20)
        # each chunk's votes formed (and, for "all", their gradient transposed) in blocks of 3 children (2 samples)
        monkeypatch.setattr(V, "_FORM_BLOCK_ELEMENTS", 3 * 2 * N * D if name == "chunked" else 1 << 17)
        u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
        beta = None if bias is None else bias.clone().requires_grad_()
        if name == "factored":  # gradient="all" and traced runs take this path when the votes do not fit
            v, info = dynamic_routing(FactoredVotes(u, w), 4, gradient=gradient, bias=beta, initial_logits=init,
                                      trace=True, **kw)
        else:
            v, info = dynamic_routing(FactoredVotes(u, w), 4, gradient=gradient, bias=beta, initial_logits=init, **kw)
        grads = torch.autograd.grad((v * probe).sum(), (u, w) if beta is None else (u, w, beta))
        out[name] = (v.detach(), info.couplings, grads, info.tau)
    ref = out["factored"]
    for name in ("formed", "chunked"):
        v, c, grads, tau = out[name]
        assert torch.allclose(v, ref[0], atol=1e-12, rtol=0)
        assert torch.allclose(c, ref[1], atol=1e-12, rtol=0)
        assert torch.allclose(tau, ref[3], rtol=1e-12)
        for a, b in zip(grads, ref[2]):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)


def test_recomputed_routing_keeps_no_votes_and_passes_gradcheck(monkeypatch):
    """gradient="all" on votes too large to keep: checkpointed chunks save only u, the re-laid-out weight and the
    logits' inputs (no (b, N, M, D) tensor survives the forward), and the gradient passes gradcheck in float64."""
    from proxnets.capsules import routing as R

    monkeypatch.setattr(R, "_MATERIALIZE_BYTES", 0)
    us, ws = small_factored()
    monkeypatch.setattr(R, "_CHUNK_BYTES", ws.shape[0] * ws.shape[1] * ws.shape[3] * 8)  # one sample per chunk
    beta = torch.randn(ws.shape[0], ws.shape[3], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda u, w, b: dynamic_routing(FactoredVotes(u, w), 3, gradient="all", bias=b,
                                                     leaky=True)[0], (us, ws, beta), fast_mode=True)

    def saved_votes(materialize, formed_adjoint=False):  # saved tensors holding votes of b = 1..B samples
        monkeypatch.setattr(R, "_MATERIALIZE_BYTES", materialize)
        u, w = factored(requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            dynamic_routing(FactoredVotes(u, w), 3, gradient="all", _formed_adjoint=formed_adjoint)
        return [n for n in saved if n in {b * N * M * D for b in range(1, B + 1)}]  # W has K > B slices

    assert saved_votes(1 << 30)  # formed whole, autograd (the default there): keeps the votes (the check can fail)
    assert not saved_votes(1 << 30, formed_adjoint=True)  # formed whole, the adjoint
    assert not saved_votes(0)


def test_parent_major_votes_are_the_dense_votes_with_adjoint_maps():
    from proxnets.capsules.votes import ParentMajorVotes

    u, w = factored(requires_grad=True)
    fv = FactoredVotes(u, w)
    pm = fv.parent_major()
    assert isinstance(pm, ParentMajorVotes) and pm.u_pm.is_contiguous()
    assert torch.equal(pm.dense(), fv.dense())
    assert torch.allclose(pm.vote_scale(), DenseVotes(fv.dense()).vote_scale())
    assert torch.allclose(pm.column_sq_norms(), fv.column_sq_norms(), rtol=1e-12)
    c = torch.rand(B, M, N, dtype=torch.float64)
    v = torch.randn(B, N, D, dtype=torch.float64)
    assert torch.allclose(pm.combine(c), fv.combine(c), atol=1e-12)
    assert torch.allclose(pm.agree(v), fv.agree(v), atol=1e-12)
    lhs, rhs = (pm.combine(c) * v).sum().detach(), (c * pm.agree(v)).sum().detach()
    assert float(abs(lhs - rhs)) < 1e-10 * float(abs(lhs))
    assert torch.equal(fv.parent_major(slice(1, 3)).u_pm, pm.u_pm[1:3])
    us, ws = small_factored()
    assert gradcheck(lambda u, w: dynamic_routing(FactoredVotes(u, w).parent_major(), 3, gradient="all")[0], (us, ws),
                     fast_mode=True)


def test_chunked_routing_checks_its_initial_logits(monkeypatch):
    from proxnets.capsules import routing as R

    monkeypatch.setattr(R, "_MATERIALIZE_BYTES", 0)
    with pytest.raises(ValueError, match="initial_logits: expected shape"):
        dynamic_routing(FactoredVotes(*factored()), 3, gradient="last", initial_logits=torch.zeros(B + 1, M, N))
