"""scikit-learn estimators: :class:`CCNN` (primal, cached features) and :class:`DCCNN` (dual).

Both take images as numpy arrays or torch tensors of shape ``(N, C, H, W)``, ``(N, H, W)`` (one
channel) or ``(N, F)`` (rows reshaped to ``image_shape``, default ``(1, 1, F)``: a 1-D signal), and
labels of any type (``classes_`` keeps them). After ``fit``:

- ``featurizers_``: the fitted :class:`~proxnets.convex.features.PatchFeaturizer` of each layer;
- ``filters_`` ``(D, r)`` and ``head_`` ``(r, K P)`` of the last layer; ``theta_ = filters_ @ head_``
  is the model that ``predict`` uses;
- ``trace_``: the :class:`~proxnets.convex.primal.GapTrace` (duality gap per iteration).

``CCNN`` solves the primal over cached features (the reference way; ``radius`` for the
constrained problem, else ``lam``) and takes ``n_filters`` (default: the rank) top left singular
vectors of its solution as filters; deeper layers are trained one by one on the previous layer's
filter responses. ``DCCNN`` solves the dual with streamed features and recovers ``n_filters``
filters and the head (:mod:`proxnets.convex.recovery`).
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from proxnets.convex.dual import solve_dual
from proxnets.convex.exact import ExactLayer, PatchKernel
from proxnets.convex.hinge import solve_hinge_dual
from proxnets.convex.kernels import make_feature_map
from proxnets.convex.duality import scores
from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.primal import GapTrace, solve_primal
from proxnets.convex.recovery import recover
from proxnets.convex.sources import CachedFeatures, StreamedFeatures, cache_features
from proxnets.utils.validation import check_choice, check_int, check_number, fail

__all__ = ["CCNN", "DCCNN"]


class _ConvexCNN(ClassifierMixin, BaseEstimator):
    """Shared hyper-parameters, input handling and prediction."""

    def _featurizer(self) -> PatchFeaturizer:
        return PatchFeaturizer(
            patch_size=self.patch_size, stride=self.stride, padding=self.padding, contrast_eps=self.contrast_eps,
            zca_eps=self.zca_eps, kernel=self.kernel, feature_map=self.feature_map, n_features=self.n_features,
            gamma=self.gamma, pool_size=self.pool_size, pool_stride=self.pool_stride,
        )

    # ------------------------------------------------------------ input handling
    def _images(self, X, *, reset: bool) -> torch.Tensor:
        device = torch.device(self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        if getattr(X, "ndim", 2) <= 2:
            X = validate_data(self, X, reset=reset, dtype=np.float32)
            shape = self.image_shape if self.image_shape is not None else (1, 1, X.shape[1])
            if int(np.prod(shape)) != X.shape[1]:
                fail("image_shape", f"a shape with {X.shape[1]} entries (the number of features)", shape)
            X = X.reshape(X.shape[0], *shape)
        else:
            X = np.asarray(X, dtype=np.float32)
            if X.ndim == 3:
                X = X[:, None]
            if X.ndim != 4:
                fail("X", "images (N, C, H, W), (N, H, W) or rows (N, F)", f"an array of shape {X.shape}")
            if not np.isfinite(X).all():
                raise ValueError("X: expected finite values, got an array containing NaN or inf")
            if reset:
                self.n_features_in_ = int(np.prod(X.shape[1:]))
        x = torch.from_numpy(np.ascontiguousarray(X)).to(device)
        if not reset and tuple(x.shape[1:]) != self.input_shape_:
            fail("X", f"images of shape (N, {', '.join(map(str, self.input_shape_))}) as in fit", f"shape {tuple(x.shape)}")
        return x

    def _labels(self, y, n: int) -> torch.Tensor:
        if y is None:
            raise ValueError(f"y: {type(self).__name__} requires y to be passed, but the target y is None")
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = column_or_1d(np.asarray(y), warn=True)
        if n < 2:
            fail("X", "at least 2 samples", "n_samples = 1")
        if y.shape[0] != n:
            fail("y", f"{n} labels (one per sample of X)", f"{y.shape[0]} labels")
        check_classification_targets(y)
        self.classes_, idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            fail("y", "at least 2 classes", f"only class {self.classes_[0]!r}")
        return torch.from_numpy(idx.astype(np.int64))

    def _label_index(self, y) -> np.ndarray:
        """Indices into ``classes_`` of labels ``y`` (an error for a label not seen in fit)."""
        check_is_fitted(self, "classes_")
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = column_or_1d(np.asarray(y))
        idx = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        if not np.all(self.classes_[idx] == y):
            fail("y", f"labels among the fitted classes {list(self.classes_)}", "unseen labels")
        return idx.astype(np.int64)

    def _check_common(self) -> None:
        check_number("lam", self.lam, low=0.0, low_inclusive=False)
        check_int("max_iter", self.max_iter, low=1)
        check_number("tol", self.tol, low=0.0)
        check_int("chunk", self.chunk, low=1)
        if self.n_filters is not None:
            check_int("n_filters", self.n_filters, low=1)

    # ------------------------------------------------------------ layer-wise training
    def _fit_layers(self, x: torch.Tensor, g: torch.Generator, solve, fit_layer=None) -> "_ConvexCNN":
        """CCNN's Algorithm 2: layers trained one by one, each on the previous layer's filter maps.

        For layer ``l = 1..L``: fit the patch featurizer on ``x_l`` (``x_1`` the images), solve the
        layer's convex problem with ``solve(feat, x_l, l, r) -> (filters (D, r), head (r, K P), trace)``
        (CCNN: the primal and the SVD of its solution; DCCNN: the dual and its recovery), and feed
        ``x_{l+1} = Z_l(x_l) filters_l`` (``(N, r, Hp, Wp)``, :meth:`PatchFeaturizer.next_input`) to
        the next layer. Lower layers keep ``r = n_filters`` (default 16) filters; the top layer
        ``n_filters`` (``None``: the solver's choice). Each layer's head is fitted against the labels
        and only the top one predicts. ``traces_``: one trace per layer; ``trace_`` the top layer's.
        ``fit_layer(x_l, g) -> layer`` replaces the featurizer (DCCNN's exact mode: an
        :class:`~proxnets.convex.exact.ExactLayer`, whose ``filters`` are channel indices and whose
        ``solve`` returns ``head=None``: no ``filters_ @ head_`` then).
        """
        check_int("n_layers", self.n_layers, low=1)
        self.featurizers_, self.traces_ = [], []
        for layer in range(self.n_layers):
            last = layer == self.n_layers - 1
            feat = fit_layer(x, g) if fit_layer is not None else self._featurizer().to(x.device).fit(x, g)
            r = self.n_filters if (self.n_filters is not None or last) else 16
            filters, head, trace = solve(feat, x, layer, r)
            feat.filters = filters
            self.featurizers_.append(feat)
            self.traces_.append(trace)
            if not last:
                x = feat.next_input(x)
        if head is not None:
            self.filters_, self.head_ = filters, head
            self.theta_ = self.filters_ @ self.head_
        self.trace_ = trace
        self.n_iter_ = trace.iterations
        return self

    # -------------------------------------------------------------- prediction
    def _last_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the last layer, ``(N, P, D)``, layer by layer."""
        for layer in self.featurizers_[:-1]:
            x = layer.next_input(x)
        return self.featurizers_[-1](x)

    def class_scores(self, X) -> np.ndarray:
        """Class scores ``u_i = A theta_`` ``(N, K)`` of the recovered CNN (the exported net's output)."""
        check_is_fitted(self, "theta_")
        x = self._images(X, reset=False)
        with torch.no_grad():
            out = torch.cat([scores(self._last_features(x[i : i + self.chunk]), self.theta_)
                             for i in range(0, x.shape[0], self.chunk)])
        return out.double().cpu().numpy()

    def decision_function(self, X) -> np.ndarray:
        """:meth:`class_scores`; for two classes scikit-learn's ``(N,)`` score ``u_1 - u_0``."""
        u = self.class_scores(X)
        return u[:, 1] - u[:, 0] if u.shape[1] == 2 else u

    def predict_proba(self, X) -> np.ndarray:
        u = self.class_scores(X)
        e = np.exp(u - u.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        idx = self.class_scores(X).argmax(1)
        return self.classes_[idx]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.non_deterministic = self.device != "cpu"
        return tags


_DOC_PARAMS = """
    Parameters (pipeline): ``patch_size``, ``stride``, ``padding``, ``contrast_eps`` (``None``: off),
    ``zca_eps`` (``None``: off), ``kernel`` in {"rbf", "inverse_poly", "linear"}, ``feature_map`` in
    {"rff", "nystrom", "linear"}, ``n_features`` (D), ``gamma``, ``pool_size``, ``pool_stride``.
    Solver: ``lam`` (> 0), ``max_iter``, ``tol`` (duality gap), ``chunk`` (samples per pass block),
    ``on_nonconvergence`` in {"ignore", "warn", "raise"}. ``n_filters``: filters kept.
    ``image_shape``: for 2-D ``X``. ``device``: "cpu", "cuda" or "auto". ``random_state``: seed.
"""


class CCNN(_ConvexCNN):
    __doc__ = "Convexified CNN solved in the primal over cached features." + _DOC_PARAMS + """
    ``radius``: solve the constrained problem ``|Theta|_* <= radius`` instead of the regularized
    one. ``n_layers``: layers trained one by one; lower layers pass ``n_filters`` (default 16)
    filter maps to the next. ``verbose``: 0 silent, 1 a progress bar (tqdm) with the gap, 2 also
    one line per iteration.
    """

    def __init__(self, *, patch_size=5, stride=1, padding=0, contrast_eps=0.1, zca_eps=0.1, kernel="rbf",
                 feature_map="rff", n_features=256, gamma=0.2, pool_size=2, pool_stride=None, lam=1e-2, radius=None,
                 n_layers=1, n_filters=None, max_iter=300, tol=1e-3, chunk=256, image_shape=None, device="cpu",
                 random_state=0, on_nonconvergence="warn", verbose=0):
        self.verbose = verbose
        self.patch_size, self.stride, self.padding = patch_size, stride, padding
        self.contrast_eps, self.zca_eps, self.kernel, self.feature_map = contrast_eps, zca_eps, kernel, feature_map
        self.n_features, self.gamma, self.pool_size, self.pool_stride = n_features, gamma, pool_size, pool_stride
        self.lam, self.radius, self.n_layers, self.n_filters = lam, radius, n_layers, n_filters
        self.max_iter, self.tol, self.chunk, self.image_shape = max_iter, tol, chunk, image_shape
        self.device, self.random_state, self.on_nonconvergence = device, random_state, on_nonconvergence

    def fit(self, X, y):
        self._check_common()
        check_int("n_layers", self.n_layers, low=1)
        if self.radius is not None:
            check_number("radius", self.radius, low=0.0, low_inclusive=False)
        x = self._images(X, reset=True)
        yt = self._labels(y, x.shape[0]).to(x.device)
        self.input_shape_ = tuple(x.shape[1:])
        k = len(self.classes_)
        g = torch.Generator().manual_seed(int(self.random_state or 0))
        lam, radius = (None, self.radius) if self.radius is not None else (self.lam, None)

        def solve(feat: PatchFeaturizer, x: torch.Tensor, layer: int, r: int | None):
            z = cache_features(feat, x, self.chunk)  # cached Q: (n, P, D)
            with _Progress(self.verbose, self.max_iter, f"CCNN layer {layer + 1}") as bar:
                theta, trace = solve_primal(CachedFeatures(z, self.chunk), yt, k, lam=lam, radius=radius,
                                            max_iter=self.max_iter, tol=self.tol, on_nonconvergence=self.on_nonconvergence,
                                            callback=bar.gap_trace)
            u, s, vh = torch.linalg.svd(theta, full_matrices=False)
            r = min(r if r is not None else max(1, int((s > 1e-8 * s[0].clamp_min(1e-30)).sum())), s.numel())
            self.full_theta_ = theta
            return u[:, :r].contiguous(), s[:r, None] * vh[:r], trace  # filters (D, r), head (r, K P)

        return self._fit_layers(x, g, solve)


class DCCNN(_ConvexCNN):
    __doc__ = "Convexified CNN solved through its dual, with filter recovery." + _DOC_PARAMS + """
    Two duals:

    * ``loss="hinge", feature_map="exact"`` -- the seed's kernel-only dual
      ``max sum alpha s.t. lambda_max(sum_ij alpha_i alpha_j y_i y_j K(x_i, x_j)) <= 1, 0 <= alpha <= C``
      (:mod:`proxnets.convex.hinge`; ``K`` the pooled patch kernel of :mod:`proxnets.convex.exact`,
      any of ``kernel`` in {"rbf", "inverse_poly", "linear"} or a callable PSD kernel). One-vs-rest
      for more than two classes, each binary problem with its own certified gap. ``C`` (> 0) the
      box, ``tol`` the relative gap, ``max_iter`` the cutting-plane passes. No random features:
      the model does not depend on ``random_state`` except through ZCA's patch sample (set
      ``max_fit_patches``-sized data or ``zca_eps=None`` for none at all). After ``fit``:
      ``dual_coef_`` (alpha, one row per binary problem), ``duality_gap_`` (final relative gap per
      problem), ``n_filters_`` (recovered filters per problem: the rank of the fitted scales on
      the active eigenspace), ``support_`` (images with alpha > 0 in some problem), ``traces_``
      (one :class:`~proxnets.convex.hinge.HingeTrace` per problem), ``trace_`` (their sums),
      ``binary_`` (the :class:`~proxnets.convex.hinge.BinaryDual` s), and an export
      ``filters_``/``head_``/``featurizers_`` for :func:`~proxnets.convex.export.to_torch` (exact for
      ``kernel="linear"``, through ``n_features`` random features / Nystrom otherwise;
      ``export_agreement_`` = fraction of training images predicted alike).
    * ``loss="logistic"`` with ``feature_map`` in {"rff", "nystrom", "linear"} -- the faster,
      approximate variant: the dual of the multinomial logistic problem over explicit features
      (a factor of the kernel matrix; two random-feature draws give different models).
      ``n_filters``: filters recovered (``None``: the active part of the dual spectrum, see
      :func:`~proxnets.convex.recovery.active_rank`). ``beta0``: initial dual step.
      ``features``: "streamed" (default: recomputed every pass, memory independent of ``n P D``) or
      "cached" (the feature tensor held in memory: same solution, faster, memory ``n P D``).
      ``cache_mb``: with "streamed", MiB of feature chunks kept between passes (default 0; the
      same iterates bitwise, faster by the fraction kept, see ``StreamedFeatures``).
      After ``fit``: ``dual_`` (the :class:`~proxnets.convex.dual.DualResult`), ``recovery_``.
      ``n_layers``: layers trained one by one as CCNN's Algorithm 2 does (the loop CCNN uses): each
      layer's dual is solved on the previous layer's recovered filter maps; lower layers recover
      ``n_filters`` (default 16) filters. ``dual_``/``recovery_``/``trace_`` are the top layer's,
      ``duals_``/``recoveries_``/``traces_`` one per layer.

    ``n_layers`` in the exact mode: the same loop; layer ``l + 1`` is an exact-kernel dual on the
    pooled maps of layer ``l``'s recovered filters (kernel expansions over its support patches,
    :class:`~proxnets.convex.exact.ExactLayer`): the ``n_filters`` (default 16) filters of largest
    scale over all binary problems of a lower layer. ``layers_`` one ExactLayer per layer,
    ``layer_traces_`` their per-problem traces; ``kernel_``, ``binary_``, ``traces_``, ``trace_``,
    ``dual_coef_``, ... are the top layer's. No ``to_torch`` export for more than one exact layer.

    ``verbose``: 0 silent, 1 a progress bar (tqdm, on stderr) with the current gap, 2 also one
    line per iteration (dual, primal, gap). ``solver_options``: a dict of extra keyword arguments
    of :func:`~proxnets.convex.hinge.solve_hinge_dual` (exact mode; the convex suite builds its
    deliberately broken variants through it).
    """

    def __init__(self, *, patch_size=5, stride=1, padding=0, contrast_eps=0.1, zca_eps=0.1, kernel="rbf",
                 feature_map="rff", n_features=256, gamma=0.2, pool_size=2, pool_stride=None, lam=1e-2,
                 n_filters=None, max_iter=300, tol=1e-3, beta0=1.0, chunk=256, image_shape=None, device="cpu",
                 random_state=0, on_nonconvergence="warn", features="streamed", loss="logistic", C=1.0, verbose=0,
                 solver_options=None, n_layers=1, cache_mb=0.0):
        self.cache_mb = cache_mb
        self.patch_size, self.stride, self.padding = patch_size, stride, padding
        self.contrast_eps, self.zca_eps, self.kernel, self.feature_map = contrast_eps, zca_eps, kernel, feature_map
        self.n_features, self.gamma, self.pool_size, self.pool_stride = n_features, gamma, pool_size, pool_stride
        self.lam, self.n_filters, self.max_iter, self.tol, self.beta0 = lam, n_filters, max_iter, tol, beta0
        self.chunk, self.image_shape, self.device = chunk, image_shape, device
        self.random_state, self.on_nonconvergence = random_state, on_nonconvergence
        self.features, self.loss, self.C, self.verbose = features, loss, C, verbose
        self.solver_options, self.n_layers = solver_options, n_layers

    def fit(self, X, y):
        check_choice("loss", self.loss, ("logistic", "hinge"))
        check_int("verbose", self.verbose, low=0)
        if (self.loss == "hinge") != (self.feature_map == "exact"):
            fail("feature_map", "'exact' exactly when loss='hinge' (the kernel-only dual is the hinge loss's)",
                 f"{self.feature_map!r} with loss={self.loss!r}")
        check_int("n_layers", self.n_layers, low=1)
        if self.loss == "hinge":
            return self._fit_exact(X, y)
        self._check_common()
        check_choice("features", self.features, ("streamed", "cached"))
        check_number("cache_mb", self.cache_mb, low=0.0)
        check_number("beta0", self.beta0, low=0.0, low_inclusive=False)
        x = self._images(X, reset=True)
        yt = self._labels(y, x.shape[0]).to(x.device)
        self.input_shape_ = tuple(x.shape[1:])
        k = len(self.classes_)
        g = torch.Generator().manual_seed(int(self.random_state or 0))
        self.duals_, self.recoveries_ = [], []

        def solve(feat: PatchFeaturizer, x: torch.Tensor, layer: int, r: int | None):
            source = (StreamedFeatures(feat, x, self.chunk, int(self.cache_mb * 2**20)) if self.features == "streamed"
                      else CachedFeatures(cache_features(feat, x, self.chunk), self.chunk))
            with _Progress(self.verbose, self.max_iter, f"DCCNN (logistic dual) layer {layer + 1}") as bar:
                dual, trace = solve_dual(source, yt, k, self.lam, max_iter=self.max_iter, tol=self.tol,
                                         beta0=self.beta0, on_nonconvergence=self.on_nonconvergence,
                                         callback=bar.gap_trace)
            rec = recover(source, yt, k, dual, self.lam, n_filters=r, max_iter=self.max_iter, tol=self.tol,
                          on_nonconvergence=self.on_nonconvergence)
            self.duals_.append(dual)
            self.recoveries_.append(rec)
            self.dual_, self.recovery_ = dual, rec  # the top layer's once the loop ends
            return rec.filters, rec.head, trace

        return self._fit_layers(x, g, solve)

    # ------------------------------------------------------------ exact kernel, hinge loss
    def _fit_exact(self, X, y):
        check_number("C", self.C, low=0.0, low_inclusive=False)
        check_int("max_iter", self.max_iter, low=1)
        check_number("tol", self.tol, low=0.0)
        check_int("chunk", self.chunk, low=1)
        if self.n_filters is not None:
            check_int("n_filters", self.n_filters, low=1)
        x = self._images(X, reset=True)
        yt = self._labels(y, x.shape[0])
        self.input_shape_ = tuple(x.shape[1:])
        g = torch.Generator().manual_seed(int(self.random_state or 0))
        k = len(self.classes_)
        cls = [1] if k == 2 else list(range(k))  # binary: one problem, y = +1 for classes_[1]
        ybin = torch.stack([torch.where(yt == c, 1.0, -1.0) for c in cls]).double()
        if self.solver_options is not None and not isinstance(self.solver_options, dict):
            fail("solver_options", "None or a dict of keyword arguments of solve_hinge_dual", type(self.solver_options).__name__)
        opts = dict(self.solver_options or {})

        def fit_layer(x: torch.Tensor, g: torch.Generator) -> ExactLayer:
            feat = PatchFeaturizer(patch_size=self.patch_size, stride=self.stride, padding=self.padding,
                                   contrast_eps=self.contrast_eps, zca_eps=self.zca_eps, kernel="linear", feature_map="linear",
                                   n_features=1, gamma=self.gamma if isinstance(self.gamma, (int, float)) else 1.0,
                                   pool_size=self.pool_size, pool_stride=self.pool_stride).to(x.device)
            return ExactLayer(PatchKernel(feat, self.kernel, self.gamma).fit(x, g))

        def solve(layer: ExactLayer, x: torch.Tensor, idx: int, r: int | None):
            what = "DCCNN (exact kernel dual)" + (f" layer {idx + 1}" if self.n_layers > 1 else "")
            with _Progress(self.verbose, self.max_iter, what) as bar:
                layer.binary, layer.traces = solve_hinge_dual(layer.kernel, ybin, self.C, max_iter=self.max_iter, tol=self.tol,
                                                              on_nonconvergence=self.on_nonconvergence,
                                                              callback=bar.hinge_traces, **opts)
            return layer.select(r), None, _sum_traces(layer.traces)  # channels passed on; the top layer predicts itself

        self._fit_layers(x, g, solve, fit_layer)
        self.layers_ = self.featurizers_
        self.layer_traces_ = [layer.traces for layer in self.layers_]
        top = self.layers_[-1]
        self.kernel_, self.binary_, self.traces_ = top.kernel, top.binary, top.traces
        self.dual_coef_ = torch.stack([b.alpha for b in self.binary_]).cpu().numpy()
        self.duality_gap_ = np.array([t.relative[-1] for t in self.traces_])
        self.n_filters_ = np.array([b.phi.shape[1] for b in self.binary_])
        self.support_ = np.nonzero((self.dual_coef_ > 0).any(0))[0]
        if self.n_layers == 1:
            self._export(x, g)
        else:  # a stack of kernel expansions has no Conv2d form here: no export
            self.featurizers_, self.export_agreement_ = None, None
            for name in ("filters_", "head_", "theta_"):
                self.__dict__.pop(name, None)
        return self

    def _exact_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``f_k(x) = sum_l sum_p head[l, p] h_l(x)[p]``, ``h_l(x) = C(x) phi_l`` for each binary problem: ``(N, m)``;
        below the top layer, ``x`` passes through the lower layers' filter maps."""
        layers = getattr(self, "layers_", None)
        if layers is not None and len(layers) > 1:
            for layer in layers[:-1]:
                x = layer.next_input(x)
            return layers[-1].scores(x)
        kern = self.kernel_
        w = torch.stack([b.weights for b in self.binary_])  # (m, n)

        def reduce(c: torch.Tensor, rows: slice) -> tuple[torch.Tensor]:  # c (m, b, P, P) -> (m, b)
            return (torch.stack([torch.einsum("ipq,ql,lp->i", c[k], b.phi, b.head) for k, b in enumerate(self.binary_)]),)

        return kern.contract(w, rows=kern.patches(x), reduce=reduce)[0].T

    def _export(self, x: torch.Tensor, g: torch.Generator) -> None:
        """Filters in feature space for :func:`to_torch`: ``g_l = sum_j b_j sum_q phi_l[q] Z~_j[q] / s`` with
        ``Z~`` the uncentered pooled features of ``kernel`` (identity for linear: exact)."""
        kern = self.kernel_
        if callable(self.kernel):
            self.featurizers_, self.export_agreement_ = None, None
            return
        feat = copy.deepcopy(kern.featurizer)
        n_img = min(200, -(-8192 // kern.n_patches))  # images enough for the 4096 sampled patches (twice over)
        some = kern._patches_of(x[torch.randperm(x.shape[0], generator=g)[:n_img].sort().values]).float()
        flat = some.reshape(-1, some.shape[-1])
        fmap = "linear" if self.kernel == "linear" else ("rff" if self.kernel == "rbf" else "nystrom")
        sample = flat[torch.randperm(flat.shape[0], generator=g)[:4096]]
        feat.kernel, feat.feature_map_name, feat.input_scale = self.kernel, fmap, kern.input_scale
        feat.phi = make_feature_map(fmap, self.kernel, flat.shape[1], self.n_features, self.gamma, sample=sample, generator=g)
        dim = int(feat._raw(x[:1]).shape[-1])
        feat.center = torch.zeros(kern.n_positions, dim)
        feat.scale = 1.0
        sup = torch.from_numpy(self.support_)
        m = len(self.binary_)
        k_out = 2 if m == 1 else m
        gks = [0.0] * m
        step = min(self.chunk, 16)  # the feature map's (step, J, D) tensor is the largest thing here
        for i in range(0, len(sup), step):  # streamed over the support: (step, P, D) at a time
            rows = sup[i : i + step]
            z = feat._raw(x[rows]).double()
            for k, b in enumerate(self.binary_):
                gks[k] = gks[k] + torch.einsum("j,jqd,ql->dl", b.weights[rows], z, b.phi) / kern.scale  # (D, r)
        filters, heads = [], []
        for k, b in enumerate(self.binary_):
            gk = gks[k] if torch.is_tensor(gks[k]) else torch.zeros(dim, b.phi.shape[1], dtype=torch.float64)
            hk = torch.zeros(b.phi.shape[1], k_out, kern.n_positions, dtype=torch.float64)
            hk[:, 1 if m == 1 else k] = b.head
            filters.append(gk)
            heads.append(hk.reshape(b.phi.shape[1], k_out * kern.n_positions))
        self.filters_ = torch.cat(filters, 1).float()
        self.head_ = torch.cat(heads, 0).float()
        self.theta_ = self.filters_ @ self.head_
        feat.filters = self.filters_
        self.featurizers_ = [feat]
        with torch.no_grad():
            exported = torch.cat([scores(feat(x[i : i + step]), self.theta_) for i in range(0, x.shape[0], step)])
        # the recovered model's training scores come with the solution (no extra kernel pass)
        f = torch.stack([b.train_scores for b in self.binary_], 1)
        own = torch.cat([torch.zeros_like(f), f], 1) if m == 1 else f
        self.export_agreement_ = float((exported.argmax(1) == own.argmax(1)).double().mean())

    def class_scores(self, X) -> np.ndarray:
        if getattr(self, "loss", "logistic") != "hinge":
            return super().class_scores(X)
        check_is_fitted(self, "binary_")
        x = self._images(X, reset=False)
        with torch.no_grad():
            f = self._exact_scores(x).cpu().numpy()
        return np.concatenate([np.zeros_like(f), f], 1) if f.shape[1] == 1 else f


def _sum_traces(traces: list) -> GapTrace:
    """The one-vs-rest problem's trace: sums of the binary problems' bounds (each carried at its
    last value once it stopped); the sum of the primals bounds the sum of the optima from above,
    the sum of the duals from below."""
    out = GapTrace()
    t_max = max(t.iterations for t in traces)
    for i in range(t_max):
        pr = sum(t.primal[min(i, t.iterations - 1)] for t in traces)
        du = sum(t.dual[min(i, t.iterations - 1)] for t in traces)
        out.record(pr, du, sum(t.rank[min(i, t.iterations - 1)] for t in traces), 0.0)
    out.converged = all(t.converged for t in traces)
    out.passes = t_max
    return out


class _Progress:
    """``verbose`` >= 1: a tqdm bar over the solver's iterations showing the gap; >= 2: a line per iteration."""

    def __init__(self, verbose: int, total: int, what: str):
        self.verbose, self.total, self.what, self.bar = verbose, total, what, None

    def __enter__(self):
        if self.verbose >= 1:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.what, leave=True)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

    def _show(self, it: int, primal: float, dual: float) -> None:
        if self.bar is None:
            return
        gap = (primal - dual) / max(abs(primal), 1e-300)
        self.bar.update(1)
        self.bar.set_postfix(gap=f"{gap:.2e}")
        if self.verbose >= 2:
            self.bar.write(f"{self.what} iter {it + 1}: primal {primal:.6g}  dual {dual:.6g}  relative gap {gap:.3e}",
                           file=sys.stderr)

    def gap_trace(self, it: int, trace) -> None:
        self._show(it, trace.primal[-1], trace.dual[-1])

    def hinge_traces(self, it: int, traces) -> None:
        self._show(it, sum(t.primal[-1] for t in traces), sum(t.dual[-1] for t in traces))
