"""Certified and empirical l2 robustness of classifiers.

Margin certificate. For logits ``z = f(x)`` with ``f`` ``L``-Lipschitz (l2), the margin
``m(x) = z_y - max_{j != y} z_j`` changes by at most ``sqrt(2) L |d|`` under a perturbation ``d``
(``z_y - z_j = <e_y - e_j, z>`` and ``|e_y - e_j| = sqrt(2)``). So the prediction is certified at
radius

    r(x) = m(x) / (sqrt(2) L)            (0 when misclassified),

and the certified accuracy at ``eps`` is the fraction with ``r(x) > eps``. Only a *rigorous*
Lipschitz bound may enter ``r``: :func:`certified_radii` takes a :class:`LipschitzBound` with
``rigorous=True`` (or computes ``lipschitz_bound(model)``) and refuses bare floats and estimates.

The package certificate :func:`certificate` lists, for a stable model: its rigorous Lipschitz bound
vs 1, the norm condition ``h nu <= 2 r c`` of every non-expansive block (``nu`` from the rigorous
``|A|``, ``h`` the evaluation step), the certified norm of every constrained layer vs its bound, and the
averagedness ``alpha < 1`` of averaged models.

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

from proxnets.certificates import Certificate
from proxnets.constraints import find_constraint
from proxnets.stable.lipschitz import LipschitzBound, lipschitz_bound
from proxnets.utils.validation import check_choice, check_int, check_labels, check_number, check_tensor, fail

__all__ = ["lipschitz_margin_loss", "margins", "certified_radii", "certified_accuracy", "pgd_l2", "robust_accuracy", "certificate", "rigorous_lipschitz"]


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per sample: ``(B, K), (B,) -> (B,)``."""
    check_tensor("logits", logits, ndim=2)
    check_labels("y", y, logits.shape[0], logits.shape[1])  # a length-1 vector is not broadcast over the batch
    if y.device != logits.device:
        fail("y", f"a tensor on {logits.device} (where the logits are)", f"a tensor on {y.device}")
    true = logits.gather(1, y[:, None]).squeeze(1)  # (B,)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)  # (B,)
    return true - other


def lipschitz_margin_loss(margin: float = 0.0, temperature: float = 1.0):
    """``loss_fn(model, x, y) = CE(tau (z - m e_y), y)``, ``z = model(x)``: cross-entropy of logits whose true class is
    handicapped by the margin ``m`` and scaled by the temperature ``tau`` (Lipschitz-margin training, Tsuzuku et al.
    2018). A 1-Lipschitz network certifies radius ``(z_y - max_j z_j) / sqrt(2)``; training past ``m`` aims at the
    radius ``m / sqrt(2)``. The temperature lets the small logits of a 1-Lipschitz net saturate the cross-entropy
    (``tau = 1``, ``m = 0``: plain cross-entropy)."""
    check_number("margin", margin, low=0.0)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model(x)  # (B, K)
        z = z - margin * F.one_hot(y, z.shape[1]).to(z.dtype)
        return F.cross_entropy(temperature * z, y)

    return loss_fn


def _batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def rigorous_lipschitz(model: nn.Module, lipschitz: LipschitzBound | None = None) -> LipschitzBound:
    """The Lipschitz constant a certificate may use: ``lipschitz`` if it is a rigorous
    :class:`LipschitzBound`, else ``lipschitz_bound(model)`` when ``None``; anything else raises."""
    L = lipschitz_bound(model) if lipschitz is None else lipschitz
    if not isinstance(L, LipschitzBound):
        raise TypeError(
            f"lipschitz: expected a rigorous LipschitzBound (e.g. lipschitz_bound(model)), got a bare {type(L).__name__} {L!r}: "
            "a number without a proof cannot certify a radius"
        )
    if not L.rigorous:
        raise ValueError(f"lipschitz: expected a rigorous Lipschitz bound, got one that is not ({L.why})")
    check_number("lipschitz", float(L), low=0.0, low_inclusive=False)
    return L


