"""The hand-derived backward of gradient="all" (routing._AdjointRouting) is autograd's derivative, and a broken one
is caught."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from proxnets.capsules import FactoredVotes, dynamic_routing
from proxnets.capsules import routing as R
from proxnets.capsules import votes as V

B, M, N, K, D = 3, 12, 5, 4, 6
OPTIONS = [{}, {"leaky": True}, {"routing": "regularized"}, {"bias": "shared"}, {"bias": "per-sample"},
           {"init": True}, {"scale": 60.0, "leaky": True}, {"exact": True, "leaky": True, "bias": "shared"}]


def _problem(options, seed=3):
    g = torch.Generator().manual_seed(seed)
    u = options.get("scale", 1.0) * torch.randn(B, M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, M, K, D, generator=g, dtype=torch.float64)
    shape = (B, N, D) if options.get("bias") == "per-sample" else (N, D)
    bias = 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64) if options.get("bias") else None
    init = 2 * torch.randn(B, M, N, generator=g, dtype=torch.float64) if options.get("init") else None
    probe = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    return u, w, bias, init, probe


def _run(monkeypatch, options, path, passes=4):
    """(v, couplings, grads) of gradient="all" on one problem: the adjoint in chunks of 2 + 1 samples (per-pass
    tensors kept or replayed; votes formed in blocks of children) or on the votes formed whole (the suite's models), or autograd through every pass
    (votes formed once, or the factored maps)."""
    u0, w0, bias, init, probe = _problem(options)
    monkeypatch.setattr(R, "_MATERIALIZE_BYTES", 1 << 30 if path in ("formed", "formed-adjoint") else 0)
    monkeypatch.setattr(R, "_CHUNK_BYTES", 2 * N * M * D * 8)
    monkeypatch.setattr(R, "_KEEP_BYTES", 0 if path == "replayed" else 1 << 30)
    # votes formed and their gradient transposed a block of children at a time: 5 + 5 + 2 children per 2-sample chunk
    monkeypatch.setattr(V, "_FORM_BLOCK_ELEMENTS", 5 * 2 * N * D)
    u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
    beta = None if bias is None else bias.clone().requires_grad_()
    kw = {k: options[k] for k in ("leaky", "routing") if k in options}
    v, info = dynamic_routing(FactoredVotes(u, w), passes, gradient="all", bias=beta, initial_logits=init,
                              trace=path == "factored", _formed_adjoint=path == "formed-adjoint", **kw)
    grads = torch.autograd.grad((v * probe).sum(), (u, w) if beta is None else (u, w, beta))
    return v.detach(), info.couplings, grads


def _close(a, b, tol):
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("path", ["kept", "replayed", "formed-adjoint"])
@pytest.mark.parametrize("options", OPTIONS)
def test_adjoint_equals_autograd_through_every_pass(monkeypatch, options, path):
    """Values, couplings and gradients (u, W, bias) of the adjoint equal autograd's through every pass, with leak,
    bias, initial logits, regularized routing, and votes so large that the logits hit the floor and are clamped."""
    clamped = []
    vjp = R._renormalization_vjp
    exact = bool(options.get("exact"))  # also the subtracted max's (round-off) term when nothing is clamped
    monkeypatch.setattr(R, "_renormalization_vjp",
                        lambda gb, bt, floor: clamped.append(bool((bt <= -floor).any())) or vjp(gb, bt, floor, exact))
    v, c, grads = _run(monkeypatch, options, path)
    assert clamped, "the adjoint did not run"
    if "scale" in options:
        assert any(clamped), "the large votes were meant to clamp logits"
    for ref_path in ("formed", "factored"):
        v_ref, c_ref, g_ref = _run(monkeypatch, options, ref_path)
        assert torch.allclose(v, v_ref, atol=1e-12, rtol=0)
        assert torch.allclose(c, c_ref, atol=1e-12, rtol=0)
        assert _close(grads, g_ref, 1e-10), ref_path


@pytest.mark.parametrize("broken", ["squash-jacobian-identity", "no-coupling-history"])
def test_a_broken_adjoint_is_caught(monkeypatch, broken):
    """The comparison above can fail: an adjoint that skips the squash Jacobian, or that drops the gradient through
    the logits' history (the couplings' dependence on the votes), is far from autograd."""
    options = {"leaky": True, "bias": "shared"}
    v_ref, _, g_ref = _run(monkeypatch, options, "formed")
    if broken == "squash-jacobian-identity":
        monkeypatch.setattr(R, "_squash_vjp", lambda s, g: g)
    else:
        monkeypatch.setattr(R, "_renormalization_vjp", lambda gb, bt, floor: torch.zeros_like(gb))
    v, _, grads = _run(monkeypatch, options, "kept")
    assert torch.allclose(v, v_ref, atol=1e-12, rtol=0)  # the forward is untouched
    assert not _close(grads, g_ref, 1e-3)


def test_adjoint_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(R, "_MATERIALIZE_BYTES", 0)
    monkeypatch.setattr(R, "_CHUNK_BYTES", 2 * 3 * 4 * 2 * 8)  # 2 samples per chunk
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda u, w, b: dynamic_routing(FactoredVotes(u, w), 3, gradient="all", bias=b, leaky=True,
                                                     routing="regularized", tau=2.0)[0], (u, w, beta))
