"""DCCNN's kernel-only dual (hinge loss, seed 001) solved by cutting planes, and its recovery.

Binary labels ``y_i in {-1, +1}``, matrix kernel ``K_ij = K(x_i, x_j) (P x P)``
(:mod:`proxnets.convex.exact`), ``b = alpha * y``, ``M(alpha) = sum_ij b_i b_j K_ij``:

    primal   min_A  |A|_* + C sum_i max(0, 1 - y_i <Z_i, A>)          (A: R^P -> RKHS)
    dual     max_alpha  sum_i alpha_i   s.t.  lambda_max(M(alpha)) <= 1,  0 <= alpha_i <= C

(hinge = ``max_{0 <= a <= C} a (1 - t)``, and ``min_A |A|_* - <G, A>`` is 0 if ``|G|_2 <= 1`` else
``-inf``, ``G(alpha) = sum_i b_i Z_i^T``, ``|G|_2^2 = lambda_max(G^T G) = lambda_max(M(alpha))``.)

**Dual value of any alpha in the box** (weak duality at every iterate): ``M`` is quadratic in
``alpha``, so ``alpha / max(1, sqrt(lambda_max))`` is feasible (the box is kept by shrinking):
``D(alpha) = sum(alpha) / max(1, sqrt(mu_1))`` with ``mu_1`` the exact float64 top eigenvalue of
the ``P x P`` matrix ``M`` (``P`` is small: a dense ``eigh`` is exact where a Lanczos estimate would
be a lower estimate, and an under-estimated ``mu_1`` would overstate the bound).

**Solver: Kelley's cutting planes on the dual = column generation on the primal.**
``|G(alpha)|_2 = max_{|g| = |v| = 1} <G(alpha), g v^T>``: each unit pair gives a valid linear cut
``sum_i alpha_i y_i <Z_i, g v^T> <= 1``, and the deepest at ``alpha_t`` is ``v`` = a top eigenvector
of ``M(alpha_t)``, ``g = G v / sqrt(mu)`` (a kernel expansion over the support vectors), with
``<Z_i, g v^T> = v^T C_i v / sqrt(mu)``, ``C_i = sum_j b_j K_ij``. The master LP
``max sum alpha s.t. cuts, box`` (HiGHS) gives ``alpha_{t+1}``; its multipliers ``w_t >= 0`` are the
weights of the atoms ``g_t v_t^T`` in the primal point ``A_t = sum w_t g_t v_t^T``
(``|A_t|_* <= sum w_t``), so the master value is a primal upper bound. Kelley's method converges
on the compact box (every limit point optimal; no rate is claimed); every eigenvector with
``mu > 1`` is added as a cut, which is what makes it fast when the active eigenvalue is multiple.

**In-out with an exact segment search.** Each pass queries the LP point ``alpha_out``, the best
feasible point ``alpha_in`` and their midpoint; ``M`` is quadratic in ``alpha``, so these three
give ``M`` on the whole segment (:func:`_segment_search`), whose best dual point (``D`` is
quasi-concave on it: golden section) replaces ``alpha_in`` before pass 2; its top cluster lies on
the boundary ``mu_1 = 1`` and gives supporting-hyperplane cuts. Kelley's deepest cut at the LP
point is still added, and the extra cuts are valid: Kelley's convergence argument is unchanged,
and the incumbent only improves.

**Recovery (every iteration).** KKT: ``A* = G(alpha*) W*`` with ``W* >= 0`` supported on the
eigenspace of ``M(alpha*)`` at eigenvalue 1 (complementary slackness of ``lambda_max <= 1``).
Take the eigenvectors ``V (P, r0)`` with ``mu >= (1 - rtol) mu_1`` (``rtol = 0.05``: wide enough
that the eigenvalues of a cluster split by an unfinished solve stay together, and harmless when
too wide: the scale fit gives an unneeded direction zero weight) and the orthonormal RKHS
directions ``Gh = G V diag(mu)^{-1/2}``; then ``A = Gh S V^T`` has ``|A|_* = |S|_*`` and
``<Z_i, A> = tr(S R_i)``, ``R_i = V^T C_i V diag(mu)^{-1/2}`` (``r0 x r0``). The scales ``S`` solve
the small convex problem ``min tr S + C sum_i hinge(y_i tr(S R_i))`` over positive semi-definite
``S = sum_t w_t u_t u_t^T`` (``u`` the axes and their 45-degree pairwise rotations; one LP, see
:func:`fit_scales`).
``S = U diag(sigma) W^T``: filter ``k`` has position weights ``phi_k = V diag(mu)^{-1/2} U[:, k]``,
response ``h_k(x)[p] = (C(x) phi_k)[p] = sum_j b_j sum_q K(x, x_j)[p, q] phi_k[q]`` (the conv layer's
output as a kernel expansion over the support vectors) and head ``sigma_k V W[:, k]``; the number of
filters is the rank of ``S`` (singular values above ``1e-6 sigma_1``). Its primal value is exact
(``|S|_*`` by SVD), an upper bound of the optimum. The gap reported is min(recovered, master) - dual (both
are primal points); the recovered model's own value is kept beside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linprog

from proxnets.convex.exact import PatchKernel
from proxnets.convex.primal import GapTrace
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.utils.validation import check_int, check_number, fail

__all__ = ["HingeTrace", "BinaryDual", "solve_hinge_dual", "fit_scales", "ACTIVE_RTOL"]

ACTIVE_RTOL = 0.05  # eigenvalues within 5% of the top one are candidates for the active eigenspace
RECOVER_EVERY = 4  # passes between the recovery's scale LPs (and whenever the problem could stop)
BOUNDARY_RTOL = 1e-3  # a searched point with mu_1 >= 1 - this lies on the boundary: its supporting hyperplanes are cuts
FILTER_RTOL = 1e-6  # singular values of the scales S below this fraction of the largest are not filters


@dataclasses.dataclass
class HingeTrace(GapTrace):
    """:class:`GapTrace` of one binary problem: ``primal[t]`` = min(recovered model's primal value,
    master bound) (both primal points), ``recovered[t]`` the recovered model's value,
    ``dual[t]`` = ``D(alpha_t)`` (feasible by scaling), ``residuals[t]`` their gap, ``rank[t]`` the
    recovered filters; ``master[t]`` = the cutting-plane master's primal bound, ``cuts[t]`` the
    cuts so far, ``top_eigenvalue[t]`` = ``mu_1(M(alpha_t))``, ``relative[t]`` = gap / primal."""

    master: list[float] = dataclasses.field(default_factory=list)
    cuts: list[int] = dataclasses.field(default_factory=list)
    top_eigenvalue: list[float] = dataclasses.field(default_factory=list)
    relative: list[float] = dataclasses.field(default_factory=list)
    recovered: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BinaryDual:
    """Solution of one binary problem: ``alpha (n,)``, ``y (n,)`` in {-1, +1}, the recovered
    model ``phi (P, r)`` (position weights of the filters' kernel expansion) and ``head (r, P)``,
    the eigenvalues ``mu`` of ``M(alpha)`` (descending), ``train_scores`` of the recovered model
    and ``master_scores`` of the solver's primal point on the training set."""

    alpha: torch.Tensor
    y: torch.Tensor
    phi: torch.Tensor
    head: torch.Tensor
    mu: torch.Tensor
    train_scores: torch.Tensor
    master_scores: torch.Tensor

    @property
    def weights(self) -> torch.Tensor:
        return self.alpha * self.y  # b


def _segment_search(m_in: torch.Tensor, m_mid: torch.Tensor, m_out: torch.Tensor, s_in: torch.Tensor,
                    s_out: torch.Tensor, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Best dual point on each segment ``alpha(t) = (1 - t) alpha_in + t alpha_out``, ``t in [0, 1]``.

    ``M`` is quadratic in ``alpha``, so its values at ``t = 0, 1/2, 1`` (``m_in, m_mid, m_out (m, P, P)``)
    give it on the whole segment by Lagrange interpolation,
    ``M(t) = 2 (t - 1/2)(t - 1) M_in - 4 t (t - 1) M_mid + 2 t (t - 1/2) M_out``.
    ``D(t) = l(t) / max(1, sqrt(mu_1(M(t))))`` with ``l(t) = (1 - t) s_in + t s_out`` (``s`` the sums of alpha)
    is quasi-concave (its superlevel sets ``{l >= c} cap {l >= c sqrt(mu_1)}`` are intervals, as
    ``sqrt(mu_1(M(t))) = |G(alpha(t))|_2`` is convex in ``t``), so golden-section search finds its maximum;
    the endpoints are compared too. Returns ``t (m,)`` and ``M(t) (m, P, P)``.
    """

    def mat(t: torch.Tensor) -> torch.Tensor:
        t = t[:, None, None]
        return 2 * (t - 0.5) * (t - 1) * m_in - 4 * t * (t - 1) * m_mid + 2 * t * (t - 0.5) * m_out

    def value(t: torch.Tensor) -> torch.Tensor:
        top = torch.linalg.eigvalsh(mat(t))[:, -1].clamp_min(0.0)
        return ((1 - t) * s_in + t * s_out) / top.sqrt().clamp_min(1.0)

    g = (math.sqrt(5) - 1) / 2
    lo, hi = torch.zeros_like(s_in), torch.ones_like(s_in)
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = value(x1), value(x2)
    for _ in range(iters):  # the bracket shrinks by g per step: 0.618^20 ~ 7e-5 (D moves by <~1e-5 of its value)
        left = f1 >= f2  # the maximum lies in [lo, x2]
        hi, lo = torch.where(left, x2, hi), torch.where(left, lo, x1)
        x2n, x1n = torch.where(left, x1, lo + g * (hi - lo)), torch.where(left, hi - g * (hi - lo), x2)
        fn = value(torch.where(left, x1n, x2n))
        f2, f1 = torch.where(left, f1, fn), torch.where(left, fn, f2)
        x1, x2 = x1n, x2n
    cands = torch.stack([torch.zeros_like(lo), (lo + hi) / 2, torch.ones_like(lo)])  # (3, m)
    vals = torch.stack([value(c) for c in cands])
    t = cands.gather(0, vals.argmax(0, keepdim=True))[0]
    return t, mat(t)


def _lp(cuts: list[np.ndarray], c: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``max sum a s.t. cuts @ a <= 1, 0 <= a <= c``: ``(a, w)``, ``w >= 0`` the cuts' multipliers."""
    if not cuts:
        return np.full(n, c), np.zeros(0)
    res = linprog(-np.ones(n), A_ub=np.stack(cuts), b_ub=np.ones(len(cuts)), bounds=(0.0, c), method="highs")
    if res.status != 0:
        raise RuntimeError(f"DCCNN master LP failed: {res.message}")
    return np.clip(res.x, 0.0, c), np.clip(-res.ineqlin.marginals, 0.0, None)


try:  # scipy's own HiGHS binding (the one linprog uses) keeps a model between solves: rows added, basis kept
    from scipy.optimize._highspy import _core as _highs_core
except ImportError:  # pragma: no cover - another scipy layout: every solve starts from scratch (same optimum)
    _highs_core = None
# a private module: use it only if it has every name the warm start calls (else the linprog path)
_HIGHS_NAMES = ("_Highs", "HighsLp", "MatrixFormat", "HighsBasisStatus", "HighsModelStatus", "kHighsInf")
if _highs_core is not None and not all(hasattr(_highs_core, name) for name in _HIGHS_NAMES):  # pragma: no cover
    _highs_core = None


class _LPHost:
    """One HiGHS instance shared by the binary problems of a solve (each instance holds ~0.7 MiB of
    work space after its first solve, measured: one per problem would add ~7 MiB for 10 classes)."""

    def __init__(self):
        self.h = None
        self.owner = None
        if _highs_core is not None:
            self.h = _highs_core._Highs()
            self.h.setOptionValue("output_flag", False)


class _MasterLP:
    """The cutting-plane master ``max sum a s.t. cuts @ a <= 1, 0 <= a <= c`` of one binary problem,
    warm-started between passes: HiGHS's dual simplex restarts from the problem's previous optimal
    basis with the new cuts' slacks basic (still dual feasible after adding rows), so a pass costs a
    few simplex iterations instead of a solve from scratch (profile, quick variant fits: the scratch
    solves were ~45% of the fit). The problems of a solve share one HiGHS instance (``host``): while
    the same problem solves again its rows are appended in place, otherwise its model is passed
    again with its stored basis. The optimum is the same LP's, so Kelley's argument is unchanged;
    soundness never rests on it: any multipliers ``w >= 0`` make a primal point (the master bound is
    recomputed from them). Without the binding (other scipy layouts) each solve is ``linprog``."""

    def __init__(self, n: int, c: float, host: _LPHost | None = None):
        self.n, self.c = n, c
        self._blocks: list[np.ndarray] = []  # the cuts of each pass (no spare capacity: rows are n long)
        self._count = 0
        self._host = host if host is not None else _LPHost()
        self._synced = 0  # rows the host's model holds when this problem owns it
        self._basis = None

    def __len__(self) -> int:
        return self._count

    @property
    def rows(self) -> np.ndarray:
        """The cuts so far ``(len, n)`` (a copy)."""
        return np.concatenate(self._blocks) if self._blocks else np.zeros((0, self.n))

    def margins(self, w: np.ndarray) -> np.ndarray:
        """``rows[:len(w)]^T w`` without stacking the cuts."""
        out, start = np.zeros(self.n), 0
        for block in self._blocks:
            if start >= w.size:
                break
            part = w[start : start + block.shape[0]]
            out += block[: part.size].T @ part
            start += block.shape[0]
        return out

    def _tail(self, k: int) -> np.ndarray:
        """The last ``k`` cuts ``(k, n)`` (contiguous)."""
        parts, got = [], 0
        for block in reversed(self._blocks):
            if got >= k:
                break
            parts.append(block[max(0, block.shape[0] - (k - got)) :])
            got += parts[-1].shape[0]
        return np.ascontiguousarray(np.concatenate(parts[::-1]))

    def add(self, rows: list[np.ndarray]) -> None:
        if not rows:
            return
        self._blocks.append(np.stack(rows))
        self._count += len(rows)

    def _load(self, h) -> None:
        """Pass this problem's whole LP to the host, with its last basis (new rows' slacks basic)."""
        hc, n, m = _highs_core, self.n, self._count
        lp = hc.HighsLp()
        lp.num_col_, lp.num_row_ = n, m
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = -np.ones(n), np.zeros(n), np.full(n, self.c)
        lp.row_lower_, lp.row_upper_ = np.full(m, -hc.kHighsInf), np.ones(m)
        lp.a_matrix_.format_ = hc.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, m
        lp.a_matrix_.start_ = np.arange(0, m * n + 1, n, dtype=np.int32)
        lp.a_matrix_.index_ = np.tile(np.arange(n, dtype=np.int32), m)
        lp.a_matrix_.value_ = np.ascontiguousarray(self.rows).ravel()
        h.passModel(lp)
        if self._basis is not None:
            basis = self._basis
            basis.row_status = list(basis.row_status) + [hc.HighsBasisStatus.kBasic] * (m - len(basis.row_status))
            h.setBasis(basis)

    def solve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, w)``: the master's optimal point and the cuts' multipliers ``w >= 0``."""
        if not self._count:
            return np.full(self.n, self.c), np.zeros(0)
        h = self._host.h
        if h is None:
            return _lp(list(self.rows), self.c, self.n)
        if self._host.owner is not self:
            self._load(h)
            self._host.owner = self
        elif self._count > self._synced:  # the host holds this problem: append the new rows in place
            k, n = self._count - self._synced, self.n
            h.addRows(k, np.full(k, -_highs_core.kHighsInf), np.ones(k), k * n,
                      np.arange(0, k * n, n, dtype=np.int32), np.tile(np.arange(n, dtype=np.int32), k),
                      self._tail(k).ravel())
        self._synced = self._count
        h.run()
        status = h.getModelStatus()
        if status != _highs_core.HighsModelStatus.kOptimal:
            h.clearSolver()  # a warm start gone wrong: once more from scratch
            h.run()
            status = h.getModelStatus()
            if status != _highs_core.HighsModelStatus.kOptimal:
                raise RuntimeError(f"DCCNN master LP failed: {h.modelStatusToString(status)}")
        self._basis = h.getBasis()
        sol = h.getSolution()
        return (np.clip(np.asarray(sol.col_value), 0.0, self.c),
                np.clip(-np.asarray(sol.row_dual), 0.0, None))


def _unpack_sym(tri: torch.Tensor, r: int) -> torch.Tensor:
    """``(n, r (r + 1) / 2)`` upper triangles (``torch.triu_indices`` order) -> symmetric ``(n, r, r)``."""
    i, j = torch.triu_indices(r, r, device=tri.device)
    out = tri.new_zeros(tri.shape[0], r, r)
    out[:, i, j] = tri
    out[:, j, i] = tri
    return out


def _hinge_sum(margins: torch.Tensor) -> float:
    return float((1.0 - margins).clamp_min(0).sum())


def fit_scales(r: torch.Tensor, y: torch.Tensor, c: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``min_S tr S + c sum_i hinge(y_i tr(S R_i))`` over ``S = sum_t w_t u_t u_t^T``, ``w >= 0``, for
    ``R (n, r0, r0)``: one LP (HiGHS) over the atoms ``u`` in ``{e_l, (e_l +- e_m) / sqrt 2}``.

    ``S`` is positive semi-definite (KKT: ``A* = G W*``, ``W* >= 0``) with ``|S|_* = tr S = sum w``;
    the atoms cover the axes of the eigenbasis and their pairwise rotations by 45 degrees.
    Returns ``(S (r0, r0), primal value (exact for that S), scores tr(S R_i) (n,))``.
    """
    n, r0 = r.shape[0], r.shape[1]
    eye = torch.eye(r0, dtype=r.dtype, device=r.device)
    atoms = [eye[l] for l in range(r0)]
    for l in range(r0):
        for m in range(l + 1, r0):
            atoms += [(eye[l] + eye[m]) / math.sqrt(2), (eye[l] - eye[m]) / math.sqrt(2)]
    u = torch.stack(atoms)  # (T, r0)
    vals = torch.einsum("tm,iml,tl->ti", u, r, u)  # tr(u u^T R_i) = u^T R_i u
    _, w = _lp(list((y[None] * vals).cpu().numpy()), c, n)
    wt = torch.from_numpy(w).to(r)
    smat = torch.einsum("t,tl,tm->lm", wt, u, u)
    scores = wt @ vals
    primal = float(wt.sum()) + c * _hinge_sum(y * scores)
    return smat, primal, scores


def solve_hinge_dual(
    kern: PatchKernel,
    y: torch.Tensor,
    c: float,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    max_cuts_per_iter: int = 8,
    on_nonconvergence: str = "warn",
    callback: Callable[[int, list[HingeTrace]], None] | None = None,
    scale_dual: bool = True,
    bottom_eigenvectors: bool = False,
    all_eigenvectors: bool = False,
    dense_kernel: bool = False,
    line_search: bool = True,
) -> tuple[list[BinaryDual], list[HingeTrace]]:
    """Solve ``m`` binary DCCNN duals in lockstep (one kernel pass per iteration serves them all).

    ``y (m, n)`` in {-1, +1} (row ``k``: one-vs-rest labels of class ``k``); ``c`` the box (> 0);
    stops each problem when its relative gap ``(primal - dual) / primal <= tol``.
    ``scale_dual``, ``bottom_eigenvectors`` and ``all_eigenvectors`` exist for the deliberately broken
    variants of the convex suite only: ``scale_dual=False`` records ``sum(alpha)`` of the (infeasible)
    master point, not a lower bound; ``bottom_eigenvectors=True`` recovers from the eigenvectors of the
    smallest eigenvalues;
    ``all_eigenvectors=True`` keeps every eigenvector as a filter with unit scales (no active
    eigenspace, no scale fit); ``dense_kernel=True`` materializes the full ``(n P) x (n P)`` kernel
    first (same iterates, memory ``n^2 P^2``). The estimator passes them as ``solver_options``.
    """
    c = check_number("C", c, low=0.0, low_inclusive=False)
    check_int("max_iter", max_iter, low=1)
    check_number("tol", tol, low=0.0)
    if y.ndim == 1:
        y = y[None]
    vals = torch.unique(y)
    if not bool(((vals == 1) | (vals == -1)).all()):
        fail("y", "binary labels in {-1, +1} (one row per binary problem)", f"values {vals.tolist()}")
    m, n = y.shape
    if n != kern.n:
        fail("y", f"{kern.n} labels per problem (one per training image)", f"{n}")
    dtype, dev = kern.dtype, kern.train_images.device
    y = y.to(dtype=dtype, device=dev)
    traces = [HingeTrace() for _ in range(m)]
    if dense_kernel:
        kern.materialize()
    host = _LPHost()
    cuts = [_MasterLP(n, c, host) for _ in range(m)]
    a_out = [torch.full((n,), c, dtype=dtype, device=dev) for _ in range(m)]  # master LP point (outside)
    a_in = [torch.zeros(n, dtype=dtype, device=dev) for _ in range(m)]  # best feasible point (inside)
    best = [0.0] * m
    last_rec = [math.inf] * m  # the last recovered model's primal value (a valid bound until replaced)
    ws: list[np.ndarray] = [np.zeros(0) for _ in range(m)]
    results: list[BinaryDual | None] = [None] * m
    active = list(range(m))
    n_query = 3  # query points per problem and pass: out, (out + in) / 2 (in-out stabilization), in
    for it in range(max_iter):
        queries = []
        for k in active:
            queries += [a_out[k], 0.5 * (a_out[k] + a_in[k]), a_in[k]]
        bw = torch.stack(queries) * y[active].repeat_interleave(n_query, 0)  # (q, n) weights b = alpha y
        support = torch.nonzero((bw != 0).any(0)).flatten()
        # pass 1: M(alpha) over support x support (symmetric: half the block pairs)
        mmat = kern.quadratic(bw, support)  # (q, P, P)
        if not bool(torch.isfinite(mmat).all()):
            raise FloatingPointError("DCCNN dual: non-finite entry of M(alpha)")
        if line_search:
            # the "in" row becomes the best point of the segment [in, out] (M is quadratic in alpha:
            # its three rows give M on the whole segment); pass 2 then evaluates C_i at that point
            rows_in, rows_mid, rows_out = (torch.arange(len(active), device=dev) * n_query + o for o in (2, 1, 0))
            t_best, m_best = _segment_search(mmat[rows_in], mmat[rows_mid], mmat[rows_out],
                                             torch.stack([a_in[k].sum() for k in active]),
                                             torch.stack([a_out[k].sum() for k in active]))
            for a, k in enumerate(active):
                t = float(t_best[a])
                bw[rows_in[a]] = ((1 - t) * a_in[k] + t * a_out[k]) * y[k]
            mmat[rows_in] = m_best
        mu, vecs = torch.linalg.eigh(mmat)  # exact: P is small (see the module docstring on soundness)
        mu, vecs = mu.flip(-1), vecs.flip(-1)  # descending
        if not bool(torch.isfinite(mu).all()):
            raise FloatingPointError("DCCNN dual: non-finite eigenvalue of M(alpha)")
        # candidate directions: the active cluster and every violated eigenvector (at most max_cuts_per_iter)
        cand = (mu >= (1 - ACTIVE_RTOL) * mu[:, :1]) | (mu > mu[:, :1].clamp_max(1.0))
        # cuts: every violated eigenvector (mu > 1); at the searched point, which lies on (or near)
        # the boundary mu_1 = 1, the supporting hyperplanes of its top cluster (in-out separation)
        cut_floor = torch.ones(len(queries), dtype=dtype, device=dev)
        if line_search:
            near = mu[rows_in, 0] >= 1.0 - BOUNDARY_RTOL
            cut_floor[rows_in] = torch.where(near, (1 - ACTIVE_RTOL) * mu[rows_in, 0], torch.full_like(near, math.inf, dtype=dtype))
        r_sel = [max(1, min(max_cuts_per_iter, int(cand[q].sum()))) for q in range(len(queries))]
        r_cut = max(r_sel)
        vsel, mu_sel = vecs[:, :, :r_cut], mu[:, :r_cut]
        # the inside point of each problem (known from mu alone): its row is the one recovered from
        q_ins, vals_q = [], []
        for a, k in enumerate(active):
            q_in, b_k = n_query * a + 2, best[k]
            for q in range(n_query * a, n_query * (a + 1)):  # every query point gives a feasible dual point by scaling
                val = float(bw[q].abs().sum()) / max(1.0, math.sqrt(max(float(mu[q, 0]), 0.0)))
                if val > b_k:
                    b_k, q_in = val, q
            q_ins.append(q_in)
            vals_q.append(b_k)
        rec_rows = torch.tensor(q_ins, device=dev)
        r_rec = kern.n_positions if all_eigenvectors else max(r_sel[q] for q in q_ins)  # (broken variant: every eigenvector)
        v_all = vecs.flip(-1) if bottom_eigenvectors else vecs  # (broken variant: the bottom of the spectrum, order mistaken)
        mu_all = mu.flip(-1) if bottom_eigenvectors else mu
        v_rec, mu_rec = v_all[rec_rows, :, :r_rec], mu_all[rec_rows, :r_rec]

        # the recovery reads R_i = V^T C_i V diag(mu)^{-1/2} only through tr(S R_i) with S symmetric, i.e.
        # through its symmetric part (C_i itself is not symmetric): that part's upper triangle is kept,
        # r (r + 1) / 2 numbers per image instead of r^2 (44% less at r = 8)
        d_rec = mu_rec.clamp_min(1e-300).rsqrt()  # (m, r_rec)
        tri = torch.triu_indices(r_rec, r_rec, device=dev)

        def reduce(acc: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            # cuts need v_l^T C_i v_l only; the recovery needs sym(R_i) of one row per problem
            cut = torch.einsum("mipq,mpl,mql->mil", acc, vsel, vsel)  # (q, b, r_cut)
            rec = torch.einsum("mpl,mipq,mqr->milr", v_rec, acc[rec_rows], v_rec) * d_rec[:, None, None, :]
            rec = rec + rec.transpose(2, 3)  # 2 sym(R_i)
            return cut, rec[:, :, tri[0], tri[1]].mul_(0.5)  # (m, b, r_rec (r_rec + 1) / 2)

        # pass 2: rows = every training image (the cuts are LP rows over all alpha), columns = the support;
        # C_i is never held: memory q n r_cut + m n r_rec^2
        vcv_diag, rec_tri = kern.contract(bw, support=support, reduce=reduce)
        still = []
        for a, k in enumerate(active):
            tr = traces[k]
            qs = range(n_query * a, n_query * (a + 1))
            q_in = q_ins[a]
            if vals_q[a] > best[k]:
                best[k] = vals_q[a]
                a_in[k] = bw[q_in].abs() / max(1.0, math.sqrt(max(float(mu[q_in, 0]), 0.0)))
            dual = best[k] if scale_dual else float(a_out[k].sum())
            # master primal point A_t = sum_t w_t g_t v_t^T (its values at x_i are stored with the cuts)
            if ws[k].size:
                marg = torch.from_numpy(cuts[k].margins(ws[k])).to(y)  # y_i <Z_i, A_t>
                master, master_scores = float(ws[k].sum()) + c * _hinge_sum(marg), marg * y[k]
            else:
                master, master_scores = c * n, torch.zeros(n, dtype=dtype, device=dev)  # A = 0
            # the recovery's scale LP runs every RECOVER_EVERY passes, at the last pass, and whenever the
            # master bound alone (or with the last recovered value) would stop: the problem never stops
            # on a stale value, and in between the last recovered model's value stays a valid primal bound
            stale = min(master, last_rec[k])
            due = (it % RECOVER_EVERY == 0 or it == max_iter - 1 or all_eigenvectors or not scale_dual
                   or stale - dual <= tol * abs(stale))
            if not due:
                primal, rank, stop_tol = stale, tr.rank[-1], -1.0  # tol -1: never "converged" on a stale recovery
            else:
                # recovery from the inside point's candidate eigenspace (its query row; the recovery is
                # invariant to the scaling that made it feasible: C ~ s, mu ~ s^2, R and phi C ~ 1)
                r0 = r_rec if all_eigenvectors else r_sel[q_in]
                v, pos = v_rec[a, :, :r0], mu_rec[a, :r0].clamp_min(1e-300)
                rmat = _unpack_sym(rec_tri[a], r_rec)[:, :r0, :r0]  # sym(R_i), R_i[m, l] = v_m^T C_i v_l / sqrt(mu_l)
                if all_eigenvectors and float(mu[q_in, 0]) > 0:  # broken variant: S = I, every eigenvector a filter
                    smat = torch.eye(r0, dtype=dtype, device=dev)
                    rec_scores = torch.einsum("ill->i", rmat)
                    rec_primal = float(r0) + c * _hinge_sum(y[k] * rec_scores)
                elif float(mu[q_in, 0]) > 0:
                    smat, rec_primal, rec_scores = fit_scales(rmat, y[k], c)
                else:  # alpha_in = 0 (first pass): the recovered model is A = 0
                    smat, rec_primal, rec_scores = torch.zeros(r0, r0, dtype=dtype, device=dev), c * n, torch.zeros(n, dtype=dtype, device=dev)
                u_s, sig, wh = torch.linalg.svd(smat)
                rank = max(1, int((sig > FILTER_RTOL * sig[0].clamp_min(1e-300)).sum()))
                # position weights of the kernel expansion for the stored (scaled) alpha_in = |b_q| / sqrt(max(1, mu_1)):
                # C(x) of alpha_in is C_q(x) / sqrt(max(1, mu_1)), so phi carries that factor back
                phi = (v / pos.sqrt() * math.sqrt(max(1.0, float(mu[q_in, 0])))) @ u_s[:, :rank]  # (P, rank)
                head = sig[:rank, None] * (v @ wh[:rank].T).T  # (rank, P)
                last_rec[k] = rec_primal
                primal = min(rec_primal, master)  # both are primal points: the better bound certifies
                stop_tol = tol * abs(primal)
                results[k] = BinaryDual(a_in[k].clone(), y[k].clone(), phi, head, mu[q_in].clone(), rec_scores, master_scores)
            tr.master.append(master)
            tr.cuts.append(len(cuts[k]))
            tr.top_eigenvalue.append(float(mu[q_in, 0]))
            tr.recovered.append(last_rec[k])
            tr.record(primal, dual, rank, stop_tol)
            tr.relative.append((primal - dual) / max(abs(primal), 1e-300))
            if tr.converged or (not scale_dual and abs(primal - dual) <= tol * abs(primal)):  # (the broken variant stops too)
                continue
            new_cuts = []
            for q in qs:  # cuts: every violated direction, value v^T C_i v / sqrt(v^T M v) times y_i
                for l in range(r_sel[q]):
                    if float(mu_sel[q, l]) > 1.0 or (float(mu_sel[q, l]) >= float(cut_floor[q]) and float(mu_sel[q, l]) > 0):
                        new_cuts.append((y[k] * vcv_diag[q, :, l] / math.sqrt(float(mu_sel[q, l]))).cpu().numpy())
            cuts[k].add(new_cuts)
            a_new, ws[k] = cuts[k].solve()
            a_out[k] = torch.from_numpy(a_new).to(y)
            still.append(k)
        if callback is not None:
            callback(it, traces)
        active = still
        if not active:
            break
    kern.dense = None
    for k, tr in enumerate(traces):
        handle_nonconvergence(tr, on_nonconvergence, f"DCCNN hinge dual (relative duality gap; C={c:g}, problem {k})")
    return results, traces
