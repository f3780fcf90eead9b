"""The bSQH optimizer: batch sequential quadratic Hamiltonian training with an L0 cost.

One call of :meth:`BSQH.step` is one bSQH iteration on the batch the closure evaluates:

1. forward and backward sweep: ``L_B(u_k)`` and ``dL_B/du`` (the adjoints are minus the loss
   gradients with respect to layer outputs, see :mod:`proxnets.pmp.adjoints`);
2. per layer ``l``: ``u_l = argmax_u H_eps`` by the Hamiltonian rule (closed form, exact zeros);
3. trial forward sweep ``L_B(u)``; ``tau = |u - u_k|^2``;
4. accept iff ``J_B(u) - J_B(u_k) <= -eta * tau`` with ``J_B = L_B + sum_groups rho R``; on
   acceptance ``eps`` is decreased by the eps rule, on rejection increased and step 2 repeated;
5. stop (with a message, and a warning) when ``eps`` exceeds ``eps_max``; ``converged`` when
   ``tau <= kappa``.

The layer (step 2): ``layer="map"`` (default) takes the affine map alone as the layer, so the
Hamiltonian is linear in the weights and step 2 is the closed form of :mod:`.hamiltonian` (an
iterative hard-thresholding step of length ``1/(2 eps)``). ``layer="map+activation"`` is the
seed's layer, map then activation/pooling (:mod:`.layer_hamiltonian`): a few layer-local steps on
the true, nonlinear augmented Hamiltonian with the convex-combination safeguard.

Sparsity at a chosen density (``target_density``): in every trial rho (of the groups that start
with ``rho > 0``) is set to the price at which the layerwise maximizer keeps exactly the target
fraction ``d_k`` of the weights. rho prices the L0 term only: the L2 weight ``c = rho lam2`` stays
that of the initial rho (``lam2`` is set to ``c / rho``). For ``r = (beta/n) 1[w != 0] + (lam2/2) w^2``
a weight with ``z = w_k - g / (2 eps)`` is then kept iff ``rho < rho_i``,
``rho_i = z^2 n eps / (beta (1 + c / (2 eps)))``; rho is the geometric mean of the ``k``-th
and ``(k+1)``-th largest ``rho_i`` (``k = round(d_k N)``), so exactly ``k`` survive (ties aside). Step 3/4 then use that rho for
``J_B(u_k)`` and ``J_B(u)`` alike (one objective per step: the audit recomputes both with it).
``d_k`` is 1 for ``density_start`` steps, then falls to the target along a cubic over
``density_ramp`` steps (gradual pruning; both 0: the target from the first step). Exact for ``layer="map"``; with ``"map+activation"`` the inner
steps may move a few weights across the threshold.

Full-batch mode (the theorem's setting): the closure evaluates the whole training set; then every
accepted iteration decreases ``J`` by at least ``eta * tau``. Mini-batch mode: the closure
evaluates the current batch, and the acceptance test uses that same batch.

The closure has the engine's signature ``closure(backward: bool = True) -> loss``: it zeroes the
gradients, computes the batch loss (without the regularizer, which the optimizer adds) and
back-propagates when ``backward`` is true. Trial points are evaluated with ``backward=False``
under ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from proxnets.pmp.adjoints import AdjointRecorder
from proxnets.pmp.eps import TrialStep, make_eps_rule
from proxnets.pmp.hamiltonian import LinearizedHamiltonianRule
from proxnets.pmp.layer_hamiltonian import LayerParam, LayerTape, maximize_layer
from proxnets.pmp.regularizers import Regularizer, SparseRegularizer, nonzero_count, sparse_terms
from proxnets.utils.convergence import IterInfo, NonConvergenceWarning
from proxnets.utils.validation import check_choice, check_int, check_number, fail

__all__ = ["BSQH", "BSQHInfo", "DEFAULT_REGULARIZER", "EpsExplodedWarning", "LAYERS"]

# the default objective (well posed, see docs/pmp.md): the L0 term divided by the group's weight
# count (rho R = rho x density + L2), weights in the box |w| <= 1
DEFAULT_REGULARIZER = SparseRegularizer(beta=1.0, lam2=1e-3, normalize="group", bound=1.0)
LAYERS = ("map", "map+activation")


class EpsExplodedWarning(RuntimeWarning):
    """bSQH stopped: eps exceeded ``eps_max`` (no trial step reduced J enough)."""


@dataclasses.dataclass
class BSQHInfo(IterInfo):
    """Summary of a bSQH run (``optimizer.info()``).

    - ``iterations``: bSQH iterations (calls of ``step``) performed.
    - ``converged``: the last iteration had ``tau <= kappa`` (the update stalled).
    - ``residuals``: ``tau = |u_{k+1} - u_k|^2`` of each iteration (0 for a failed one).
    - ``accepted`` / ``rejected``: trial counts over the run; ``acceptance_ratio = accepted / trials``.
    - ``stopped`` / ``message``: set when eps exploded (then ``step`` no longer changes weights).
    """

    accepted: int = 0
    rejected: int = 0
    acceptance_ratio: float = math.nan
    stopped: bool = False
    message: str = ""


_ACCEPTS: dict[Any, bool] = {}


def _accepts_backward(closure: Callable) -> bool:
    # cached per code object: the engine builds a new closure every step (inspect costs ~1 ms)
    key = getattr(closure, "__code__", None)
    if key is not None and key in _ACCEPTS:
        return _ACCEPTS[key]
    try:
        params = inspect.signature(closure).parameters
    except (TypeError, ValueError):
        return False
    ok = "backward" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if key is not None and len(_ACCEPTS) < 1024:
        _ACCEPTS[key] = ok
    return ok


class BSQH(torch.optim.Optimizer):
    """bSQH with the regularizer ``rho * R`` (default pure L0: ``rho`` per nonzero weight).

    Args:
        params: parameters or parameter groups (``named_parameters()`` gives named diagnostics).
            Per-group options: ``rho``, ``eps`` (initial eps of the group's layers), ``regularizer``,
            ``lr`` (default 1: the rule uses ``eps / lr``, so the engine's lr schedules act on it).
        rho: weight of the regularizer (``>= 0``); put biases in a group with ``rho=0``
            (see :func:`~proxnets.pmp.sparsity.sparsity_param_groups`).
        eps: initial augmentation parameter (``> 0``); one value per parameter tensor ("layer").
        eta: sufficient-decrease constant of the acceptance test (``> 0``).
        eps_rule: ``"sigma-zeta"`` (plain), ``"curvature"`` or a rule object (:mod:`proxnets.pmp.eps`).
        sigma, zeta: the plain rule's factors (``sigma > 1``, ``0 < zeta < 1``); ``sigma`` is also
            the curvature rule's minimum increase.
        regularizer: a :class:`~proxnets.pmp.regularizers.Regularizer` (default
            :data:`DEFAULT_REGULARIZER`: L0 normalized by the group's weight count, L2 1e-3, box 1).
        rule: the per-tensor closed-form rule (default :class:`LinearizedHamiltonianRule`).
        layer: ``"map"`` (linearized Hamiltonian) or ``"map+activation"`` (the seed's layer; needs
            ``model``); ``inner_steps``, ``backtracks``, ``safeguard``: its layer-local maximization.
        model: the network (only for ``layer="map+activation"``: its layers are taped).
        target_density: set rho in every trial so that exactly this fraction of the regularized
            weights is nonzero (see above; needs ``SparseRegularizer`` with ``lam1 = 0``).
        density_ramp: steps over which the density target falls from 1 to ``target_density``.
        density_start: steps at density target 1 before the ramp (dense training first).
        reuse_trial: full-batch mode only (the closure always evaluates the same data): the
            accepted trial forward is run with autograd and its graph is back-propagated as the next
            iteration's sweep (one forward per iteration saved; the closure must return the
            un-detached loss when ``backward=False``); only while >= 70% of the trials so far were
            accepted (a rejected trial's graph is wasted work).
        eps_min: floor of eps for the rules given by name (a ceiling ``1/(2 eps_min)`` on the step; in
            mini-batch mode it guards against a huge step that happens to pass the test on one batch).
        eps_max: eps above this stops the run (the "eps explodes" stop).
        max_trials: trials per iteration before giving up on that batch (weights kept, warning).
        kappa: ``tau <= kappa`` marks convergence.
        recorder: an :class:`AdjointRecorder` on the model: adds the Hamiltonian value to the
            diagnostics (costs hooks on every forward pass).
        record_history: keep one diagnostics dict per iteration in ``self.history``.
        audit: a :class:`~proxnets.pmp.certify.DecreaseAudit`: recomputes ``J_B`` before and
            after every step with its own forward passes and its own regularizer count, for the
            certificate (:func:`proxnets.pmp.certify.certificate`); costs two no-grad forwards
            per step (one in full-batch mode).
    """

    def __init__(
        self,
        params,
        rho: float = 0.0,
        eps: float = 1.0,
        eta: float = 1e-5,
        eps_rule: Any = "sigma-zeta",
        sigma: float = 1.1,
        zeta: float = 0.9,
        regularizer: Regularizer | None = None,
        rule: Callable | None = None,
        eps_min: float = 1e-8,
        eps_max: float = 1e8,
        max_trials: int = 50,
        kappa: float = 1e-9,
        recorder: AdjointRecorder | None = None,
        record_history: bool = True,
        audit: Any = None,
        layer: str = "map",
        model: torch.nn.Module | None = None,
        inner_steps: int = 2,
        backtracks: int = 2,
        safeguard: bool = True,
        target_density: float | None = None,
        density_ramp: int = 0,
        density_start: int = 0,
        reuse_trial: bool = False,
    ):
        check_number("rho", rho, low=0.0)
        check_number("eps", eps, low=0.0, low_inclusive=False)
        self.eta = check_number("eta", eta, low=0.0, low_inclusive=False)
        check_number("sigma", sigma, low=1.0, low_inclusive=False)
        check_number("zeta", zeta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        eps_min = check_number("eps_min", eps_min, low=0.0, high=eps, low_inclusive=False)
        self.eps_max = check_number("eps_max", eps_max, low=eps, low_inclusive=False)
        self.max_trials = check_int("max_trials", max_trials, low=1)
        self.kappa = check_number("kappa", kappa, low=0.0)
        if isinstance(eps_rule, str) and eps_rule == "sigma-zeta":
            self.eps_rule = make_eps_rule(eps_rule, sigma=sigma, zeta=zeta, eps_min=eps_min)
        elif isinstance(eps_rule, str):
            self.eps_rule = make_eps_rule(eps_rule, sigma=sigma, eps_min=eps_min)
        else:
            self.eps_rule = make_eps_rule(eps_rule)
        self.rule = LinearizedHamiltonianRule() if rule is None else rule
        self.layer = check_choice("layer", layer, LAYERS)
        self.inner_steps = check_int("inner_steps", inner_steps, low=1)
        self._price_guess: float | None = None  # the last target-density price: order_pair ranks against it first
        self._price_buffers: tuple | None = None  # the price search's points and scores (reused), shapes, views
        self._start_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(p) -> (p, u_k buffer)
        self._in_trial = False  # inside a trial forward: zero_grad keeps the gradients
        self.backtracks = check_int("backtracks", backtracks, low=0)
        self.safeguard = bool(safeguard)
        self.tape: LayerTape | None = None
        if layer == "map+activation":
            if not isinstance(model, torch.nn.Module):
                fail("model", "the network (an nn.Module) with layer='map+activation'", type(model).__name__,
                     TypeError)
            self.tape = LayerTape(model)
        self.target_density = None if target_density is None else check_number(
            "target_density", target_density, low=0.0, high=1.0, low_inclusive=False)
        self.density_ramp = check_int("density_ramp", density_ramp, low=0)
        self.density_start = check_int("density_start", density_start, low=0)
        self.reuse_trial = bool(reuse_trial)
        self._reuse: tuple[torch.Tensor, list[int]] | None = None
        regularizer = DEFAULT_REGULARIZER if regularizer is None else regularizer
        if not isinstance(regularizer, Regularizer):
            fail("regularizer", "an object with value(w) and prox(z, t)", type(regularizer).__name__, TypeError)
        self.recorder = recorder
        self.record_history = record_history
        if audit is not None and not (hasattr(audit, "before") and hasattr(audit, "after")):
            fail("audit", "a DecreaseAudit (an object with before(optimizer, closure) and after(optimizer, closure))",
                 type(audit).__name__, TypeError)
        self.audit = audit
        # lr only multiplies the step length 1/(2 eps) (so that the engine's schedules apply);
        # the default 1 is the plain method
        defaults = dict(rho=rho, eps=eps, regularizer=regularizer, lr=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_number("rho", group["rho"], low=0.0)
            check_number("eps", group["eps"], low=0.0, low_inclusive=False)
            check_number("lr", group["lr"], low=0.0, low_inclusive=False)
            group.setdefault("adapt_rho", target_density is not None and group["rho"] > 0)
            if group["adapt_rho"]:
                if not (isinstance(group["regularizer"], SparseRegularizer) and group["regularizer"].lam1 == 0):
                    fail("regularizer", "a SparseRegularizer with lam1 = 0 in target_density mode",
                         group["regularizer"], ValueError)
                # the L2 weight rho lam2 stays that of the initial rho: rho prices the L0 term only
                group.setdefault("l2_weight", group["rho"] * group["regularizer"].lam2)
            reg = group["regularizer"]
            if isinstance(reg, SparseRegularizer) and reg.normalize == "group" and reg.count is None:
                # the L0 term is divided by this group's weight count
                group["regularizer"] = dataclasses.replace(reg, count=max(sum(p.numel() for p in group["params"]), 1))
            for p in group["params"]:
                if not p.is_floating_point():
                    fail("params", "real floating-point tensors (bSQH cannot handle complex or integer ones)",
                         f"dtype {p.dtype}", TypeError)
                if p.is_sparse:
                    fail("params", "dense tensors", "a sparse tensor", TypeError)
                self.state[p]["eps"] = torch.tensor(float(group["eps"]), dtype=torch.float64)
        # run-level named state (serialized by state_dict under "bsqh")
        self.run_state: dict[str, Any] = dict(
            iteration=0, accepted=0, rejected=0, stopped=False, message="", converged=False, last_tau=math.nan
        )
        self.history: list[dict[str, Any]] = []
        self._taus: list[float] = []

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group in sd["param_groups"]:  # the regularizer is a frozen dataclass: store its fields
            reg = group.get("regularizer")
            if dataclasses.is_dataclass(reg):
                group["regularizer"] = {"type": type(reg).__name__, **dataclasses.asdict(reg)}
        sd["bsqh"] = dict(self.run_state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        run_state = state_dict.pop("bsqh", None)
        groups = []
        for group, own in zip(state_dict["param_groups"], self.param_groups):
            group = dict(group)
            if isinstance(group.get("regularizer"), dict):
                group["regularizer"] = own["regularizer"] if _same_reg(own["regularizer"], group["regularizer"]) \
                    else SparseRegularizer(**{k: v for k, v in group["regularizer"].items() if k != "type"})
            groups.append(group)
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        if run_state is not None:
            self.run_state.update(run_state)

    # ----------------------------------------------------------------------------- helpers
    def _layers(self):
        """(name, param, group) for every parameter with a gradient."""
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                name = names[pi] if names else f"group{gi}.param{pi}"
                yield name, p, group

    def _reg_key(self) -> tuple:
        return tuple((g["rho"], id(g["regularizer"]), tuple(p._version for p in g["params"]))
                     for g in self.param_groups)

    def regularization(self) -> float:
        """``sum_groups rho R(u)`` at the current weights."""
        key = self._reg_key()
        cached = getattr(self, "_reg_cache", None)
        if cached is not None and cached[0] == key:
            # same rho, regularizer and weights (version counters) as last time; a stale value (weights
            # changed through .data) would show in the audit's records_agree
            return cached[1]
        terms = [group["rho"] * group["regularizer"].value(p.detach())
                 for group in self.param_groups if group["rho"] for p in group["params"]]
        value = float(torch.stack(terms).sum()) if terms else 0.0  # one synchronization
        self._reg_cache = (key, value)
        return value

    def sparsity(self) -> dict[str, Any]:
        """Exact zeros per layer and in total over the parameters with ``rho > 0``."""
        return self._sparsity(None)

    def _sparsity(self, known: tuple[torch.Tensor, dict[int, tuple[int, int]]] | None) -> dict[str, Any]:
        """:meth:`sparsity`; ``known``: (counts, id(p) -> (p's version then, row)) of the accepted trial, reused for
        the parameters not written since (version counters): one count of each regularized tensor per step."""
        layers = list(self._layers())
        if known is not None:
            stacked, rows = known
            fresh = [p for _, p, _ in layers if rows.get(id(p), (None,))[0] != p._version]
            values = torch.cat([stacked, torch.stack([nonzero_count(p.detach()) for p in fresh])]) if fresh \
                else stacked
            values = values.tolist()
            at = {id(p): len(stacked) + i for i, p in enumerate(fresh)}
            counts = [values[at[id(p)]] if id(p) in at else values[rows[id(p)][1]] for _, p, _ in layers]
        else:
            counts = torch.stack([nonzero_count(p.detach()) for _, p, _ in layers]).tolist() if layers else []
        per_layer, zeros, total = {}, 0, 0
        for (name, p, group), nnz in zip(layers, counts):
            z, n = p.numel() - int(nnz), p.numel()
            per_layer[name] = z / n
            if group["rho"] > 0:
                zeros, total = zeros + z, total + n
        return dict(per_layer=per_layer, zeros=zeros, regularized=total, fraction=zeros / total if total else 0.0)

    def info(self) -> BSQHInfo:
        rs = self.run_state
        trials = rs["accepted"] + rs["rejected"]
        return BSQHInfo(
            iterations=rs["iteration"], converged=bool(rs["converged"]), residuals=list(self._taus),
            accepted=rs["accepted"], rejected=rs["rejected"],
            acceptance_ratio=rs["accepted"] / trials if trials else math.nan,
            stopped=bool(rs["stopped"]), message=rs["message"],
        )

    def sufficient_decrease(self, j_new: float, j_k: float, tau: float) -> bool:
        """The acceptance test ``J_B(u_new) - J_B(u_k) <= -eta * tau`` (a non-finite ``J`` fails)."""
        return math.isfinite(j_new) and j_new - j_k <= -self.eta * tau

    # ----------------------------------------------------------------------------- the iteration
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        if closure is None or not _accepts_backward(closure):
            fail("closure", "a callable closure(backward: bool = True) -> loss (bSQH evaluates trial points)",
                 closure, TypeError)
        if self.audit is None:
            loss = self._step(closure)
        else:
            # the audit's own forward passes bracket the whole iteration (it never reads our numbers)
            self.audit.before(self, closure)
            loss = self._step(closure)
            self.audit.after(self, closure)
        return loss

    def density_target(self) -> float:
        """This step's density target: 1 for ``density_start`` steps, then ``d + (1 - d) (1 - k / ramp)^3``
        (``k`` counted from the ramp's start), ``d`` after the ramp."""
        d = float(self.target_density)
        k = self.run_state["iteration"] - self.density_start
        if k < 0:
            return 1.0
        if self.density_ramp and k < self.density_ramp:
            return d + (1.0 - d) * (1.0 - k / self.density_ramp) ** 3
        return d

    def _price_for_density(self, layers, eps_l: list[float], points: dict[int, torch.Tensor] | None = None
                           ) -> float | None:
        """The rho at which the closed form keeps exactly ``round(d_k N)`` regularized weights.

        With ``structure="filter"`` a filter ``o`` of ``m`` weights is kept iff ``rho < rho_o``,
        ``rho_o = |z_o|^2 eps / (beta_o (1 + c / (2 eps)))``, ``beta_o = m beta / n`` (no box, no L1:
        see :mod:`.regularizers`); the filters are taken by decreasing ``rho_o`` until their L0 prices
        ``beta_o`` reach ``d_k`` x the total price (the nearest a whole number of filters can make):
        the fraction of weights when all layers price a weight alike, of multiply-adds with
        :func:`~proxnets.pmp.sparsity.mac_param_groups`.

        ``points`` (per weight): filled with layer index -> ``z = w_k - g / (2 eps)``, the operation the rule
        starts with, so that the rule does not compute it again (a view of a buffer kept for the next trial).
        """
        adapt = [(i, layer) for i, layer in enumerate(layers) if layer[2].get("adapt_rho")]
        if not adapt:
            return None
        filters = any(layer[2]["regularizer"].structure == "filter" for _, layer in adapt)
        scores, sizes = [], []
        if not filters:  # per weight: the points and scores written into two buffers (no concatenation)
            like = adapt[0][1][3]
            shapes = [layer[3].shape for _, layer in adapt]
            cached = self._price_buffers
            if cached is None or cached[1] != shapes or cached[0].dtype != like.dtype \
                    or cached[0].device != like.device:
                # the buffers and their per-layer views, made once for these shapes (4 view calls per layer saved)
                size = sum(layer[3].numel() for _, layer in adapt)
                buf = torch.empty(2, size, dtype=like.dtype, device=like.device)
                views, offset = [], 0
                for shape in shapes:
                    m = math.prod(shape)
                    views.append((buf[0, offset:offset + m].view(shape), buf[1, offset:offset + m].view(shape)))
                    offset += m
                cached = self._price_buffers = (buf, shapes, views)
            s = cached[0][1]
            views = iter(cached[2])
        for i, (_, p, group, w_k, g) in adapt:
            reg, e = group["regularizer"], eps_l[i] / group["lr"]
            beta = reg.l0_weight(w_k)
            factor = e / (beta * (1.0 + group["l2_weight"] / (2.0 * e)))
            if not filters:
                # kept iff z^2 > (rho beta / e)(1 + c / (2 e)), c = rho lam2 fixed: rho_i is linear in z^2
                z, sc = next(views)
                torch.add(w_k, g, alpha=-0.5 / e, out=z)  # the rule's first operation (LinearizedHamiltonianRule)
                torch.mul(z, z, out=sc).mul_(factor)
                if points is not None and z.dtype == w_k.dtype:
                    points[i] = z
                continue
            z2 = (w_k - g / (2.0 * e)) ** 2
            # the sizes are L0 prices (beta / n per weight): the target is the kept fraction of the
            # total price, i.e. of the weights when every layer has the same price per weight
            if reg.structure == "filter":
                z2 = z2.reshape(z2.shape[0], -1) if z2.dim() else z2.reshape(1, 1)
                m = z2.shape[1]
                scores.append(z2.sum(1) * (factor / m))
                sizes.append(torch.full((z2.shape[0],), m * beta, dtype=torch.float64, device=z2.device))
            else:
                scores.append((z2 * factor).reshape(-1))
                sizes.append(torch.full((z2.numel(),), beta, dtype=torch.float64, device=z2.device))
        if filters:
            return self._price_for_group_density(torch.cat(scores).double(), torch.cat(sizes))
        k = int(round(self.density_target() * s.numel()))
        if k >= s.numel():
            return 0.5 * float(s.min())  # everything is kept at any price below the smallest
        # any rho in [s_(k+1), s_(k)) (k-th largest) keeps exactly the top k; take their geometric mean
        lo, hi = order_pair(s, k, self._price_guess)
        if not math.isfinite(hi):
            rho = 2.0 * lo if lo > 0 else 1.0
        else:
            rho = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
        self._price_guess = rho  # the next trial's scores are ranked against it first (order_pair)
        return rho

    def _price_for_group_density(self, s: torch.Tensor, sizes: torch.Tensor) -> float:
        """Groups with prices ``s`` and weight counts ``sizes``: the rho keeping the top groups whose
        weights come nearest to ``round(d_k N)``."""
        order = torch.argsort(s, descending=True)
        s, cum = s[order], torch.cumsum(sizes[order], 0)
        k = self.density_target() * float(cum[-1])
        j = int(torch.argmin((cum - k).abs()))  # groups 0..j kept
        if j + 1 >= s.numel():
            return 0.5 * float(s[-1])
        lo, hi = float(s[j + 1]), float(s[j])
        return math.sqrt(lo * hi) if lo > 0 else 0.5 * hi

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, except inside a trial forward (``closure(backward=False)``).

        There no backward pass follows, and the step still needs the sweep's gradients ``dL_B/du(u_k)``: a
        rejected trial is retried with them (with ``set_to_none=False`` the closure would zero them in
        place, and the retry would step with a zero gradient). So they are kept, as Adam keeps them after its
        step, and the trial skips the call (~10% of a trial forward on this CPU)."""
        if self._in_trial:
            return
        super().zero_grad(set_to_none=set_to_none)

    def _start_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """The buffer that holds ``p``'s value ``u_k`` during a step (allocated once per parameter, reused: the
        step's trial points are written into ``p`` itself, and a rejection copies ``u_k`` back)."""
        buf = self._start_buffers.get(id(p))
        if buf is None or buf[0] is not p or buf[1].shape != p.shape or buf[1].dtype != p.dtype \
                or buf[1].device != p.device:
            buf = self._start_buffers[id(p)] = (p, torch.empty_like(p, memory_format=torch.preserve_format).detach())
        return buf[1]

    def _sweep(self, closure: Callable) -> torch.Tensor:
        """Forward + backward sweep at u_k; the accepted full-batch trial's graph when it can be reused."""
        reuse, self._reuse = self._reuse, None
        if reuse is not None:
            loss, versions = reuse
            params = [p for g in self.param_groups for p in g["params"]]
            if versions == [p._version for p in params]:  # weights untouched since that forward
                self.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss.backward()
                return loss.detach()
        if self.tape is not None:
            self.tape.clear()
            self.tape.enabled = True
        with torch.enable_grad():
            return closure(backward=True)

    def _trial_loss(self, closure: Callable) -> float:
        """``L_B`` at the trial point: no autograd, unless the graph is kept for reuse (full batch)."""
        rs = self.run_state
        trials = rs["accepted"] + rs["rejected"]
        # a graph is built only while trials are mostly accepted (a rejected trial's graph is wasted
        # work: a forward with autograd costs more than one without)
        likely = trials == 0 or rs["accepted"] >= 0.7 * trials
        self._in_trial = True  # the closure's zero_grad keeps the sweep's gradients (see zero_grad)
        try:
            if not self.reuse_trial or self.recorder is not None or not likely:
                return float(closure(backward=False))
            if self.tape is not None:
                self.tape.clear()
                self.tape.enabled = True
            with torch.enable_grad():
                out = closure(backward=False)
        finally:
            self._in_trial = False
        if self.tape is not None:
            self.tape.enabled = False
        if isinstance(out, torch.Tensor) and out.requires_grad:
            self._pending = out
        return float(out)

    def _nonlinear_updates(self, layers, eps) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
        """layer="map+activation": new values of the taped layers' parameters (id -> tensor) and stats."""
        index = {id(p): i for i, (_, p, _, _, _) in enumerate(layers)}
        calls = self.tape.layers() if self.tape is not None else []
        uses: dict[int, int] = {}
        for c in calls:
            for _, q in c.module.named_parameters(recurse=False):
                uses[id(q)] = uses.get(id(q), 0) + 1
        out: dict[int, torch.Tensor] = {}
        stats = dict(layers=0, H_gain=0.0, inner_steps=0, backtracks=0)
        for c in calls:
            params = []
            for attr, q in c.module.named_parameters(recurse=False):
                i = index.get(id(q))
                if i is None or uses[id(q)] != 1:  # shared or not optimized: the linearized rule / fixed
                    continue
                _, p, group, w_k, g = layers[i]
                params.append((i, LayerParam(attr, w_k, g, float(eps[i]) / group["lr"], group["rho"],
                                             group["regularizer"])))
            if not params:
                continue
            values, info = maximize_layer(c, [lp for _, lp in params], steps=self.inner_steps,
                                          backtracks=self.backtracks, safeguard=self.safeguard, rule=self.rule)
            for (i, _), v in zip(params, values):
                out[i] = v
            stats["layers"] += 1
            if not info["exact"]:
                stats["H_gain"] += info["H_end"] - info["H_start"]
            stats["inner_steps"] += info["steps"]
            stats["backtracks"] += info["backtracks"]
        return out, stats

    def _step(self, closure: Callable):
        rs = self.run_state
        if self.recorder is not None:
            self.recorder.enabled = True
            self.recorder.clear()
        self._pending = None
        terms_cache, self._terms_cache = getattr(self, "_terms_cache", None), None
        loss = self._sweep(closure)
        if self.tape is not None:
            self.tape.enabled = False
        if rs["stopped"]:
            return loss
        loss_k = float(loss)
        layers = []
        for name, p, group in self._layers():
            if p.grad is None:
                continue  # unused this batch: left unchanged (as torch optimizers do)
            if p.grad.is_sparse:
                fail("params", "dense gradients", f"a sparse gradient for {name}", TypeError)
            g = p.grad  # detached only if it is part of a graph (create_graph=True): a detach is a call per tensor
            layers.append((name, p, group, self._start_buffer(p), g.detach() if g.requires_grad else g))
        ps, w_ks, gs = [q[1] for q in layers], [q[3] for q in layers], [q[4] for q in layers]
        if layers:
            torch._foreach_copy_(w_ks, ps)  # u_k, one multi-tensor copy into buffers kept between steps
        moved = {id(p) for p in ps}
        hamiltonian = self.recorder.hamiltonian() if self.recorder is not None else None
        if self.recorder is not None:
            self.recorder.enabled = False
        # the regularizer's terms at u_k, once: R is linear in them, so J_B(u_k) at any trial's rho
        # comes from them (synchronized with the trial's numbers, one transfer per trial)
        regs = [(p, group) for _, p, group in self._layers() if group["rho"] > 0 or group.get("adapt_rho")]
        all_sparse = all(isinstance(g["regularizer"], SparseRegularizer) for _, g in regs)
        counts = None
        versions = [p._version for p, _ in regs]
        cached = terms_cache
        if cached is not None and cached[0] == versions and cached[1] == [_terms_key(g["regularizer"]) for _, g in regs]:
            reg_terms_k = cached[2]  # the weights are the last accepted trial's: its terms
        else:
            reg_terms_k = _reg_terms([g for _, g in regs], [p.detach() for p, _ in regs]) if regs else None
        reg_k = self.regularization() if not layers else math.nan  # set per trial
        j_k = loss_k + reg_k
        eps = torch.stack([self.state[p]["eps"] for _, p, _, _, _ in layers]) if layers else torch.zeros(0, dtype=torch.float64)
        lrs = torch.tensor([group["lr"] for _, _, group, _, _ in layers], dtype=torch.float64)
        record: dict[str, Any] = dict(iteration=rs["iteration"], J_before=j_k, loss_before=loss_k)
        accepted, trials, trial, tau = False, 0, None, torch.zeros(len(layers), dtype=torch.float64)
        gain, layer_stats = math.nan, None
        while trials < self.max_trials and layers:
            trials += 1
            lin = 0.0
            eps_l = eps.tolist()
            points: dict[int, torch.Tensor] = {}  # layer -> w_k - g / (2 eps), when the price search has it
            if self.target_density is not None:
                rho = self._price_for_density(layers, eps_l, points)
                if rho is not None:
                    for group in self.param_groups:
                        if group.get("adapt_rho"):
                            group["rho"] = rho
                            if group["l2_weight"] and rho > 0:
                                group["regularizer"] = dataclasses.replace(
                                    group["regularizer"], lam2=group["l2_weight"] / rho)
            if self.layer == "map+activation":
                nonlinear, layer_stats = self._nonlinear_updates(layers, eps)
            else:
                nonlinear = {}
            into = getattr(self.rule, "into", None)
            for i, (name, p, group, w_k, g) in enumerate(layers):
                # the trial point written into the parameter (the rule's ``into``: no new tensor, no copy)
                w = nonlinear.get(i)
                if w is not None:
                    p.copy_(w)
                elif into is not None:
                    into(p, w_k, g, eps_l[i] / group["lr"], group["rho"], group["regularizer"], z=points.get(i))
                else:
                    p.copy_(self.rule(w_k, g, eps_l[i] / group["lr"], group["rho"], group["regularizer"]))
            # D = u - u_k per layer and its two sums, multi-tensor (the same kernels as per tensor, fewer calls);
            # torch's cascade sum (torch.dot's float32 sum is ~10x less exact)
            ds = torch._foreach_sub(ps, w_ks)
            dots = [q.sum() for q in torch._foreach_mul(gs, ds)]
            torch._foreach_mul_(ds, ds)  # D * D in place (the same products, one allocation fewer per tensor)
            parts = [torch.stack([q.sum() for q in ds]), torch.stack(dots)]
            if regs:
                rows = [j for j, (p, _) in enumerate(regs) if id(p) in moved]  # unmoved: their terms at u_k
                # the trial's nonzero counts, once: its L0 terms and, if accepted, the record's sparsity
                counts = (torch.stack([nonzero_count(regs[j][0]) for j in rows]), [regs[j][0] for j in rows]) \
                    if rows and all_sparse else None
                reg_terms_new = _reg_terms([regs[j][1] for j in rows], [regs[j][0] for j in rows],
                                           None if counts is None else counts[0]) if rows else reg_terms_k
                if rows and len(rows) != len(regs):
                    reg_terms_new = reg_terms_k.index_copy(0, torch.tensor(rows, dtype=torch.long,
                                                                           device=reg_terms_k.device), reg_terms_new)
                parts += [reg_terms_k.reshape(-1), reg_terms_new.reshape(-1)]
            # one conversion (widening: cat's type promotion then double() give the same values as double() per
            # part) and one synchronization
            both = torch.cat(parts).double()
            if both.device.type != "cpu":
                both = both.cpu()
            n = len(layers)
            tau = both[:n].clone()
            sums = [both[n:2 * n].sum(), tau.sum()]
            if regs:  # rho R at u_k and at the trial, with this trial's rho (target_density adapts it)
                coef = torch.tensor([_reg_coef(group) for _, group in regs], dtype=torch.float64)
                t = both[2 * n:].view(2, len(regs), 3)
                sums += [(coef * t[0]).sum(), (coef * t[1]).sum()]
            values = torch.stack(sums).tolist()  # the same float64 sums, read in one call
            lin, total_tau = values[0], values[1]
            reg_k, reg_new = (values[2], values[3]) if regs else (0.0, 0.0)
            j_k = loss_k + reg_k
            record.update(J_before=j_k)
            if total_tau <= self.kappa:  # the maximizer is (within kappa) u_k itself: a stationary point
                torch._foreach_copy_(ps, w_ks)
                tau.zero_()
                counts = None  # the trial's counts, not u_k's
                rs["converged"] = True
                accepted = True
                record.update(J_after=j_k, loss_after=loss_k)
                break
            rs["converged"] = False
            loss_new = self._trial_loss(closure)
            j_new = loss_new + reg_new
            trial = TrialStep(tau=tau.clone(), lin=lin, d_loss=loss_new - loss_k, d_reg=reg_new - reg_k, eta=self.eta,
                              tau_total=total_tau)
            if self.sufficient_decrease(j_new, j_k, total_tau):
                accepted = True
                rs["accepted"] += 1
                # linearized Hamiltonian gain -<dL/du, D> - rho dR, minus the augmentation the rule
                # used: eps / lr per layer (the step the rule took)
                gain = trial.gain
                record.update(J_after=j_new, loss_after=loss_new,
                              augmented_gain=gain - float((eps / lrs * tau).sum()))
                eps = self.eps_rule.accept(eps, trial)
                if regs:  # the next step starts here: its terms at u_k are these
                    self._terms_cache = ([p._version for p, _ in regs], [_terms_key(g["regularizer"]) for _, g in regs],
                                         reg_terms_new)
                if counts is not None:  # the weights are the trial's: its counts are theirs
                    known = {id(p): (p._version, i) for i, p in enumerate(counts[1])}
                    counts = (counts[0], known)
                if self._pending is not None:
                    params = [p for g in self.param_groups for p in g["params"]]
                    self._reuse = (self._pending, [p._version for p in params])
                break
            self._pending = None
            rs["rejected"] += 1
            torch._foreach_copy_(ps, w_ks)
            eps = self.eps_rule.reject(eps, trial)
            if float(eps.max()) > self.eps_max:
                rs["stopped"] = True
                rs["message"] = (f"bSQH stopped at iteration {rs['iteration']}: eps rose to {float(eps.max()):.3g} "
                                 f"> eps_max={self.eps_max:.3g} without a trial step decreasing J by eta*tau")
                warnings.warn(rs["message"], EpsExplodedWarning, stacklevel=3)
                break
        self._pending = None
        if not accepted:
            torch._foreach_copy_(ps, w_ks)
            record.update(J_after=j_k, loss_after=loss_k)
            if not rs["stopped"] and layers:
                warnings.warn(f"bSQH iteration {rs['iteration']}: no trial accepted in {self.max_trials} trials; "
                              "weights kept", NonConvergenceWarning, stacklevel=3)
        for e, (_, p, _, _, _) in zip(eps.clone().unbind(0), layers):  # one copy, then views (rules are pure)
            self.state[p]["eps"] = e
        tau_acc = float(tau.sum()) if accepted else 0.0
        self._taus.append(tau_acc)
        rs["last_tau"] = tau_acc
        rs["iteration"] += 1
        if self.record_history:
            sp = self._sparsity(counts if accepted else None)
            record.update(
                accepted=accepted, trials=trials, tau=tau_acc,
                eps=dict(zip([name for name, *_rest in layers], eps.tolist())),
                sparsity=sp["per_layer"], zeros=sp["zeros"], sparsity_total=sp["fraction"],
                hamiltonian_gain=gain, curvature=trial.curvature if trial is not None else math.nan,
                rho=[g["rho"] for g in self.param_groups],
            )
            if layer_stats is not None:
                record["layer_hamiltonian"] = layer_stats
            if hamiltonian is not None:
                record["hamiltonian"] = hamiltonian - reg_k
            record.setdefault("augmented_gain", math.nan)
            self.history.append(record)
        return loss


ORDER_BAND = 512  # order_pair's fast path: at most this many ranks between the guess and the k-th largest
_EXACT_COUNT = 2 ** 24  # a float32 sum of 0/1 values is an exact count below this many entries


def order_pair(s: torch.Tensor, k: int, guess: float | None = None) -> tuple[float, float]:
    """``(lo, hi)``: ``lo`` the ``(k+1)``-th largest of the 1-d ``s`` (``0 <= k < s.numel()``), ``hi`` the smallest
    entry strictly above ``lo`` (``inf`` if none): every price in ``[lo, hi)`` keeps exactly the entries above it.

    Reference: ``lo = kthvalue(s, n - k)``, ``hi = min{s > lo}``. With a ``guess`` (the last price: the
    ranking moves little from one trial to the next) it first counts ``c = #{s > guess}``; then ``lo`` and the
    ``k``-th largest are order statistics of one side of the guess, ``|c - k| + 1`` ranks from it:
    ``c == k``: ``lo = max{s <= guess}``, ``hi = min{s > guess}``; ``0 < |c - k| < ORDER_BAND``: a ``topk`` of
    ``|c - k| + 1`` on that side (the other side masked to -inf/inf). When the ``k``-th and ``(k+1)``-th largest
    tie (``hi`` is then a later distinct value), the guess is far, or there is none, the reference is used: the
    result is always the reference's, bit for bit (tested against it).

    The fast path makes no boolean tensor (on this CPU a comparison, a boolean sum or a ``where`` on a boolean
    mask costs 20-85 us on 61k entries, a float pass 5-10 us): ``a = sign(s - guess)`` is 1 exactly where
    ``s > guess`` (the scalar is rounded to ``s``'s dtype in both, and a float difference is 0 only between equal
    values), the count is the sum of ``max(a, 0)``, and ``m = (1/2 - a) inf`` (``-inf`` above the guess, ``+inf``
    at or below it) masks by clamping: ``clamp(s, max=m)`` keeps the entries at or below the guess and puts
    ``-inf`` above, ``clamp(s, min=m)`` keeps those above and puts ``+inf`` below (a clamp returns ``s`` itself or
    the bound, so values and signed zeros are kept).
    """
    n = s.numel()
    if s.ndim != 1 or not 0 <= k < n:
        raise ValueError(f"k: expected 0 <= k < s.numel() for a 1-d s, got k={k} with s of shape {tuple(s.shape)}")
    if guess is not None and 0 < k < n < _EXACT_COUNT and math.isfinite(guess):
        a = torch.sub(s, guess).sign_()  # 1 above the guess, 0 at it or NaN, -1 below
        # the sum of s is NaN if any entry is (one vectorized pass; isnan + sum costs 30x more here)
        c, total = torch.stack([a.clamp(min=0.0).sum(), s.sum()]).tolist()
        # kthvalue ranks a NaN largest, the comparison with the guess never: with a NaN the reference decides
        if total == total:
            c = int(c)
            mask = torch.rsub(a, 0.5).mul_(math.inf)  # -inf above the guess, +inf at or below it
            if c == k:
                # exactly k above the guess: lo is the largest entry at or below it, hi the smallest above it
                lo, hi = torch.stack([torch.clamp(s, max=mask).amax(), torch.clamp(s, min=mask).amin()]).tolist()
                return lo, hi
            elif 0 < k - c < ORDER_BAND:  # the k-th and (k+1)-th largest are the (k-c)-th and (k-c+1)-th below
                v = torch.topk(torch.clamp(s, max=mask), k - c + 1).values.tolist()
                kth, lo = v[-2], v[-1]
                if kth > lo:
                    return lo, kth
            elif 0 < c - k < ORDER_BAND:  # ... the (c-k)-th and (c-k+1)-th smallest above
                v = torch.topk(torch.clamp(s, min=mask), c - k + 1, largest=False).values.tolist()
                lo, kth = v[-2], v[-1]
                if kth > lo:
                    return lo, kth
    lo_t = torch.kthvalue(s, n - k).values  # linear time (topk of k ~ 0.1 n is ~10x slower here)
    # the smallest score above lo: one fused masked minimum (a boolean index allocates and copies)
    hi = float(torch.where(s > lo_t, s, math.inf).amin()) if k > 0 else math.inf
    return float(lo_t), hi


def _reg_terms(groups: list[dict[str, Any]], ws: list[torch.Tensor],
               counts: torch.Tensor | None = None) -> torch.Tensor:
    """``(len(ws), 3)``: the terms of ``R(w)`` whose combination with :func:`_reg_coef` is ``rho R(w)``, one row per
    tensor (:func:`~proxnets.pmp.regularizers.sparse_terms` over all rows when every regularizer is sparse;
    ``counts``: the tensors' nonzero counts, stacked, when the caller has them)."""
    regs = [g["regularizer"] for g in groups]
    if all(isinstance(r, SparseRegularizer) for r in regs):
        return sparse_terms(regs, ws, counts)
    rows = []
    for reg, w in zip(regs, ws):
        if isinstance(reg, SparseRegularizer):
            rows.append(reg.terms(w))
        else:
            v = reg.value(w)
            z = v.new_zeros(())
            rows.append(torch.stack([v, z, z]))
    return torch.stack(rows)


def _terms_key(reg: Any) -> Any:
    """What :meth:`SparseRegularizer.terms` depends on (not lam2's value, which target_density changes)."""
    if isinstance(reg, SparseRegularizer):
        return (reg.beta, reg.normalize, reg.count, reg.structure, reg.lam1 != 0, reg.lam2 != 0)
    return id(reg)


def _reg_coef(group: dict[str, Any]) -> tuple[float, float, float]:
    reg, rho = group["regularizer"], group["rho"]
    if isinstance(reg, SparseRegularizer):
        return (rho, rho * reg.lam1, 0.5 * rho * reg.lam2)
    return (rho, 0.0, 0.0)


def _same_reg(reg: Any, fields: dict[str, Any]) -> bool:
    return dataclasses.is_dataclass(reg) and type(reg).__name__ == fields.get("type") and all(
        getattr(reg, k, None) == v for k, v in fields.items() if k != "type"
    )
