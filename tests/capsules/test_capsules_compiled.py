"""backend="compiled": the same routing as the eager code (values, couplings, gradients within float64 round-off),
certificates unchanged, a clear error without a compiler. The tests that compile are slow (tens of seconds each)."""

from __future__ import annotations

import pytest
import torch

from proxnets.capsules import CapsuleLinear, dynamic_routing, layer_certificate
from proxnets.capsules import compiled as CP
from proxnets.capsules import routing as R
from proxnets.capsules.votes import DenseVotes, FactoredVotes

B, M, N, K, D = 5, 7, 4, 3, 6


def _problem(seed=3, per_sample_bias=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, M, K, generator=g, dtype=torch.float64)
    w = 0.7 * torch.randn(N, M, K, D, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(*((B, N, D) if per_sample_bias else (N, D)), generator=g, dtype=torch.float64)
    init = 2 * torch.randn(B, M, N, generator=g, dtype=torch.float64)
    probe = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    return u, w, bias, init, probe


def _run(backend, u0, w0, bias0, init, probe, dense=False, **kw):
    u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
    beta = None if bias0 is None else bias0.clone().requires_grad_()
    votes = DenseVotes(torch.einsum("bmk,nmkd->bmnd", u, w)) if dense else FactoredVotes(u, w)
    v, info = dynamic_routing(votes, 4, bias=beta, initial_logits=init, backend=backend, **kw)
    grads = torch.autograd.grad((v * probe).sum(), (u, w) if beta is None else (u, w, beta))
    return v.detach(), info.couplings, grads, info.tau


@pytest.mark.slow
@pytest.mark.skipif(not CP.compiler_available()[0], reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("gradient", ["last", "all"])
@pytest.mark.parametrize("options", [{}, {"leaky": True, "bias": True, "init": True},
                                     {"routing": "regularized", "bias": "per-sample"}, {"dense": True, "leaky": True}])
def test_compiled_routing_equals_eager(monkeypatch, gradient, options):
    """The compiled graph does the eager procedure: values, couplings and gradients agree to round-off (float64),
    over several chunks of the batch (a short tail chunk included), and the graph was really compiled."""
    monkeypatch.setattr(R, "_CHUNK_BYTES", 2 * N * M * D * 8)  # chunks of 2, 2, 1 samples
    u, w, bias, init, probe = _problem(per_sample_bias=options.get("bias") == "per-sample")
    kw = dict(gradient=gradient, leaky=options.get("leaky", False), routing=options.get("routing", "standard"),
              dense=options.get("dense", False))
    args = (u, w, bias if options.get("bias") else None, init if options.get("init") else None, probe)
    calls = []
    original = CP._compiled

    def spy():
        calls.append(1)
        return original()

    monkeypatch.setattr(CP, "_compiled", spy)
    ref = _run("eager", *args, **kw)
    assert not calls
    got = _run("compiled", *args, **kw)
    assert calls
    assert torch.allclose(got[0], ref[0], atol=1e-12, rtol=0)
    assert torch.allclose(got[1], ref[1], atol=1e-12, rtol=0)
    assert torch.allclose(got[3], ref[3], rtol=1e-12)
    for a, b in zip(got[2], ref[2]):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)
    # the check can fail: a different procedure (one pass fewer) is far from it
    u2, w2 = u.clone().requires_grad_(), w.clone().requires_grad_()
    v3, _ = dynamic_routing(FactoredVotes(u2, w2), 3, gradient=gradient, backend="eager", leaky=kw["leaky"],
                            routing=kw["routing"])
    v4, _ = dynamic_routing(FactoredVotes(u2, w2), 4, gradient=gradient, backend="eager", leaky=kw["leaky"],
                            routing=kw["routing"])
    assert (v3 - v4).abs().max() > 1e-6


def test_compiled_backend_without_a_compiler_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(CP, "compiler_available", lambda device="cpu": (False, "no C++ compiler found (test)"))
    u, w, *_ = _problem()
    with pytest.raises(RuntimeError, match="backend: expected a working torch.compile toolchain.*no C\\+\\+ compiler"):
        dynamic_routing(FactoredVotes(u, w), 3, backend="compiled")
    with pytest.raises(ValueError, match="backend"):
        dynamic_routing(FactoredVotes(u, w), 3, backend="fused")


def test_traced_calls_and_certificates_stay_eager(monkeypatch):
    """trace / tol calls (every certificate) never compile: the same info as backend="eager", bit for bit."""
    monkeypatch.setattr(CP, "_compiled", lambda: pytest.fail("a traced call compiled"))
    u, w, *_ = _problem()
    a = dynamic_routing(FactoredVotes(u, w), 5, trace=True, backend="compiled")[1]
    b = dynamic_routing(FactoredVotes(u, w), 5, trace=True, backend="eager")[1]
    for name in ("energy", "kkt_gap", "sym_kl"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    torch.manual_seed(0)
    layer = CapsuleLinear(M, K, N, D, iterations=3, bias=True, backend="compiled").double()
    certs_c = layer_certificate(layer, u, kkt_passes=20)
    layer.backend = "eager"
    certs_e = layer_certificate(layer, u, kkt_passes=20)
    assert [(c.name, c.value, c.bound) for c in certs_c] == [(c.name, c.value, c.bound) for c in certs_e]


# ----- CapsNet(config.backend): the model-level switch (fast: nothing here compiles) -----

def _tiny_capsnet(**overrides):
    from proxnets.capsules import CapsNet, small_config
    torch.manual_seed(0)
    return CapsNet(small_config((1, 20, 20), 4, conv_channels=8, primary_channels=2, decoder_hidden=(16,), **overrides))


def test_capsnet_config_validates_backend_and_passes_it_to_the_routing_layer():
    from proxnets.capsules import small_config
    with pytest.raises(ValueError, match="backend: expected one of \\['eager', 'compiled'\\], got 'fused'"):
        small_config(backend="fused")
    assert _tiny_capsnet(backend="compiled").classes.backend == "compiled"
    assert _tiny_capsnet().classes.backend == "eager"


def test_capsnet_with_backend_eager_is_the_default_model():
    """Same parameters, outputs, loss and gradients, bit for bit, as the model built without the argument."""
    from proxnets.capsules import capsnet_loss
    x = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 3])
    a, b = _tiny_capsnet(), _tiny_capsnet(backend="eager")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    la, lb = capsnet_loss(a, x, y)[0], capsnet_loss(b, x, y)[0]
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_capsnet_compiled_without_a_compiler_raises_the_named_error(monkeypatch):
    from proxnets.capsules import capsnet_loss
    monkeypatch.setattr(CP, "compiler_available", lambda device="cpu": (False, "no C++ compiler found (test)"))
    model = _tiny_capsnet(backend="compiled")
    x, y = torch.rand(2, 1, 20, 20), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="backend: expected a working torch.compile toolchain.*no C\\+\\+ compiler"):
        capsnet_loss(model, x, y)
