"""The bSQH certificate: the sufficient decrease recomputed independently, and the measured zeros.

bSQH accepts a trial ``u`` only if (the acceptance test of :mod:`proxnets.pmp.optimizer`)

    J_B(u) - J_B(u_k) <= -eta * tau,      tau = |u - u_k|^2,
    J_B(u) = L_B(u) + sum_groups rho R(u),  R(u) = sum_w (beta/n) 1[w != 0] + lam1 |w| + (lam2/2) w^2
                                            (+inf outside the box U_ad = {|w| <= bound}).

The optimizer's own record of that test re-reads the numbers the test used, so it can never
disagree with it. :class:`DecreaseAudit` recomputes them instead, around every step:

- before the step: ``J_B(u_k)`` by its own no-grad forward pass (the step's closure, i.e. the
  loss on the step's batch) plus its own ``sum rho R(u_k)``, counted from the regularizer's
  coefficients in float64 (never the optimizer's ``regularization()``); a copy of ``u_k``;
- after the step: ``J_B(u_{k+1})`` the same way and ``tau = |u_{k+1} - u_k|^2`` from the copy;
- the check ``J_B(u_{k+1}) - J_B(u_k) <= -eta * tau`` for every step (a step that leaves the
  weights unchanged has ``tau = 0`` and must leave ``J_B`` unchanged).

A corrupted acceptance test (always accept), a corrupted update (one that increases ``J_B``) or
corrupted bookkeeping (recorded ``J`` that is not the true one) therefore make it fail.
What it cannot see: a wrong loss function (the audit evaluates the same closure; the loss is
the user's definition of ``J``), and a user-supplied regularizer that is not a
:class:`~proxnets.pmp.regularizers.SparseRegularizer` (then its own ``value`` is used; the
certificate says so).

In full-batch mode (every closure evaluates the same training set: ``full_batch=True``) ``J``
after one step is ``J`` before the next when the weights did not change in between, so one
forward per step suffices and the certificate says ``J`` decreased monotonically on the training
set (for a fixed rho; in ``target_density`` mode each step is checked under its own rho: the
penalties of ``u_k`` and ``u_{k+1}`` are both counted after the step, ``u_k`` from the snapshot).
In mini-batch mode each step is checked on its own batch (what the acceptance test promises).

:func:`certificate` returns, for a model trained by bSQH, the recomputed decrease certificate of
the run (when the optimizer had an audit), the agreement of the optimizer's records with the
recomputation, and the exact zeros fraction of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from proxnets.certificates import Certificate
from proxnets.pmp.regularizers import SparseRegularizer
from proxnets.pmp.sparsity import SPARSIFIABLE
from proxnets.utils.validation import fail

__all__ = ["DecreaseAudit", "penalty", "certificate"]

# relative tolerance of the bookkeeping comparison: the optimizer sums its regularizer in the
# weights' dtype (float32 counts are exact below 2^24; L1/L2 terms round at ~1e-7 relative)
AGREEMENT_TOL = 1e-6


def penalty(optimizer: torch.optim.Optimizer, weights: list[torch.Tensor] | None = None) -> tuple[float, bool]:
    """``(sum_groups rho R(u), independent)`` at the current weights (or at ``weights``, one tensor per
    parameter in group order), with the groups' current rho, computed here in float64.

    ``R`` is counted from the coefficients of a :class:`SparseRegularizer` (``independent=True``);
    for any other regularizer its own ``value`` is used (``independent=False``).
    """
    total, independent = 0.0, True
    it = iter(weights) if weights is not None else None
    for group in optimizer.param_groups:
        rho = float(group.get("rho", 0.0))
        reg = group.get("regularizer")
        for p in group["params"]:
            w = p.detach() if it is None else next(it)
            if rho == 0.0:
                continue
            if isinstance(reg, SparseRegularizer):
                # beta / n per nonzero weight (n: 1, the tensor's size or the group's count); filter-level:
                # per weight of a nonzero filter
                n = {"none": 1, "layer": w.numel(), "group": reg.count}[reg.normalize]
                if reg.structure == "filter":  # every weight of a filter with a nonzero entry is priced
                    rows = w.reshape(w.shape[0], -1) if w.dim() else w.reshape(1, 1)
                    priced = int((rows != 0).any(1).sum()) * rows.shape[1]
                else:
                    priced = int(torch.count_nonzero(w))
                v = reg.beta * priced / n
                if reg.lam1 or reg.lam2:
                    wd = w.double()
                    v += reg.lam1 * float(wd.abs().sum()) + 0.5 * reg.lam2 * float((wd * wd).sum())
                if math.isfinite(reg.bound) and float(w.abs().max()) > reg.bound:
                    v = math.inf  # outside the admissible box U_ad: J is +inf there
            else:
                v, independent = float(reg.value(w)), False
            total += rho * v
    return total, independent


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class DecreaseAudit:
    """Recompute ``J_B`` before and after every bSQH step (see the module docstring).

    Pass it to the optimizer (``BSQH(..., audit=DecreaseAudit())``); ``records`` holds one dict per
    step: ``iteration``, ``J_before``, ``J_after``, ``loss_before``, ``loss_after``, ``tau``,
    ``violation = J_after - J_before + eta tau`` and, when the optimizer records its history,
    ``recorded`` (its ``J_before``, ``J_after``, ``tau``, ``accepted``).
    """

    def __init__(self, full_batch: bool = False):
        self.full_batch = bool(full_batch)
        self.records: list[dict[str, Any]] = []
        self.independent = True
        self._before: list[torch.Tensor] | None = None
        self._j_before: tuple[float, float] | None = None
        self._last: tuple | None = None  # weights and loss after the last step
        self._n_history = 0

    def _penalty(self, optimizer, weights=None) -> float:
        reg, independent = penalty(optimizer, weights)
        self.independent = self.independent and independent
        return reg

    def before(self, optimizer, closure: Callable) -> None:
        params = _params(optimizer)
        snapshot = [p.detach().clone() for p in params]
        if (self.full_batch and self._last is not None
                and all(torch.equal(a, b) for a, b in zip(self._last[0], snapshot))):
            loss = self._last[1]  # same data, same weights: same loss
        else:
            with torch.no_grad():
                loss = float(closure(backward=False))
        # only the loss here: the penalty of u_k is counted in after() with the step's rho (which
        # target_density mode sets inside the step), from this snapshot
        self._j_before = (math.nan, loss)
        self._before = snapshot
        self._n_history = len(getattr(optimizer, "history", []))

    def after(self, optimizer, closure: Callable) -> None:
        if self._before is None or self._j_before is None:
            fail("audit", "before() called before after()", "after() alone", RuntimeError)
        params = _params(optimizer)
        with torch.no_grad():
            loss_after = float(closure(backward=False))
        j_after = loss_after + self._penalty(optimizer)
        tau = sum(float(((p.detach() - b).double() ** 2).sum()) for p, b in zip(params, self._before))
        loss_before = self._j_before[1]
        j_before = loss_before + self._penalty(optimizer, self._before)
        eta = float(optimizer.eta)
        rec: dict[str, Any] = dict(iteration=len(self.records), J_before=j_before, J_after=j_after,
                                   loss_before=loss_before, loss_after=loss_after, tau=tau, eta=eta,
                                   violation=j_after - j_before + eta * tau)
        history = getattr(optimizer, "history", [])
        if len(history) > self._n_history:
            h = history[-1]
            rec["recorded"] = dict(J_before=h["J_before"], J_after=h["J_after"], tau=h["tau"],
                                   accepted=h["accepted"])
        self.records.append(rec)
        if self.full_batch:
            self._last = ([p.detach().clone() for p in params], loss_after)
        self._before, self._j_before = None, None

    def worst_violation(self) -> float:
        """``max_k (J_after - J_before + eta tau)`` (``nan`` if a ``J`` was not finite; ``-inf`` if no step)."""
        worst = -math.inf
        for r in self.records:
            v = r["violation"]
            if not math.isfinite(v):
                return math.nan
            worst = max(worst, v)
        return worst

    def disagreement(self) -> float | None:
        """Largest relative gap between the optimizer's records and the recomputation (``None``: no records)."""
        gaps = []
        for r in self.records:
            rec = r.get("recorded")
            if rec is None:
                continue
            for key in ("J_before", "J_after"):
                gaps.append(abs(rec[key] - r[key]) / max(1.0, abs(r[key])))
            gaps.append(abs(rec["tau"] - r["tau"]) / max(1.0, r["tau"]))
        if not gaps:
            return None
        return math.nan if not all(math.isfinite(g) for g in gaps) else max(gaps)


