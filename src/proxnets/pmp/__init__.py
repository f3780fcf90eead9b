"""Training CNNs by the Pontryagin maximum principle: the bSQH optimizer with an L0 cost (seed 002).

A network ``x_{l+1} = Lambda_l(x_l, u_l)`` is a discrete control system; its weights ``u_l`` are
controls, back-propagation of minus the loss gradient is the adjoint sweep, and the batch
sequential quadratic Hamiltonian method (bSQH) updates every layer by maximizing the augmented
Hamiltonian ``H - eps |u - u_k|^2`` with the regularizer ``rho R`` (L0, optionally + L1 / L2),
accepting a step only if ``J(u_new) - J(u_k) <= -eta |u_new - u_k|^2``.

Parts (swappable): the Hamiltonian rule (:mod:`.hamiltonian`), the regularizer
(:mod:`.regularizers`), the eps rule (:mod:`.eps`); the optimizer (:mod:`.optimizer`); adjoints
(:mod:`.adjoints`); sparse-model tools (:mod:`.sparsity`); baselines (:mod:`.baselines`).
"""

from proxnets.pmp.adjoints import AdjointRecorder, control_layers
from proxnets.pmp.certify import DecreaseAudit, certificate, penalty
from proxnets.pmp.eps import EPS_RULES, CurvatureEps, SigmaZetaEps, TrialStep, make_eps_rule
from proxnets.pmp.hamiltonian import LinearizedHamiltonianRule, augmented_hamiltonian_1d
from proxnets.pmp.models import LeNet5, SmallLeNet5
from proxnets.pmp.optimizer import BSQH, BSQHInfo, EpsExplodedWarning
from proxnets.pmp.regularizers import Regularizer, SparseRegularizer, soft_threshold
from proxnets.pmp.sparsity import (
    SPARSIFIABLE,
    export_sparse,
    freeze_sparsity,
    mac_param_groups,
    remove_zero_filters,
    sparsity_param_groups,
    sparsity_report,
)

__all__ = [
    "AdjointRecorder",
    "BSQH",
    "BSQHInfo",
    "CurvatureEps",
    "DecreaseAudit",
    "EPS_RULES",
    "EpsExplodedWarning",
    "LeNet5",
    "LinearizedHamiltonianRule",
    "Regularizer",
    "SPARSIFIABLE",
    "SigmaZetaEps",
    "SmallLeNet5",
    "SparseRegularizer",
    "TrialStep",
    "augmented_hamiltonian_1d",
    "certificate",
    "control_layers",
    "export_sparse",
    "freeze_sparsity",
    "mac_param_groups",
    "make_eps_rule",
    "penalty",
    "remove_zero_filters",
    "soft_threshold",
    "sparsity_param_groups",
    "sparsity_report",
]

from proxnets.pmp.training import MODELS  # noqa: E402  (needs the engine; after the core imports)

__all__ += ["MODELS"]
