"""Capsule networks with dynamic routing read as convergent optimization (seed 000).

Dynamic routing (Sabour et al. 2017) is entropic mirror descent with step 1 on the concave energy
``E(C) = - sum_j g(|s_j(C)|)``, ``g(r) = r - arctan r``, over couplings ``C`` whose rows lie on the
simplex (Ye, Li & Shen 2025). The energy therefore never increases along routing and repeated
routing polarizes the couplings. Every routing call can report that certificate
(:class:`RoutingInfo`: energy, entropy, max coupling, change, muted parents per pass).

- :mod:`~proxnets.capsules.functional`: :func:`squash`, :func:`capsule_length` (safe at zero).
- :mod:`~proxnets.capsules.votes`: votes as the maps ``combine``/``agree`` (:class:`DenseVotes`,
  :class:`FactoredVotes` which never materializes ``(B, M, N, D)``).
- :mod:`~proxnets.capsules.routing`: :func:`dynamic_routing`, :func:`routing_energy`,
  :func:`energy_gradient`, :func:`coupling_entropy`.
- :mod:`~proxnets.capsules.layers`, :mod:`~proxnets.capsules.losses`, :mod:`~proxnets.capsules.capsnet`.
- :mod:`~proxnets.capsules.certify`: :func:`certificate` (the protocol's ``list[Certificate]``: feasible
  couplings, energy never increasing, decrease at least the symmetric KL, optionally the KKT gap of
  a long run), re-routing the model's votes in float64.

Beyond the seed, ``routing="regularized"`` (``b <- (1 - lambda tau) b + lambda a``: mirror descent on
``E + tau sum c log c``, strictly convex above :func:`convexity_threshold`: one fixed point, linear
convergence, no polarization). The reference CapsNet defaults to Sabour et al.'s official code
(gradient through every pass, per-parent bias, margin loss halved), each a switch of
:class:`CapsNetConfig`. ``CapsuleLinear(return_info=False)`` sits in ``nn.Sequential`` (info in
``last_info``); :func:`layer_certificate` certifies it.

``MODELS``: ``"capsnet"`` (the paper's model) and ``"capsnet-small"`` (CPU-sized), each
``(input_shape, num_classes, **config_overrides) -> Trainable``.
"""

from __future__ import annotations

from proxnets.capsules.capsnet import (
    CapsNet,
    CapsNetConfig,
    capsnet_loss,
    capsnet_scores,
    random_shift,
    reference_config,
    routing_certificate,
    small_config,
)
from proxnets.capsules.certify import certificate, energy_tolerance, layer_certificate, routing_certificates
from proxnets.capsules.functional import capsule_length, squash
from proxnets.capsules.layers import (
    COUPLING_MODES,
    CapsuleLength,
    CapsuleLinear,
    PrimaryCapsules,
    ReconstructionDecoder,
)
from proxnets.capsules.losses import margin_loss, reconstruction_loss
from proxnets.capsules.routing import (
    AUTO_TAU_FACTOR,
    BROKEN_VARIANTS,
    CURVATURE_BOUND,
    GRADIENT_MODES,
    ROUTING_MODES,
    convexity_threshold,
    RoutingInfo,
    coupling_entropy,
    dynamic_routing,
    energy_gradient,
    routing_energy,
)
from proxnets.capsules.votes import DenseVotes, FactoredVotes, Votes

__all__ = [
    "squash", "capsule_length",
    "Votes", "DenseVotes", "FactoredVotes",
    "GRADIENT_MODES", "ROUTING_MODES", "BROKEN_VARIANTS", "COUPLING_MODES", "RoutingInfo",
    "CURVATURE_BOUND", "AUTO_TAU_FACTOR", "convexity_threshold", "dynamic_routing", "routing_energy", "energy_gradient", "coupling_entropy",
    "PrimaryCapsules", "CapsuleLinear", "CapsuleLength", "ReconstructionDecoder", "margin_loss", "reconstruction_loss",
    "CapsNetConfig", "CapsNet", "reference_config", "small_config", "capsnet_loss", "capsnet_scores", "random_shift",
    "certificate", "layer_certificate", "routing_certificates", "energy_tolerance", "routing_certificate", "MODELS", "make_capsnet",
]


def _train_config(**overrides):
    from proxnets.engine import TrainConfig

    # The paper: Adam lr 1e-3, decay 0.96 every 2000 steps, batch 128.
    base = dict(epochs=10, batch_size=128, lr=1e-3, optimizer="adam", schedule="exp", step_size=2000, gamma=0.96)
    base.update(overrides)
    return TrainConfig(**base)


def make_capsnet(input_shape, num_classes, *, size: str = "reference", epochs: int | None = None, **overrides):
    """A :class:`~proxnets.engine.Trainable` CapsNet (``size``: ``"reference"`` or ``"small"``)."""
    from proxnets.engine import Trainable
    from proxnets.utils.validation import check_choice

    check_choice("size", size, ("reference", "small"))
    build = reference_config if size == "reference" else small_config
    model = CapsNet(build(input_shape, num_classes, **overrides))
    cfg = _train_config(**({} if epochs is None else {"epochs": epochs}))
    return Trainable(model=model, loss_fn=capsnet_loss, predict_fn=capsnet_scores, config=cfg, augment=random_shift,
                     certificate=certificate)


MODELS = {
    "capsnet": lambda input_shape, num_classes, **opts: make_capsnet(input_shape, num_classes, size="reference", **opts),
    "capsnet-small": lambda input_shape, num_classes, **opts: make_capsnet(input_shape, num_classes, size="small", **opts),
}
