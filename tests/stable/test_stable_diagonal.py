"""The diagonal step scale (``NonExpansiveBlock(step_scale="diagonal")``): the certified per-feature ``T`` of
:func:`diagonal_step_scale` is >= ``A A^T`` against the dense zero-padded operator, the block's dense float64 Jacobian has
norm <= 1 (Euler and Heun, at ``h nu = 2``) and its averagedness holds; a broken ``T`` (the cross terms dropped, or halved)
gives a Jacobian norm > 1, which these same checks catch."""

import pytest
import torch
import torch.nn.functional as F

from proxnets.stable import ClassifierConfig, NonExpansiveBlock, NonExpansiveClassifier, diagonal_step_scale, lipschitz_bound
from proxnets.stable import blocks as blocks_module


def _dense_conv(w: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The matrix of the zero-padded stride-1 convolution with kernel ``w`` on ``R^{C H W}`` (float64)."""
    n = shape[0] * shape[1] * shape[2]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return F.conv2d(basis, w.double(), padding=w.shape[-1] // 2).reshape(n, -1).T  # (F H W, C H W)


def _min_gap(t: torch.Tensor, a: torch.Tensor, pixels: int) -> float:
    """Smallest eigenvalue of ``diag(T) - A A^T`` (``T`` repeated over the pixels of each feature)."""
    return float(torch.linalg.eigvalsh(torch.diag(t.double().repeat_interleave(pixels)) - a @ a.T).min())


def _jacobian_norm(block: NonExpansiveBlock, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda z: block(z.unsqueeze(0)).squeeze(0), x)
    return float(torch.linalg.matrix_norm(jac.reshape(x.numel(), x.numel()), ord=2))


def _block(shape, features, method="euler", margin=None, seed=0, nonneg=False) -> NonExpansiveBlock:
    torch.manual_seed(seed)
    blk = NonExpansiveBlock(shape, features, method=method, schedule="fixed", steps=1, step_scale="diagonal",
                            averaged_margin=margin).double().eval()
    with torch.no_grad():
        w = torch.randn_like(blk.weight)
        blk.weight.copy_(w.abs() if nonneg else w)  # nonnegative kernels: the Schur bound is nearly tight (Perron)
        blk.bias.normal_()
    return blk


@pytest.mark.parametrize("c,f,h,nonneg", [(2, 3, 5, False), (3, 2, 4, False), (2, 2, 6, True), (1, 3, 5, True)])
def test_diagonal_scale_dominates_the_dense_gram_at_any_q(c, f, h, nonneg):
    torch.manual_seed(10 * c + f + h)
    w = torch.randn(f, c, 3, 3, dtype=torch.float64)
    w = w.abs() if nonneg else w
    a = _dense_conv(w, (c, h, h))
    for q in (None, torch.rand(f, dtype=torch.float64) + 0.1):
        assert _min_gap(diagonal_step_scale(w, q), a, h * h) >= -1e-9
    # the bound holds at every size: a larger image, the same T
    assert _min_gap(diagonal_step_scale(w), _dense_conv(w, (c, h + 3, h + 2)), (h + 3) * (h + 2)) >= -1e-9
    # a matrix: T >= W W^T
    m = torch.randn(f, 4, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(torch.diag(diagonal_step_scale(m)) - m @ m.T).min()) >= -1e-12
    # the broken T: the cross terms dropped (diag(A A^T)) is not >= A A^T
    assert _min_gap((w * w).sum((1, 2, 3)), a, h * h) < -1e-3


@pytest.mark.parametrize("method,nonneg,seed", [("euler", False, 0), ("euler", True, 1), ("heun", True, 2), ("euler", True, 3)])
def test_diagonal_block_jacobian_is_non_expansive(method, nonneg, seed):
    blk = _block((2, 5, 5), 3, method=method, seed=seed, nonneg=nonneg)
    assert float(blk.lipschitz_constant()) == 1.0 and blk.lipschitz_constant().rigorous
    assert abs(blk.norm_condition()["h_nu"] - 2.0) < 1e-5  # the full step: one Euler step is x - 2 A^T T^{-1} sigma
    torch.manual_seed(seed)
    for x in (torch.rand(2, 5, 5, dtype=torch.float64), torch.randn(2, 5, 5, dtype=torch.float64)):
        assert _jacobian_norm(blk, x) <= 1 + 1e-9


def test_diagonal_block_is_averaged_with_a_margin():
    blk = _block((2, 5, 5), 3, margin=0.5, seed=4, nonneg=True)
    alpha = blk.averagedness()
    assert abs(alpha - 0.5) < 1e-5
    x = torch.rand(2, 5, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: blk(z.unsqueeze(0)).squeeze(0), x).reshape(50, 50)
    n_jac = (jac - (1 - alpha) * torch.eye(50, dtype=torch.float64)) / alpha  # T = (1 - a) I + a N, N non-expansive
    assert float(torch.linalg.matrix_norm(n_jac, ord=2)) <= 1 + 1e-6


@pytest.mark.parametrize("broken", ["cross terms dropped", "halved"])
def test_broken_diagonal_scale_makes_the_jacobian_expansive(monkeypatch, broken):
    def bad(weight, q=None):
        return (weight * weight).sum((1, 2, 3)) if broken == "cross terms dropped" else diagonal_step_scale(weight, q) / 2

    monkeypatch.setattr(blocks_module, "diagonal_step_scale", bad)
    blk = _block((2, 5, 5), 3, seed=1, nonneg=True)
    x = torch.rand(2, 5, 5, dtype=torch.float64)  # nonnegative kernel and input: every coordinate active
    assert _jacobian_norm(blk, x) > 1.2


def test_diagonal_training_forward_is_the_evaluation_forward_and_trains_through_t():
    blk = _block((2, 5, 5), 3, seed=5)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    y_eval = blk(x)
    blk.train()
    y_train = blk(x)
    assert torch.allclose(y_train, y_eval, atol=1e-12, rtol=0)
    y_train.square().sum().backward()
    assert blk.weight.grad is not None and float(blk.weight.grad.abs().sum()) > 0


def test_diagonal_classifier_certificate_and_bad_arguments():
    cfg = ClassifierConfig(in_channels=1, image_size=8, num_classes=3, width=2, stages=1, blocks_per_stage=2, head="flatten",
                           block_step_scale="diagonal", schedule="fixed", steps=1)
    model = NonExpansiveClassifier(cfg).eval()
    assert lipschitz_bound(model).rigorous and float(lipschitz_bound(model)) <= 1 + 1e-5
    with pytest.raises(ValueError, match="step_scale"):
        NonExpansiveBlock((2, 4, 4), step_scale="sdp")
    with pytest.raises(ValueError, match="step_scale"):
        NonExpansiveBlock((2, 4, 4), step_scale="diagonal", weight_param="cayley")
    with pytest.raises(ValueError, match="q"):
        diagonal_step_scale(torch.randn(3, 2, 3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="weight"):
        diagonal_step_scale(torch.randn(3, 2, 3))