def certified_radii(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lipschitz: LipschitzBound | None = None, batch_size: int = 256
) -> torch.Tensor:
    """``r(x) = max(m, 0) / (sqrt(2) L)`` per sample; ``L`` a rigorous bound (``lipschitz_bound(model)`` unless given)."""
    check_tensor("x", x, ndim=4, nonempty=True, like=model)
    check_labels("y", y, x.shape[0])
    check_int("batch_size", batch_size, low=1)
    L = float(rigorous_lipschitz(model, lipschitz))
    m = margins(_batched_logits(model, x, batch_size), y)
    return m.clamp_min(0.0) / (math.sqrt(2.0) * L)


def certified_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radii: Sequence[float], *, lipschitz: LipschitzBound | None = None,
    batch_size: int = 256,
) -> dict[float, float]:
    """``{eps: fraction with r(x) > eps}`` (``eps = 0``: clean accuracy), with a rigorous ``L``."""
    check_tensor("x", x, ndim=4, nonempty=True)  # a fraction of no samples is NaN
    for eps in radii:
        check_number("radii", eps, low=0.0)
    r = certified_radii(model, x, y, lipschitz=lipschitz, batch_size=batch_size)
    # an exact fraction (count / n), as robust_accuracy returns: a float32 mean can exceed it by round-off
    return {float(eps): int((r > eps).sum()) / r.numel() for eps in radii}


def _input_shape_note(model: nn.Module, x: torch.Tensor | None) -> str:
    """Why the norms (computed at the model's configured size) do not cover inputs of ``x``'s size, or ''."""
    if x is None:
        return ""
    # blocks with norm_size="any" are certified with a bound valid at every image size
    shapes = {tuple(m.in_shape) for m in model.modules() if type(m).__name__ == "NonExpansiveBlock" and len(m.in_shape) == 3
              and getattr(m, "norm_size", "input") == "input"}
    size = tuple(x.shape[-2:])
    bad = sorted(s for s in shapes if s[1:] != size) if type(model).__name__ == "AveragedDenoiser" else []
    if bad:
        return f"the block norms are certified at {bad[0][1:]}, the input is {size}"
    return ""


def certificate(model: nn.Module, x: torch.Tensor | None = None, *, bound: float = 1.0) -> list[Certificate]:
    """The stable package's certificates for ``model`` (in evaluation mode), see the module docstring.

    ``x`` (optional): inputs the certificate is about; for a denoiser applied at another size than its
    norms were computed at, the Lipschitz and averagedness entries are marked not rigorous.
    """
    from proxnets.stable.blocks import NonExpansiveBlock

    was_training = model.training
    model.eval()
    certs: list[Certificate] = []
    try:
        size_note = _input_shape_note(model, x)
        try:
            L = lipschitz_bound(model)
        except TypeError as exc:  # an unconstrained baseline (e.g. DnCNN): no bound at all
            L = LipschitzBound(math.inf, False, "none", why=f"no Lipschitz bound: {exc}")
        rig, why = L.rigorous and not size_note, "; ".join(w for w in (L.why, size_note) if w)
        certs.append(Certificate("lipschitz", float(L), bound, "<=", rigorous=rig, method=L.method or "product of layer bounds",
                                 why=why, details={"model": type(model).__name__}))
        for name, m in model.named_modules():
            if isinstance(m, NonExpansiveBlock):
                c = m.norm_condition("rigorous")
                certs.append(Certificate(f"norm_condition[{name}]", c["h_nu"], c["step_bound"], "<=", rigorous=c["rigorous"],
                                         method=f"h L |A|^2 <= 2 r c, |A| by {c['method']}", why=c["why"],
                                         details={"n": c["n"], "h": c["h"], "sigma": c["sigma"], "sigma_used": c["sigma_used"]}))
            else:
                con = find_constraint(m) if hasattr(m, "parametrizations") else None
                if con is not None:
                    nb = con.certified_norm(m.parametrizations.weight.original)
                    certs.append(Certificate(f"operator_norm[{name}]", nb.value, con.bound, "<=", rigorous=nb.rigorous,
                                             method=nb.method, why=nb.why, details={"scale": nb.details.get("scale")}))
        if hasattr(model, "averagedness"):
            alpha = float(model.averagedness())
            certs.append(Certificate("averagedness", alpha, 1.0, "<", rigorous=rig, method="composed block constants (rigorous |A|)",
                                     why=why, details={}))
            if getattr(getattr(model, "config", None), "stiffness_budget", None) is not None:  # built to be firm: say if it is
                certs.append(Certificate("firmly_nonexpansive", alpha, 0.5, "<=", rigorous=rig,
                                         method="composed block constants (rigorous |A|), stiffness budget", why=why,
                                         details={"budget": model.config.stiffness_budget, "method": model.config.method}))
    finally:
        model.train(was_training)
    return certs


