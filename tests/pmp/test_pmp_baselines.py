"""Baselines: proximal SGD (L1), IHT and global magnitude pruning do what they say."""

import torch
from torch import nn

from proxnets.pmp import soft_threshold
from proxnets.pmp.baselines import ProxSGD, magnitude_prune
from proxnets.pmp.sparsity import weight_density


def _grad_step(opt, w):
    opt.zero_grad()
    (w * torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape)).sum().backward()
    opt.step()


def test_l1_prox_sgd_is_a_gradient_step_then_soft_thresholding():
    w = nn.Parameter(torch.linspace(-1, 1, 21))
    w0 = w.detach().clone()
    opt = ProxSGD([w], lr=0.01, momentum=0.0, prox="l1", strength=5.0)
    _grad_step(opt, w)
    expected = soft_threshold(w0 - 0.01 * torch.arange(21.0), 0.01 * 5.0)
    assert torch.allclose(w.detach(), expected)


def test_iht_keeps_the_requested_fraction_over_all_groups():
    a, b = nn.Parameter(torch.randn(30)), nn.Parameter(torch.randn(70))
    opt = ProxSGD([a, b], lr=0.01, prox="iht", strength=0.2)
    _grad_step(opt, a)
    assert int((a != 0).sum() + (b != 0).sum()) == 20


def test_global_magnitude_pruning_density():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    magnitude_prune(model, 0.25)
    assert abs(weight_density(model) - 0.25) < 1e-2
