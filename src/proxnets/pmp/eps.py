"""Rules for the augmentation parameter ``eps`` of bSQH.

``eps`` is stored **per layer** (one value per parameter tensor, in the optimizer's state) and
both rules scale the whole vector by one factor. Why: the acceptance test
``J(u_new) - J(u_k) <= -eta tau`` is a single scalar test on the whole network, so a rejection
cannot be blamed on one layer; but the per-layer vector lets users start layers at different
``eps`` (e.g. larger for the classifier head), and those ratios are kept.

A rule is a pair of pure functions on the eps vector (optax style):
``accept(eps, trial) -> eps`` after an accepted trial, ``reject(eps, trial) -> eps`` after a
rejected one, with ``trial`` a :class:`TrialStep` describing the trial just evaluated.

Why the curvature rule works. Let ``Delta = u_new - u_k``, ``tau = |Delta|^2``,
``lin = <dL/du, Delta>``, ``dL = L(u_new) - L(u_k)`` and ``dR = rho (R(u_new) - R(u_k))`` (same
batch). The curvature of the loss along the step and the linearized Hamiltonian gain are

    kappa = 2 (dL - lin) / tau,        G = -lin - dR  (>= sum_l eps_l tau_l > 0, since Delta = 0 is
                                                       feasible for the maximization).

Scaling eps by ``f`` scales the gradient part of the step by ``1/f``: ``G -> G/f``,
``tau -> tau/f^2`` (exact for weights that are not thresholded). Under the quadratic model
``J(u_new) - J(u_k) = -G + (kappa/2) tau`` the test ``<= -eta tau`` then holds iff

    f >= f* = (kappa/2 + eta) tau / G.

The rule scales eps by ``safety * f*``, clipped to ``[shrink, grow]`` after an acceptance and to
``[sigma, max_grow]`` after a rejection (so it is never slower to recover than the plain rule).
Everything it needs was already computed for the acceptance test: no extra forward pass.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from proxnets.utils.validation import check_number

__all__ = ["TrialStep", "SigmaZetaEps", "CurvatureEps", "EPS_RULES", "make_eps_rule"]


@dataclasses.dataclass(frozen=True)
class TrialStep:
    """One evaluated trial of a bSQH iteration (all on the same batch).

    - ``tau``: ``(n,)`` tensor, ``|u_new_l - u_k_l|^2`` per layer.
    - ``lin``: ``<dL/du(u_k), u_new - u_k>`` (float).
    - ``d_loss``: ``L(u_new) - L(u_k)`` (float; ``nan``/``inf`` when the trial diverged).
    - ``d_reg``: ``rho (R(u_new) - R(u_k))`` (float).
    - ``eta``: the sufficient-decrease constant.
    - ``tau_total``: ``float(tau.sum())`` when the caller has it (the optimizer's acceptance test needs it
      first); ``None``: summed here. Read it as :attr:`total`.
    """

    tau: torch.Tensor
    lin: float
    d_loss: float
    d_reg: float
    eta: float
    tau_total: float | None = None

    @property
    def total(self) -> float:
        """``tau.sum()``: the whole step's ``|u_new - u_k|^2``."""
        return float(self.tau.sum()) if self.tau_total is None else self.tau_total

    @property
    def gain(self) -> float:
        """Linearized Hamiltonian gain ``G = -lin - d_reg``."""
        return -self.lin - self.d_reg

    @property
    def curvature(self) -> float:
        """``kappa = 2 (dL - lin) / tau`` (``nan`` when ``tau = 0`` or the loss is not finite)."""
        total = self.total
        if total <= 0.0 or not math.isfinite(self.d_loss):
            return math.nan
        return 2.0 * (self.d_loss - self.lin) / total


def _check_increase_and_floor(rule) -> None:
    """The fields both rules share: ``sigma > 1`` (least increase on rejection), ``eps_min > 0``."""
    check_number("sigma", rule.sigma, low=1.0, low_inclusive=False)
    check_number("eps_min", rule.eps_min, low=0.0, low_inclusive=False)


@dataclasses.dataclass(frozen=True)
class SigmaZetaEps:
    """The plain SQH rule: ``eps <- sigma eps`` on rejection, ``eps <- zeta eps`` on acceptance."""

    sigma: float = 1.1
    zeta: float = 0.9
    eps_min: float = 1e-8

    name = "sigma-zeta"

    def __post_init__(self) -> None:
        _check_increase_and_floor(self)
        check_number("zeta", self.zeta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)

    def accept(self, eps: torch.Tensor, trial: TrialStep) -> torch.Tensor:
        return torch.clamp(eps * self.zeta, min=self.eps_min)

    def reject(self, eps: torch.Tensor, trial: TrialStep) -> torch.Tensor:
        return eps * self.sigma


@dataclasses.dataclass(frozen=True)
class CurvatureEps:
    """eps from the curvature of the loss along the last trial step (see the module docstring).

    ``safety`` > 1 leaves room for the curvature to change from one step to the next; ``shrink``
    and ``grow`` bound the change after an acceptance, ``sigma`` and ``max_grow`` after a rejection.
    """

    safety: float = 1.5
    sigma: float = 1.1
    shrink: float = 0.5
    grow: float = 2.0
    max_grow: float = 100.0
    eps_min: float = 1e-8

    name = "curvature"

    def __post_init__(self) -> None:
        _check_increase_and_floor(self)
        check_number("safety", self.safety, low=0.0, low_inclusive=False)
        check_number("shrink", self.shrink, low=0.0, high=1.0, low_inclusive=False)
        check_number("grow", self.grow, low=1.0)
        check_number("max_grow", self.max_grow, low=self.sigma)

    def _factor(self, eps: torch.Tensor, trial: TrialStep) -> float:
        kappa, gain = trial.curvature, trial.gain
        if not math.isfinite(kappa) or not gain > 0.0:
            return math.nan
        return self.safety * (0.5 * kappa + trial.eta) * trial.total / gain

    def accept(self, eps: torch.Tensor, trial: TrialStep) -> torch.Tensor:
        f = self._factor(eps, trial)
        f = 1.0 if math.isnan(f) else min(max(f, self.shrink), self.grow)
        return torch.clamp(eps * f, min=self.eps_min)

    def reject(self, eps: torch.Tensor, trial: TrialStep) -> torch.Tensor:
        f = self._factor(eps, trial)
        f = self.max_grow if math.isnan(f) else min(max(f, self.sigma), self.max_grow)
        return eps * f


EPS_RULES = {"sigma-zeta": SigmaZetaEps, "curvature": CurvatureEps}


def make_eps_rule(rule: str | SigmaZetaEps | CurvatureEps, **kwargs):
    """A rule object from its name (``"sigma-zeta"`` or ``"curvature"``) and keyword options."""
    if isinstance(rule, str):
        if rule not in EPS_RULES:
            raise ValueError(f"eps_rule: expected one of {list(EPS_RULES)}, got {rule!r}")
        return EPS_RULES[rule](**kwargs)
    if not (hasattr(rule, "accept") and hasattr(rule, "reject")):
        raise TypeError(f"eps_rule: expected a name or an object with accept/reject, got {type(rule).__name__}")
    if kwargs:
        raise ValueError(f"eps_rule: options {sorted(kwargs)} given with a rule object; set them on the object")
    return rule
