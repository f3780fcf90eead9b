"""CapsNet, its layers and losses: the reference counts, the losses' scaling, learning."""

from __future__ import annotations

import pytest
import torch

from proxnets.capsules import (
    MODELS,
    CapsNet,
    CapsuleLinear,
    PrimaryCapsules,
    capsnet_loss,
    capsnet_scores,
    capsule_length,
    dynamic_routing,
    margin_loss,
    random_shift,
    reconstruction_loss,
    reference_config,
    routing_certificate,
    small_config,
    squash,
)


def test_reference_capsnet_has_the_papers_parameter_counts():
    model = CapsNet(reference_config(bias=False))
    assert model.config.primary_capsules == 1152
    assert model.num_parameters() == 8_215_568
    assert model.num_parameters(decoder=False) == 6_804_224
    # the official code's per-parent bias (the default) adds 10 x 16 parameters the paper does not count
    assert CapsNet(reference_config()).num_parameters() == 8_215_568 + 160


def test_reference_defaults_are_the_official_codes_choices():
    cfg = reference_config()
    assert (cfg.gradient, cfg.bias, cfg.margin_scale, cfg.reconstruction_scale) == ("all", True, 0.5, 5e-4)
    torch.manual_seed(0)
    model = CapsNet(small_config(conv_channels=8, primary_channels=2, decoder_hidden=(16,)))
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    # the margin part of the loss is half the paper's formula
    _, parts = capsnet_loss(model, x, y)
    v, _ = model(x)
    assert parts["margin"] == pytest.approx(0.5 * float(margin_loss(capsule_length(v), y).detach()), rel=1e-6)
    # the bias enters s_j: with zero votes, v = squash(beta)
    with torch.no_grad():
        model.classes.weight.zero_()
        v, _ = model(x)
    assert torch.allclose(v, squash(model.classes.bias).expand_as(v), atol=1e-6)
    # gradient "all": the couplings carry gradient to the conv weights (differs from "last")
    model.classes.weight.data.normal_(0, 0.05)
    grads = {}
    for mode in ("all", "last"):
        model.classes.gradient = mode
        model.zero_grad()
        capsnet_loss(model, x, y)[0].backward()
        grads[mode] = model.classes.weight.grad.clone()
    assert not torch.allclose(grads["all"], grads["last"], rtol=1e-4, atol=1e-9)


def test_any_image_size_and_channels():
    cfg = small_config((3, 32, 32), 10, conv_channels=8, primary_channels=2, decoder_hidden=(16,))
    model = CapsNet(cfg)
    assert cfg.primary_capsules == 2 * 8 * 8
    x = torch.rand(2, 3, 32, 32)
    v, _ = model(x)
    assert model.reconstruct(v).shape == x.shape
    with pytest.raises(ValueError, match="input_shape: expected an image large enough"):
        small_config((1, 12, 12), 10)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 3, 32, 32\)"):
        model(torch.rand(2, 1, 28, 28))


def test_capsule_layer_routes_its_factored_votes_like_dense_votes():
    torch.manual_seed(0)
    layer = CapsuleLinear(20, 4, 5, 6, iterations=3, init_std=0.3)
    u = torch.randn(3, 20, 4)
    v, _ = layer(u)
    dense = torch.einsum("bmk,nmkd->bmnd", u, layer.weight)
    v_ref, _ = dynamic_routing(dense, 3)
    assert torch.allclose(v, v_ref, atol=1e-6)


def test_primary_capsules_group_filters_into_squashed_vectors():
    layer = PrimaryCapsules(3, channels=2, capsule_dim=4, kernel_size=3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    out = layer(x)
    assert out.shape == (2, 2 * 4 * 4, 4)
    raw = layer.conv(x)  # (2, 8, 4, 4): capsule (ch=1, y=2, x=3) is filters 4..7 at (2, 3)
    s = raw[:, 4:8, 2, 3]
    n = s.norm(dim=-1, keepdim=True)
    assert torch.allclose(out[:, 16 + 2 * 4 + 3], s * n / (1 + n * n), atol=1e-6)


def test_margin_loss_matches_the_formula():
    lengths = torch.tensor([[0.95, 0.05, 0.3], [0.5, 0.2, 0.0]])
    y = torch.tensor([0, 1])
    # sample 0: present 0, absent 0.5*(0.3-0.1)^2 = 0.02; sample 1: present (0.9-0.2)^2 = 0.49, absent 0.5*0.4^2 = 0.08
    assert float(margin_loss(lengths, y)) == pytest.approx((0.02 + 0.49 + 0.08) / 2)
    with pytest.raises(ValueError, match="targets: expected integer class indices"):
        margin_loss(lengths, torch.tensor([0.0, 1.0]))


def test_reconstruction_loss_is_a_scaled_sum_not_a_mean():
    x = torch.zeros(2, 1, 28, 28)
    rec = torch.full_like(x, 0.5)
    # 784 pixels * 0.25 * 0.0005 = 0.098 per sample (a mean over pixels would give 784x less)
    assert float(reconstruction_loss(rec, x)) == pytest.approx(784 * 0.25 * 5e-4)


def test_random_shift_moves_digits_by_at_most_two_pixels():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing falls off the edge
    rows = out[:, 0].sum(2).nonzero()[:, 1].view(16, -1)[:, 0]
    assert bool(((rows - 10).abs() <= 2).all()) and len(set(rows.tolist())) > 1


def test_models_registry_builds_trainables():
    t = MODELS["capsnet-small"]((1, 28, 28), 10)
    assert t.loss_fn is capsnet_loss and t.predict_fn is capsnet_scores and t.augment is random_shift
    assert t.config.optimizer == "adam" and t.config.schedule == "exp"
    assert MODELS["capsnet"]((1, 28, 28), 10).model.num_parameters() == 8_215_568 + 160  # with the official per-parent bias


def test_small_capsnet_learns_mnist5k():
    from proxnets.data import load_dataset
    from proxnets.engine import TrainConfig, evaluate, fit

    ds = load_dataset("mnist5k", n_train=1500, n_test=500)
    torch.manual_seed(0)
    model = CapsNet(small_config(ds.input_shape, ds.num_classes, conv_channels=16, primary_channels=4))
    cfg = TrainConfig(epochs=1, batch_size=25, lr=3e-3, progress=False, eval_every_epoch=False)
    fit(model, ds, cfg, loss_fn=capsnet_loss, predict_fn=capsnet_scores, log=lambda m: None)
    acc = evaluate(model, ds.x_test, ds.y_test, predict_fn=capsnet_scores)
    assert acc >= 0.7  # chance is 0.1
    with torch.no_grad():
        v, info = model(ds.x_test[:8], trace=True)
    assert torch.allclose(capsule_length(v), capsnet_scores(model, ds.x_test[:8]))
    assert bool((info.energy[1:] <= info.energy[:-1] + 1e-5 * info.energy.abs().amax(0)).all())
    cert = routing_certificate(model, ds.x_test[:32], passes=20)
    assert cert["passes"] == 20 and cert["energy_non_increasing"]
    assert cert["energy_last"] < cert["energy_first"] and cert["entropy_last"] < cert["entropy_first"]