def _zeros(params: list[torch.Tensor]) -> tuple[int, int]:
    return sum(int((p.detach() == 0).sum()) for p in params), sum(p.numel() for p in params)


def certificate(model: nn.Module, x: torch.Tensor | None = None, *, optimizer: Any = None) -> list[Certificate]:
    """The bSQH certificates of ``model`` (trained by ``optimizer``, when given).

    - ``sufficient_decrease`` (when ``optimizer.audit`` recorded steps): ``max_k (J_B(u_{k+1}) -
      J_B(u_k) + eta tau_k) <= 0``, recomputed by the audit's own forward passes.
    - ``records_agree`` (when the optimizer also recorded its history): the largest relative gap
      between its recorded ``J_before``, ``J_after``, ``tau`` and the recomputed ones ``<= 1e-6``.
    - ``recorded_decrease`` (history but no audit): the optimizer's own numbers; not rigorous.
    - ``exact_zeros``: the number of weights that are exactly zero (conv/linear weights of the
      model), counted here; with an optimizer it must equal the count in its last record.

    ``x`` (inputs) is accepted for the common signature; these certificates are about the training
    run and the weights, and do not use it.
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, TypeError)
    certs: list[Certificate] = []
    audit = getattr(optimizer, "audit", None) if optimizer is not None else None
    history = list(getattr(optimizer, "history", []) or []) if optimizer is not None else []
    if audit is not None and audit.records:
        n = len(audit.records)
        changed = sum(1 for r in audit.records if r["tau"] > 0)
        independent = audit.independent
        certs.append(Certificate(
            "sufficient_decrease", audit.worst_violation(), 0.0, "<=", rigorous=independent,
            method=("recomputed: own no-grad forward pass of the step's batch and own regularizer count, "
                    "before and after each step; value = max_k J_B(u_k+1) - J_B(u_k) + eta tau_k"),
            why="" if independent else "the regularizer is not a SparseRegularizer: its own value() was used",
            details=dict(steps=n, steps_that_moved=changed, eta=audit.records[-1]["eta"],
                         full_batch=audit.full_batch,
                         J_first=audit.records[0]["J_before"], J_last=audit.records[-1]["J_after"],
                         guaranteed_decrease=sum(r["eta"] * r["tau"] for r in audit.records),
                         actual_decrease=audit.records[0]["J_before"] - audit.records[-1]["J_after"]
                         if audit.full_batch else None)))
        gap = audit.disagreement()
        if gap is not None:
            certs.append(Certificate(
                "records_agree", gap, AGREEMENT_TOL, "<=", rigorous=True,
                method="relative gap between the optimizer's recorded J_before, J_after, tau and the audit's"))
    elif history:
        eta = float(optimizer.eta)
        worst = max(h["J_after"] - h["J_before"] + eta * h["tau"] for h in history)
        certs.append(Certificate(
            "recorded_decrease", worst, 0.0, "<=", rigorous=False,
            why="re-reads the numbers the optimizer's own acceptance test used: it cannot disagree with it "
                "(train with BSQH(..., audit=DecreaseAudit()) for a recomputed certificate)",
            method="optimizer.history", details=dict(steps=len(history))))
    if optimizer is not None:
        params = [p for g in optimizer.param_groups if g.get("rho", 0.0) > 0 for p in g["params"]]
    else:
        params = [m.weight for m in model.modules() if isinstance(m, SPARSIFIABLE)]
    zeros, total = _zeros(params)
    if history:
        certs.append(Certificate(
            "exact_zeros", zeros, history[-1]["zeros"], "==", rigorous=True,
            method="count of weights == 0.0 (regularized weights) against the optimizer's last record",
            details=dict(zeros=zeros, weights=total, fraction=zeros / total if total else 0.0)))
    else:
        certs.append(Certificate(
            "exact_zeros", zeros / total if total else 0.0, 0.0, ">=", rigorous=False,
            why="no training record: the exact zeros fraction is measured, nothing is certified about it",
            method="count of conv/linear weights == 0.0", details=dict(zeros=zeros, weights=total)))
    return certs
