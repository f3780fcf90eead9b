"""The capped adaptive step rule (issue 19 item 6): past the cap ``h = 2 r / nu`` shrinks, so the block stays
1-Lipschitz however far training grows ``|A|``, and below the cap it is the seed's rule unchanged."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from proxnets.stable import ClassifierConfig, NonExpansiveBlock


def _jacobian_norm(block: NonExpansiveBlock, x: torch.Tensor) -> float:
    """Largest singular value of the block's Jacobian at ``x`` (float64, dense)."""
    jac = torch.autograd.functional.jacobian(lambda z: block(z[None])[0], x)  # (C, H, W, C, H, W)
    return float(torch.linalg.matrix_norm(jac.reshape(x.numel(), x.numel()), ord=2))


def _block(max_steps: int, grow: float, seed: int = 0) -> NonExpansiveBlock:
    torch.manual_seed(seed)
    block = NonExpansiveBlock((2, 5, 5), activation="relu", max_steps=max_steps, train_norm="bound").double()
    with torch.no_grad():
        block.weight.mul_(grow)  # what training does to |A|
    return block.eval()


@pytest.mark.parametrize("grow", [1.6, 2.0, 4.0])
def test_default_cap_keeps_the_condition_and_the_block_non_expansive(grow):
    cap = ClassifierConfig().max_steps
    block = _block(cap, grow)
    c = block.norm_condition("rigorous")
    assert c["rigorous"] and c["n"] <= cap  # the cost is bounded
    assert c["h_nu"] <= c["limit"] * (1 + 1e-6)  # h L S^2 <= 2 r with S a proved bound of |A|
    assert float(block.lipschitz_constant()) == 1.0
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the Jacobian of the trained step never stretches (ReLU: almost every point is smooth)
        x = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
        assert _jacobian_norm(block, x) <= 1 + 1e-9
    # the seed's uncapped rule takes ceil(T nu / 2 r) steps instead: the cost the cap removes
    seed_rule = _block(64, grow).norm_condition("rigorous")
    assert seed_rule["n"] >= math.ceil(seed_rule["sigma_used"] ** 2 / 2 - 1e-9) >= math.ceil(grow**2 / 2 * 0.99)


def test_a_step_past_the_capped_size_does_stretch():
    # the same block with h 1.6x the capped step (h nu = 3.2 > 2): the Jacobian test above would fail
    block = _block(1, 2.0)
    rule = block.schedule_steps

    def longer(sigma):
        n, h, nu = rule(sigma)
        return n, h * 1.6, nu

    block.schedule_steps = longer
    g = torch.Generator().manual_seed(1)
    worst = max(_jacobian_norm(block, torch.randn(2, 5, 5, generator=g, dtype=torch.float64)) for _ in range(3))
    assert worst > 1.05


@pytest.mark.parametrize("grow", [0.7, 1.0, 1.3])
def test_cap_is_the_seed_rule_until_it_acts(grow):
    # T nu / (2 r) <= 1: one step of h = T under both rules, the same map
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    capped, seed_rule = _block(1, grow), _block(64, grow)
    assert capped.norm_condition("rigorous")["n"] == seed_rule.norm_condition("rigorous")["n"] == 1
    with torch.no_grad():
        assert torch.equal(capped(x), seed_rule(x))


def test_classifier_config_default_cap_is_validated():
    with pytest.raises(ValueError, match="max_steps"):
        dataclasses.replace(ClassifierConfig(), max_steps=0).validate()
