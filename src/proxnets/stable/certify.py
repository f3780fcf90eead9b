"""Certified and empirical l2 robustness of classifiers.

Margin certificate. For logits ``z = f(x)`` with ``f`` ``L``-Lipschitz (l2), the margin
``m(x) = z_y - max_{j != y} z_j`` changes by at most ``sqrt(2) L |d|`` under a perturbation ``d``
(``z_y - z_j = <e_y - e_j, z>`` and ``|e_y - e_j| = sqrt(2)``). So the prediction is certified at
radius

    r(x) = m(x) / (sqrt(2) L)            (0 when misclassified),

and the certified accuracy at ``eps`` is the fraction with ``r(x) > eps``.

Empirical robustness. :func:`pgd_l2` is projected gradient ascent of the cross-entropy on the
l2 ball ``|d| <= eps`` intersected with the image box ``[0, 1]``: normalized-gradient steps,
projection by radial rescaling then clamping, random starts; the robust accuracy keeps a sample
only if no start fooled the model. A certified sample cannot be fooled, so
``certified accuracy <= PGD-robust accuracy`` at every radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.stable.lipschitz import lipschitz_bound
from proxnets.utils.validation import check_int, check_number, check_tensor

__all__ = ["margins", "certified_radii", "certified_accuracy", "pgd_l2", "robust_accuracy"]


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per sample: ``(B, K), (B,) -> (B,)``."""
    check_tensor("logits", logits, ndim=2)
    true = logits.gather(1, y[:, None]).squeeze(1)  # (B,)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)  # (B,)
    return true - other


def _batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def certified_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lipschitz: float | None = None, batch_size: int = 256) -> torch.Tensor:
    """``r(x) = max(m, 0) / (sqrt(2) L)`` per sample, ``L = lipschitz_bound(model)`` unless given."""
    check_tensor("x", x, ndim=4)
    L = lipschitz_bound(model, "exact") if lipschitz is None else check_number("lipschitz", lipschitz, low=0.0, low_inclusive=False)
    m = margins(_batched_logits(model, x, batch_size), y)
    return m.clamp_min(0.0) / (math.sqrt(2.0) * L)


def certified_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radii: Sequence[float], *, lipschitz: float | None = None, batch_size: int = 256
) -> dict[float, float]:
    """``{eps: fraction with r(x) > eps}`` (``eps = 0``: clean accuracy)."""
    r = certified_radii(model, x, y, lipschitz=lipschitz, batch_size=batch_size)
    return {float(eps): float((r > eps).float().mean()) for eps in radii}


def _project(x0: torch.Tensor, x: torch.Tensor, eps: float, box: tuple[float, float] | None) -> torch.Tensor:
    d = (x - x0).flatten(1)  # (B, n)
    scale = (eps / d.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)  # (B,)
    x = x0 + (d * scale[:, None]).view_as(x0)
    return x.clamp(*box) if box is not None else x


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    box: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial examples within ``|x' - x| <= eps`` (and the box): the clean input when it is
    already misclassified, else the first start that fools, else the last start's end point."""
    check_tensor("x", x, ndim=4)
    check_number("eps", eps, low=0.0)
    check_int("steps", steps, low=1)
    check_int("restarts", restarts, low=1)
    alpha = 2.5 * eps / steps if step_size is None else check_number("step_size", step_size, low=0.0, low_inclusive=False)
    best = x.detach().clone()
    with torch.no_grad():  # a misclassified clean input is already adversarial
        fooled = model(best).argmax(1) != y  # (B,)
    if eps == 0:
        return best
    for r in range(restarts):
        delta = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if r > 0 else torch.zeros_like(x)
        delta = delta * (eps * 0.5 / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1) if r > 0 else delta
        xa = _project(x, x + delta, eps, box)
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xa), y)
                (g,) = torch.autograd.grad(loss, xa)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            xa = _project(x, xa.detach() + alpha * g, eps, box)
        with torch.no_grad():
            now = model(xa).argmax(1) != y  # (B,)
        take = now & ~fooled
        best[take] = xa[take]
        best[~fooled & ~now] = xa[~fooled & ~now]
        fooled |= now
    return best


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, batch_size: int = 256, **pgd_options) -> float:
    """Accuracy on :func:`pgd_l2` examples at radius ``eps``."""
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        xa = pgd_l2(model, xb, yb, eps, **pgd_options)
        with torch.no_grad():
            correct += int((model(xa).argmax(1) == yb).sum())
    return correct / len(x)
