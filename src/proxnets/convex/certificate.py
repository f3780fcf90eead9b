"""The convex package's optimization certificates (:class:`proxnets.certificates.Certificate`).

:func:`certificate` answers for three kinds of model:

- a fitted :class:`~proxnets.convex.CCNN` / :class:`~proxnets.convex.DCCNN` (or a solver's
  :class:`~proxnets.convex.primal.GapTrace`): the convex program's certificates.

  * ``relative_duality_gap``: ``(F(Theta) - D(P_s)) / |F(Theta)| <= tol`` for the solver's last
    pair: ``Theta`` is primal-feasible (the regularized problem has no constraint; the constrained
    one is kept in its ball by projection) and ``P_s`` is dual-feasible by construction
    (``|M(P_s)|_2 = s |M(P)|_2 <= lam``, ``|M|_2`` by an exact float64 SVD). By weak duality
    ``F(Theta) - F* <= F(Theta) - D(P_s)``: the value bounds the suboptimality of ``Theta``
    (rigorous up to floating-point rounding of the objectives). Given the training data
    ``(x, y)``, the pair is re-evaluated in float64 from the stored points instead of read
    from the trace, and a second certificate ``relative_duality_gap_model`` bounds the
    suboptimality of the model that ``predict`` uses (``theta_``: the recovered ``W H`` of DCCNN,
    the rank-truncated solution of CCNN) against the same dual bound.
  * ``weak_duality``: ``min_t F(Theta_t) - max_t D(P_t) >= 0`` over every iterate of the trace:
    every lower bound lies below every upper bound. A theorem, so a violation is a bug (an
    infeasible dual point reported as a bound); exact comparison of the recorded numbers.

- the ``convex-small-cnn`` baseline (:class:`~proxnets.convex.models.SmallCNN`, trained by
  back-propagation): ``lipschitz`` -- a rigorous upper bound of its l2 Lipschitz constant,

      Lip(f) <= |conv|_2 * |pool|_2 * |head|_2        (ReLU is 1-Lipschitz, biases do not count)

  with ``|conv|_2`` the exact largest singular value of the dense convolution operator at the
  input size (``sqrt(lambda_max(A^T A))`` in float64; the Fourier bound of :func:`proxnets.stable.norms.fourier_upper_bound`
  above ``max_dense`` input entries), ``|pool|_2 = 1 / k`` exactly for ``k x k`` average pooling
  with stride ``k`` (each output averages its own ``k^2`` inputs) and ``|head|_2`` by exact SVD.
  Compared with 1: the baseline is *not* certified by anything and is not expected to hold; the
  certificate says how far it is from being non-expansive.
"""

from __future__ import annotations

import math

import torch

from proxnets.certificates import Certificate
from proxnets.convex.duality import logistic_loss, regularized_dual_value, scores, scores_adjoint, spectral_norm
from proxnets.convex.models import SmallCNN
from proxnets.convex.primal import GapTrace, one_hot
from proxnets.utils.validation import check_number, fail

__all__ = ["certificate", "gap_certificates", "lipschitz_certificate"]


def _rel(gap: float, primal: float) -> float:
    return gap / max(abs(primal), 1e-300)


def gap_certificates(trace: GapTrace, tol: float = 1e-3) -> list[Certificate]:
    """``relative_duality_gap`` of the last iterate and ``weak_duality`` over all iterates of ``trace``."""
    check_number("tol", tol, low=0.0)
    if not trace.primal:
        fail("trace", "a GapTrace with at least one iterate", "an empty trace")
    f, d = trace.primal[-1], trace.dual[-1]
    details = {"primal": f, "dual": d, "gap": f - d, "iterations": trace.iterations, "converged": trace.converged}
    gap = Certificate("relative_duality_gap", _rel(f - d, f), float(tol), "<=", rigorous=True,
                      method="(F(Theta) - D(P_s)) / |F| from the solver's trace: primal iterate and dual iterate "
                             "shrunk to feasibility (exact float64 spectral norm)", details=details)
    slack = min(trace.primal) - max(trace.dual)
    weak = Certificate("weak_duality", slack, 0.0, ">=", rigorous=True,
                       method=f"min_t F(Theta_t) - max_t D(P_t) over {trace.iterations} iterates",
                       details={"min_gap_per_iterate": min(trace.residuals)})
    return [gap, weak]


def _problem_values(model, x, y) -> tuple[float, float, float, dict]:
    """``(F(solver point), D(feasible dual point), F(theta_), details)`` recomputed in float64 on ``(x, y)``."""
    from proxnets.convex.estimators import DCCNN

    xt = model._images(x, reset=False)
    yt = torch.as_tensor(model._label_index(y))
    lam = float(model.lam)
    if getattr(model, "radius", None) is not None:
        fail("model", "a regularized CCNN (lam; the constrained problem's recomputation is not implemented)", "radius set")
    if len(model.featurizers_) > 1:
        fail("model", "a one-layer model for the recomputed gap (pass x=None for the trace's)", f"{len(model.featurizers_)} layers")
    dccnn = isinstance(model, DCCNN)
    theta = (model.dual_.theta if dccnn else model.full_theta_).double()
    k = len(model.classes_)
    if dccnn and model.dual_.p.shape[0] != xt.shape[0]:
        fail("x", f"the {model.dual_.p.shape[0]} training images the dual was fitted on", f"{xt.shape[0]} images")
    n = xt.shape[0]
    loss = loss_model = 0.0
    m = torch.zeros_like(theta)
    feat = model.featurizers_[0]
    with torch.no_grad():
        for rows, z in feat.chunks(xt, model.chunk):
            z = z.double()
            u = scores(z, theta)
            yb = yt[rows]
            loss += float(logistic_loss(u, yb))
            loss_model += float(logistic_loss(scores(z, model.theta_.double()), yb))
            p = model.dual_.p[rows].double() if dccnn else torch.softmax(u, -1)
            m += scores_adjoint(z, one_hot(yb, k, torch.float64) - p)
    m /= n
    m_norm = spectral_norm(m)
    p_all = model.dual_.p.double() if dccnn else torch.softmax(
        torch.cat([scores(z.double(), theta) for _, z in feat.chunks(xt, model.chunk)]), -1)
    dual, s = regularized_dual_value(p_all, yt, m_norm, lam)
    nuc = float(torch.linalg.svdvals(theta).sum())
    nuc_model = float(torch.linalg.svdvals(model.theta_.double()).sum())
    f = loss / n + lam * nuc
    f_model = loss_model / n + lam * nuc_model
    return f, dual, f_model, {"primal": f, "dual": dual, "shrink": s, "dual_norm_after_shrink": s * m_norm, "lam": lam,
                              "primal_model": f_model, "n": n}