def _project(x0: torch.Tensor, x: torch.Tensor, eps: float, box: tuple[float, float] | None) -> torch.Tensor:
    d = (x - x0).flatten(1)  # (B, n)
    scale = (eps / d.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)  # (B,)
    x = x0 + (d * scale[:, None]).view_as(x0)
    return x.clamp(*box) if box is not None else x


PGD_LOSSES = ("ce", "margin", "alternate")


def _attack_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed per-sample objective to ascend: cross-entropy, or minus the logit margin ``max_{j != y} z_j - z_y``
    (Carlini-Wagner; it keeps a useful gradient where the cross-entropy saturates)."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    return -margins(logits, y).sum()


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
    loss: str = "ce",
) -> torch.Tensor:
    """Adversarial examples within ``|x' - x| <= eps`` (and the box): the clean input when it is
    already misclassified, else the first iterate (of any start) that fools, else the last start's end point.

    ``loss``: ``"ce"`` (cross-entropy), ``"margin"`` (the logit margin) or ``"alternate"`` (start ``r`` uses the
    cross-entropy for even ``r``, the margin for odd ``r``). A sample leaves the attack as soon as an iterate fools
    it (checked on the logits the gradient step computes anyway: no extra forward), so fooled samples cost nothing."""
    check_tensor("x", x, ndim=4, nonempty=True, like=model)
    check_labels("y", y, x.shape[0])
    check_number("eps", eps, low=0.0)
    check_int("steps", steps, low=1)
    check_int("restarts", restarts, low=1)
    check_choice("loss", loss, PGD_LOSSES)
    alpha = 2.5 * eps / steps if step_size is None else check_number("step_size", step_size, low=0.0, low_inclusive=False)
    best = x.detach().clone()
    with torch.no_grad():  # a misclassified clean input is already adversarial
        logits = model(best)
    check_labels("y", y, x.shape[0], logits.shape[1])
    fooled = logits.argmax(1) != y  # (B,)
    if eps == 0:
        return best
    for r in range(restarts):
        kind = loss if loss != "alternate" else ("ce" if r % 2 == 0 else "margin")
        delta = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if r > 0 else torch.zeros_like(x)
        delta = delta * (eps * 0.5 / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1) if r > 0 else delta
        idx = (~fooled).nonzero().flatten()  # the samples this start attacks
        if len(idx) == 0:
            break
        x0, y0 = x[idx], y[idx]
        xa = _project(x0, x0 + delta[idx], eps, box)
        for step in range(steps + 1):
            xa = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xa)
                now = (logits.argmax(1) != y0).detach()  # the iterate fools these
                if now.any():
                    best[idx[now]] = xa.detach()[now]
                    fooled[idx[now]] = True
                keep = ~now
                if not keep.any():
                    break
                if step == steps:  # the end points of this start, evaluated
                    best[idx[keep]] = xa.detach()[keep]
                    break
                (g,) = torch.autograd.grad(_attack_loss(logits[keep], y0[keep], kind), xa)
            idx, x0, y0, g = idx[keep], x0[keep], y0[keep], g[keep]
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            xa = _project(x0, xa.detach()[keep] + alpha * g, eps, box)
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
