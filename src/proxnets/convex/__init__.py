"""Convexified CNNs (CCNN) and their dual (DCCNN) with a duality gap and filter recovery (seed 001).

A two-layer CNN with ``r`` filters is relaxed to a nuclear-norm regularized (or constrained)
multinomial logistic regression over kernel features of image patches. :class:`CCNN` solves the
primal, :class:`DCCNN` the dual (never forming the feature tensor nor an ``n x n`` matrix); both
report the duality gap of every iterate and give ``r`` filters plus a linear head that export to
a torch CNN (:func:`to_torch`). The math and conventions: :mod:`proxnets.convex.duality`.

Modules: ``patches`` (patch extraction, contrast normalization, ZCA, pooling), ``kernels`` (RBF,
inverse polynomial, linear; chunked exact evaluation; random Fourier and Nystrom features),
``features`` (one layer's ``Z(x)``), ``sources`` (cached or streamed features), ``nuclear``
(nuclear-norm prox and projection), ``duality`` (objectives, dual, gap), ``primal`` / ``dual``
(solvers), ``recovery``, ``estimators``, ``export``, ``models`` (back-propagation baseline),
``certificate`` (:func:`certificate`: duality gap and weak duality of a fitted estimator, a
Lipschitz bound of the CNN baseline).
"""

from proxnets.convex.dual import DualResult, solve_dual
from proxnets.convex.estimators import CCNN, DCCNN
from proxnets.convex.certificate import certificate
from proxnets.convex.export import ConvexCNN, to_torch
from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.kernels import NystromFeatures, RandomFourierFeatures, kernel_matrix, kernel_matvec
from proxnets.convex.models import SmallCNN, small_cnn
from proxnets.convex.nuclear import nuclear_norm, project_l1_ball, project_nuclear_ball, singular_value_threshold
from proxnets.convex.primal import GapTrace, solve_primal
from proxnets.convex.recovery import Recovery, recover
from proxnets.convex.sources import CachedFeatures, StreamedFeatures

MODELS = {"convex-small-cnn": small_cnn}

__all__ = [
    "CCNN", "DCCNN", "certificate", "to_torch", "ConvexCNN", "PatchFeaturizer", "RandomFourierFeatures", "NystromFeatures",
    "kernel_matrix", "kernel_matvec", "nuclear_norm", "project_l1_ball", "project_nuclear_ball",
    "singular_value_threshold", "solve_primal", "solve_dual", "GapTrace", "DualResult", "recover", "Recovery",
    "CachedFeatures", "StreamedFeatures", "SmallCNN", "small_cnn", "MODELS",
]