def certificate(model, x=None, y=None, *, tol: float = 1e-3, max_dense: int = 1024) -> list[Certificate]:
    """The certificates of ``model`` (see the module docstring).

    ``model``: a fitted CCNN / DCCNN, a :class:`GapTrace`, or a :class:`SmallCNN`. ``x`` (and
    ``y``): for the estimators, the training data to re-evaluate the gap on (``None``: read the
    solver's trace); for the CNN, a batch whose shape fixes the input size. ``tol``: the relative
    gap certified. ``max_dense``: largest input size (``C H W``) for the exact dense SVD.
    """
    from proxnets.convex.estimators import _ConvexCNN

    if isinstance(model, GapTrace):
        return gap_certificates(model, tol)
    if isinstance(model, SmallCNN):
        return [lipschitz_certificate(model, x, max_dense=max_dense)]
    if isinstance(model, _ConvexCNN):
        if not hasattr(model, "trace_"):
            fail("model", "a fitted CCNN or DCCNN (call fit first)", f"an unfitted {type(model).__name__}")
        certs = gap_certificates(model.trace_, tol)
        if getattr(model, "loss", "logistic") == "hinge":  # exact-kernel dual: one certified gap per binary problem
            for k, tr in enumerate(model.traces_):
                f, d = tr.primal[-1], tr.dual[-1]
                certs.append(Certificate(f"relative_duality_gap[{k}]", _rel(f - d, f), float(tol), "<=", rigorous=True,
                                         method="(primal - D(alpha / max(1, sqrt(lambda_max)))) / primal, exact float64 "
                                                "eigenvalue of the P x P matrix M(alpha) (proxnets.convex.hinge)",
                                         details={"primal": f, "dual": d, "recovered_primal": tr.recovered[-1]}))
            return certs
        if x is None:
            return certs
        if y is None:
            fail("y", "the training labels with x (the gap is a property of the training problem)", None)
        f, d, f_model, det = _problem_values(model, x, y)
        gap = Certificate("relative_duality_gap", _rel(f - d, f), float(tol), "<=", rigorous=True,
                          method="(F(Theta) - D(P_s)) / |F| recomputed in float64 on (x, y): solver's primal point, "
                                 "dual point shrunk to feasibility (exact spectral norm)", details=det)
        model_gap = Certificate("relative_duality_gap_model", _rel(f_model - d, f_model), float(tol), "<=", rigorous=True,
                                method="(F(theta_) - D(P_s)) / |F(theta_)|: the predicting model against the same dual bound",
                                details=det)
        return [gap, model_gap, certs[1]]
    fail("model", "a fitted CCNN / DCCNN, a GapTrace or a SmallCNN", type(model).__name__)


def lipschitz_certificate(model: SmallCNN, x: torch.Tensor | None = None, *, max_dense: int = 1024) -> Certificate:
    """Rigorous upper bound of the l2 Lipschitz constant of a :class:`SmallCNN`, compared with 1."""
    shape = tuple(int(s) for s in (x.shape[1:] if x is not None else model.input_shape))
    if shape != tuple(model.input_shape):
        fail("x", f"inputs of shape (N, {', '.join(map(str, model.input_shape))})", f"shape {tuple(x.shape)}")
    w = model.conv.weight.detach().double().cpu()
    size = math.prod(shape)
    if size <= max_dense:
        # dense operator, one column per input basis vector, built by one batched convolution
        cols = torch.nn.functional.conv2d(torch.eye(size, dtype=torch.float64).reshape(size, *shape), w).reshape(size, -1)
        conv = float(torch.linalg.eigvalsh(cols @ cols.T)[-1].clamp_min(0).sqrt())  # sigma_max^2 = lambda_max(A^T A)
        how = "exact eigenvalue of A^T A of the dense conv operator (float64)"
    else:
        from proxnets.stable.norms import fourier_upper_bound

        conv = float(fourier_upper_bound(w, shape))
        how = "Fourier bound of the conv operator (Sedghi et al. 2019)"
    k = model.pool.kernel_size if isinstance(model.pool.kernel_size, int) else model.pool.kernel_size[0]
    pool = 1.0 / k
    head = float(torch.linalg.svdvals(model.head.weight.detach().double().cpu())[0])
    value = conv * pool * head
    return Certificate("lipschitz", value, 1.0, "<=", rigorous=True,
                       method=f"product of layer norms: {how} x 1/k pooling x exact SVD of the head",
                       details={"conv": conv, "pool": pool, "head": head, "input_shape": list(shape),
                                "note": "back-propagation baseline: nothing constrains it, not expected to hold"})
