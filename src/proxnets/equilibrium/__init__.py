"""Optimization induced equilibrium networks (OptEq, seed 003); also importable as ``proxnets.opteq``.

An OptEq layer outputs the equilibrium ``z* = prox_f(W^T W z* + U x + b)``, which is the minimizer
of the explicit convex objective ``G(z; x) = sum f(z) + 1/2 |z|^2 - 1/2 |W z|^2 - <U x + b, z>``
when ``|W|_2 < 1``. The package provides

- proximal activations that know their convex ``f`` (:mod:`~proxnets.equilibrium.prox`; ``PROX_ACTIVATIONS``
  maps a name to a :class:`ProxActivation` class, the one meaning of that name in this package);
- the unit layer ``u -> W^T sigma(W u + b)``, its u- and h-form equilibria and the decomposition of a
  feed-forward ``nn.Sequential`` into unit layers (:mod:`~proxnets.equilibrium.unit`);
- deep OptEq as one joint equilibrium with one certificate (:mod:`~proxnets.equilibrium.deep`);
- fixed-point solvers with one interface returning ``(z, info)`` (:mod:`~proxnets.equilibrium.solvers`);
- implicit / phantom / unrolled backward passes (:mod:`~proxnets.equilibrium.implicit`);
- the ``|W|_2 <= target`` parametrization for dense and convolutional weights
  (:mod:`~proxnets.equilibrium.parametrize`);
- dense and convolutional OptEq layers with their objective and priors, and equilibrium selection at
  ``|W|_2 = 1`` through ``G + eps/2 |z - a(x)|^2`` (:mod:`~proxnets.equilibrium.layers`);
- an OptEq image classifier, the MON baseline, a DEQ on TorchDEQ's solver and an explicit CNN (:mod:`~proxnets.equilibrium.models`),
  and their certificates: :func:`certificate` (``certify_opteq``, ``certify_mon``, ``certify_cnn``),
  each a list of :class:`proxnets.certificates.Certificate`;
- the ``reproduce opteq`` suite (:mod:`~proxnets.equilibrium.experiments`).
"""

from proxnets.equilibrium.deep import DeepOptEq, DeepOptEqConv2d, SequentialOptEq, certify_equilibrium
from proxnets.equilibrium.implicit import BACKWARDS, BackwardConfig, equilibrium
from proxnets.equilibrium.layers import ANCHORS, OptEq, OptEqBase, OptEqConv2d
from proxnets.equilibrium.models import (
    MODELS,
    DEQClassifier,
    DEQConfig,
    ExplicitCNN,
    MONClassifier,
    MONConfig,
    MONConv2d,
    OptEqClassifier,
    OptEqConfig,
    certificate,
    certify_cnn,
    certify_mon,
    certify_opteq,
    convergence_logger,
    count_parameters,
    dense_matrix,
)
from proxnets.equilibrium.parametrize import OperatorNormBound, operator_norm_bound, refresh_operator_norm
from proxnets.equilibrium.prox import (
    PROX_ACTIVATIONS,
    BoxClamp,
    IdentityProx,
    IncreasingProx,
    LeakyReLUProx,
    ProxActivation,
    ReLUProx,
    SigmoidProx,
    SoftsignProx,
    SoftThreshold,
    TanhProx,
    UserProx,
    get_activation,
)
from proxnets.equilibrium.solvers import ADJOINT_SOLVERS, SOLVERS, EquilibriumInfo, get_solver, solve
from proxnets.equilibrium.unit import UnitChain, UnitLayer, UnitOptEq, decompose, prox_of_module

__all__ = [
    "PROX_ACTIVATIONS", "ProxActivation", "ReLUProx", "SoftThreshold", "BoxClamp", "IdentityProx", "UserProx",
    "get_activation", "LeakyReLUProx", "TanhProx", "SigmoidProx", "SoftsignProx", "IncreasingProx",
    "UnitLayer", "UnitChain", "UnitOptEq", "decompose", "prox_of_module",
    "DeepOptEq", "DeepOptEqConv2d", "SequentialOptEq", "certify_equilibrium",
    "SOLVERS", "ADJOINT_SOLVERS", "EquilibriumInfo", "get_solver", "solve",
    "BACKWARDS", "BackwardConfig", "equilibrium",
    "OperatorNormBound", "operator_norm_bound", "refresh_operator_norm",
    "OptEqBase", "OptEq", "OptEqConv2d", "ANCHORS",
    "OptEqConfig", "OptEqClassifier", "MONConfig", "MONConv2d", "MONClassifier", "ExplicitCNN", "DEQConfig", "DEQClassifier",
    "count_parameters",
    "certificate", "certify_opteq", "certify_mon", "certify_cnn", "dense_matrix",
    "convergence_logger",
    "MODELS",
]
