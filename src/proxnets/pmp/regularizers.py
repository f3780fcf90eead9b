"""Regularizers of the control problem and their closed-form proximal maps.

The bSQH objective over a batch ``B`` is

    J_B(u) = (1/|B|) sum_{s in B} Phi_s(x_L) + rho * R(u),

with the separable regularizer (per weight ``w``)

    r(w) = (beta / n) * 1[w != 0] + lam1 * |w| + (lam2 / 2) * w**2,      R(u) = sum_w r(w),

over the admissible box ``U_ad = {|w| <= bound}``. ``beta / n`` weighs the L0 term (``n`` = 1, the
layer's size or the group's weight count: see :class:`SparseRegularizer`), ``lam1`` an optional L1 term and
``lam2`` an optional L2 term. ``rho`` is the optimizer's (per parameter group) weight.

Why a proximal map: with the linearized Hamiltonian (see :mod:`proxnets.pmp.hamiltonian`) the
layerwise maximization of ``H - eps |u - u_k|^2`` is, weight by weight,

    argmin_w  (1/2) (w - z)^2 + t * r(w),     z = w_k - (dL/dw) / (2 eps),  t = rho / (2 eps),

i.e. ``prox_{t r}(z)``. For ``r`` above it has the closed form

    w~ = soft(z, t lam1) / (1 + t lam2),        soft(z, a) = sign(z) max(|z| - a, 0),
    keep w~  iff  max(|z| - t lam1, 0)^2 > 2 t beta (1 + t lam2),   else w = 0.

(The nonzero branch has value ``z^2/2 - max(|z|-t lam1, 0)^2 / (2 (1 + t lam2)) + t beta``
against ``z^2/2`` at zero.) A tie goes to zero, so the result is always an exact maximizer and
zeros are exact zeros.

**Filter-level (structured) L0** (``structure="filter"``). The groups are the slices ``w[o]`` of a
tensor along its first dimension (an output filter of a convolution, an output row of a linear
map; a 1-d tensor: every entry is its own group), of size ``m``, and

    r(w) = sum_o [ (beta m / n) 1[w[o] != 0] + sum_{i in o} (lam1 |w_i| + (lam2 / 2) w_i^2) ],

i.e. a nonzero filter costs the L0 price of all its ``m`` weights (so with ``normalize="group"``
``R`` is still ``beta`` x the fraction of weights that are nonzero, now counted in whole filters).
The group prox ``argmin_v (1/2)|v - z_o|^2 + t r_o(v)`` has two branches. Off: ``v = 0``, value
``|z_o|^2 / 2``. On: given ``v != 0`` the rest of ``r_o`` is separable, so each coordinate takes the
boxed 1-d minimizer ``m_i = min(max(|z_i| - t lam1, 0) / (1 + t lam2), bound)``, ``v_i = sign(z_i) m_i``;
value ``sum_i [(1/2)(m_i - |z_i|)^2 + t (lam1 m_i + lam2 m_i^2 / 2)] + t beta m / n``. The filter is
kept iff the on-value is strictly smaller:

    keep  iff  sum_i gap_i + t beta m / n < 0,   gap_i = (1/2)(m_i - |z_i|)^2 + t (lam1 m_i + lam2 m_i^2 / 2) - z_i^2 / 2.

Without L1 and box (``m_i = |z_i| / (1 + t lam2)``) this is ``|z_o|^2 > 2 t (beta m / n) (1 + t lam2)``:
group hard thresholding of the filter's norm. Both branches are exact minimizers of their
(convex, resp. constant) problems, so the comparison is the exact group maximizer of the
augmented Hamiltonian, with exact zero filters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = ["NORMALIZATIONS", "STRUCTURES", "Regularizer", "SparseRegularizer", "nonzero_count", "soft_threshold",
           "sparse_terms"]


@runtime_checkable
class Regularizer(Protocol):
    """What the Hamiltonian rule needs from a regularizer ``r`` (separable over weights)."""

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """``R(w) = sum r(w_i)`` as a 0-d tensor."""

    def prox(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``argmin_w (1/2)(w - z)^2 + t r(w)`` elementwise; ``t`` broadcasts against ``z``."""


def soft_threshold(z: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """``sign(z) * max(|z| - a, 0)`` (the proximal map of ``a |.|``); elementwise, NaN/inf in ``z``
    propagate (no finiteness check: optimizer hot path)."""
    if not isinstance(z, torch.Tensor):
        fail("z", "a torch.Tensor", type(z).__name__, TypeError)
    if not isinstance(a, torch.Tensor):
        check_number("a", a, low=0.0)
    return torch.sign(z) * torch.clamp(z.abs() - a, min=0.0)


def nonzero_count(w: torch.Tensor) -> torch.Tensor:
    """``torch.count_nonzero(w)`` (a 0-d integer tensor: int32 below 2^31 entries, else int64) as the sum of
    ``w.bool()`` read as bytes: the same integer, since ``bool(x)`` is ``x != 0`` (NaN counts, -0.0 does not). On
    a 120 x 400 float32 weight (one thread) 13 us, where ``w.bool().sum()`` (an int64 sum of booleans) takes 21 us
    and ``count_nonzero`` 32-84 us (the optimizer counts every regularized tensor per trial). No checks
    (optimizer hot path)."""
    b = w.bool()
    if b.numel() < 2 ** 31:  # an int32 sum of bytes is exact and vectorizes
        return b.view(torch.uint8).sum(dtype=torch.int32)
    return b.sum()


def sparse_terms(regs: Sequence["SparseRegularizer"], ws: Sequence[torch.Tensor],
                 counts: torch.Tensor | None = None) -> torch.Tensor:
    """``(len(ws), 3)``: row ``j`` holds ``(L0 price of w, |w|_1, |w|^2)`` of ``regs[j]`` at ``w = ws[j]``, so that
    ``R_j(w) = t0 + lam1 t1 + (lam2 / 2) t2`` (:meth:`SparseRegularizer.terms` is its one-row case).

    ``R`` is linear in these, so the optimizer evaluates it for any ``rho`` and ``lam2`` from one pass over the
    weights. A term priced at 0 is 0 and not computed. Column by column over all rows that price it: the L0
    counts stacked and scaled by one multiplication (``price * count`` in ``w``'s dtype, as a scalar times a
    0-d count would round), ``|w|`` and ``w * w`` as multi-tensor operations, each summed per row (the same
    kernels on the same tensors as row by row, so the same values bit for bit, in fewer calls). Tensors of
    mixed dtypes or devices are taken one at a time. ``counts``: ``torch.stack([nonzero_count(w) for w in ws])``
    when the caller has it (the optimizer keeps it for its sparsity record).
    """
    n = len(ws)
    if n != len(regs):
        fail("regs", f"one regularizer per tensor ({n} tensors)", f"{len(regs)} regularizers")
    for w in ws:  # the boundary checks that cost no pass over the data (an optimizer hot path)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            fail("ws", "real floating-point tensors", type(w).__name__ if not isinstance(w, torch.Tensor)
                 else f"dtype {w.dtype}", TypeError)
    if n == 0:
        return torch.zeros(0, 3)
    like = ws[0]
    if counts is not None and counts.shape != (n,):
        fail("counts", f"one nonzero count per tensor, shape ({n},)", f"shape {tuple(counts.shape)}")
    if n > 1 and any(w.dtype != like.dtype or w.device != like.device for w in ws):
        return torch.stack([sparse_terms([r], [w], None if counts is None else counts[j:j + 1])[0]
                            for j, (r, w) in enumerate(zip(regs, ws))])
    zero = like.new_zeros(())
    weight_rows = [j for j, r in enumerate(regs) if r.beta and r.structure != "filter"]
    l0 = None
    if weight_rows and like.dtype not in (torch.float32, torch.float64):  # a scalar times a reduced-precision
        weight_rows = []  # tensor rounds once (in float32), a tensor product twice: row by row below
    if weight_rows:
        if counts is None:
            nnz = torch.stack([nonzero_count(ws[j]) for j in weight_rows])
        else:
            nnz = counts if len(weight_rows) == n else counts[weight_rows]
        prices = torch.tensor([regs[j].l0_weight(ws[j]) for j in weight_rows], dtype=like.dtype, device=like.device)
        l0 = prices * nnz.to(like.dtype)
    if len(weight_rows) != n:  # filter rows or unpriced rows: assembled row by row
        col = [zero] * n
        for j, v in zip(weight_rows, l0.unbind(0) if l0 is not None else ()):
            col[j] = v
        for j, r in enumerate(regs):
            if r.beta and r.structure == "filter":  # every weight of a nonzero filter is priced
                g = _groups(ws[j])
                col[j] = r.l0_weight(ws[j]) * g.shape[1] * (g != 0).any(1).sum().to(like.dtype)
            elif r.beta and j not in weight_rows:
                c = nonzero_count(ws[j]) if counts is None else counts[j]
                col[j] = r.l0_weight(ws[j]) * c.to(like.dtype)
        l0 = torch.stack(col)
    columns = [l0]
    for rows, op in (([j for j, r in enumerate(regs) if r.lam1], "abs"), ([j for j, r in enumerate(regs) if r.lam2], "sq")):
        if not rows:
            columns.append(like.new_zeros(n))
            continue
        sub = [ws[j] for j in rows]
        vals = [q.sum() for q in (torch._foreach_abs(sub) if op == "abs" else torch._foreach_mul(sub, sub))]
        if len(rows) != n:
            col = [zero] * n
            for j, v in zip(rows, vals):
                col[j] = v
            vals = col
        columns.append(torch.stack(vals))
    return torch.stack(columns, dim=1)


NORMALIZATIONS = ("none", "layer", "group")
STRUCTURES = ("weight", "filter")


def _groups(w: torch.Tensor) -> torch.Tensor:
    """``w`` as ``(groups, group size)``: one row per slice along the first dimension."""
    return w.reshape(w.shape[0], -1) if w.dim() else w.reshape(1, 1)


@dataclasses.dataclass(frozen=True)
class SparseRegularizer:
    """``r(w) = (beta / n) 1[w != 0] + lam1 |w| + (lam2/2) w^2`` on the box ``|w| <= bound``.

    ``normalize`` chooses ``n``, the weight count the L0 term is divided by:

    - ``"none"`` (``n = 1``): ``rho`` is the price of one nonzero weight (the plain L0 count);
    - ``"layer"``: ``n`` = the size of the tensor (``R_l`` = beta x the layer's density);
    - ``"group"``: ``n = count``, the number of weights of the parameter group (filled in by
      :class:`~proxnets.pmp.optimizer.BSQH`): ``R`` = beta x the density of all regularized weights.

    Why normalize: with ``n = 1`` and ~60k weights the L0 price of a useful network exceeds the
    cross-entropy of the all-zero network (``log K``), which is then J's minimizer. Normalized,
    ``rho R <= rho beta`` ("group"), so for ``rho beta < log K - CE`` a trained network beats zero.
    ``bound`` is the admissible set ``U_ad = {|w| <= bound}`` (a box; ``inf``: none): the maximizer
    of the Hamiltonian is taken over it (the prox below clips, then compares with zero).
    ``structure``: ``"weight"`` (each weight its own L0 term) or ``"filter"`` (group L0 over the
    slices along the first dimension, output filters/rows; see the module docstring).
    """

    beta: float = 1.0
    lam1: float = 0.0
    lam2: float = 0.0
    normalize: str = "none"
    count: int | None = None
    bound: float = math.inf
    structure: str = "weight"

    def __post_init__(self) -> None:
        for name in ("beta", "lam1", "lam2"):
            check_number(name, getattr(self, name), low=0.0)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("structure", self.structure, STRUCTURES)
        if self.count is not None:
            check_int("count", self.count, low=1)
        if not (isinstance(self.bound, (int, float)) and self.bound > 0 and not math.isnan(self.bound)):
            fail("bound", "a number > 0 (math.inf: no box)", self.bound)

    def l0_weight(self, w: torch.Tensor) -> float:
        """The L0 price of one nonzero entry of ``w``: ``beta / n``."""
        if self.normalize == "layer":
            return self.beta / max(w.numel(), 1)
        if self.normalize == "group":
            if self.count is None:
                fail("count", "the parameter group's weight count with normalize='group' (BSQH fills it in)",
                     None, ValueError)
            return self.beta / self.count
        return self.beta

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """``R(w) = sum r(w_i)`` (the box is not checked here: the prox never leaves it)."""
        t = self.terms(w)
        return t[0] + self.lam1 * t[1] + 0.5 * self.lam2 * t[2]

    def terms(self, w: torch.Tensor) -> torch.Tensor:
        """``(L0 price of w, |w|_1, |w|^2)`` as a ``(3,)`` tensor: ``R = t0 + lam1 t1 + (lam2 / 2) t2``
        (:func:`sparse_terms` for one tensor)."""
        return sparse_terms([self], [w])[0]

    def prox(self, z: torch.Tensor, t: torch.Tensor | float, out: torch.Tensor | None = None) -> torch.Tensor:
        """The proximal map (module docstring); ``out`` (a tensor of ``z``'s shape, dtype and device; it may be
        ``z`` itself): written there and returned, the same values as without it (the optimizer passes the
        parameter, saving an allocation and a copy)."""
        if out is not None:
            if out is not z and (out.shape != z.shape or out.dtype != z.dtype or out.device != z.device):
                fail("out", f"a tensor like z (shape {tuple(z.shape)}, {z.dtype}, {z.device})",
                     f"shape {tuple(out.shape)}, {out.dtype}, {out.device}")
            if self.structure != "filter" and self.lam1 == 0.0 and isinstance(t, float) and self._clip_only(z, t):
                return self._hard_threshold(z, t, out)
            return out.copy_(self.prox(z, t))
        if self.structure == "filter":
            return self._group_prox(z, t)
        beta = self.l0_weight(z)
        scale = 1.0 + t * self.lam2
        b = self.bound
        clip_only = self._clip_only(z, t)
        if self.lam1 == 0.0 and clip_only and isinstance(t, float):  # the common case: hard thresholding
            return self._hard_threshold(z, t, None)
        if self.lam1 == 0.0 and clip_only:
            keep = z * z > 2.0 * t * beta * scale  # strict: a tie goes to zero
            w = torch.where(keep, z / scale if self.lam2 else z, torch.zeros_like(z))
            return w.clamp_(-b, b) if math.isfinite(b) else w
        shrunk = torch.clamp(z.abs() - t * self.lam1, min=0.0)  # max(|z| - t lam1, 0)
        if clip_only:
            keep = shrunk * shrunk > 2.0 * t * beta * scale
            w = torch.where(keep, torch.sign(z) * shrunk / scale, torch.zeros_like(z))
            return w.clamp_(-b, b) if math.isfinite(b) else w
        # on the box the nonzero branch's minimizer is the clipped one (a convex 1-d problem);
        # keep it iff its value (1/2)(w - z)^2 + t (beta + lam1 |w| + lam2 w^2 / 2) < z^2 / 2
        m = torch.clamp(shrunk / scale, max=self.bound)
        gap = 0.5 * (m - z.abs()) ** 2 + t * (beta + self.lam1 * m + 0.5 * self.lam2 * m * m) - 0.5 * z * z
        keep = (m > 0) & (gap < 0)
        return torch.where(keep, torch.sign(z) * m, torch.zeros_like(z))

    def _clip_only(self, z: torch.Tensor, t: torch.Tensor | float) -> bool:
        # the box only clips: when b^2 (1 + t lam2) / 2 > t beta every clipped entry is kept by both
        # the plain and the boxed comparison with zero (see the docs), so clip the plain result
        b = self.bound
        return not math.isfinite(b) or (isinstance(t, float) and b * b * (1.0 + t * self.lam2)
                                        > 2.0 * t * self.l0_weight(z))

    def _hard_threshold(self, z: torch.Tensor, t: float, out: torch.Tensor | None) -> torch.Tensor:
        """No L1, a float ``t``, the box only clipping: hard thresholding, then the L2 shrink and the clip."""
        scale = 1.0 + t * self.lam2
        b = self.bound
        # |z| > sqrt(2 t beta (1 + t lam2)) <=> z^2 > 2 t beta (1 + t lam2); hardshrink keeps |z| > level
        # strictly (a tie goes to zero) in one pass (a boolean mask + where costs ~10 passes here)
        level = math.sqrt(2.0 * t * self.l0_weight(z) * scale)
        w = torch.nn.functional.hardshrink(z, level) if out is None else torch.hardshrink(z, level, out=out)
        if self.lam2:
            w = w.div_(scale)
        return w.clamp_(-b, b) if math.isfinite(b) else w

    def _group_prox(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The filter-level prox (module docstring): per-coordinate on-branch, one comparison per filter."""
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            fail("t", "a scalar with structure='filter' (one step per tensor)", f"shape {tuple(t.shape)}")
        zg = _groups(z)
        price = t * self.l0_weight(z) * zg.shape[1]  # t x the L0 price of one filter
        scale = 1.0 + t * self.lam2
        if self.lam1 == 0.0 and not math.isfinite(self.bound):  # group hard thresholding of |z_o|
            keep = (zg * zg).sum(1, keepdim=True) > 2.0 * price * scale  # strict: a tie goes to zero
            w = torch.where(keep, zg / scale if self.lam2 else zg, torch.zeros_like(zg))
            return w.reshape(z.shape)
        a = zg.abs()
        m = torch.clamp(torch.clamp(a - t * self.lam1, min=0.0) / scale, max=self.bound)
        gap = 0.5 * (m - a) ** 2 + t * (self.lam1 * m + 0.5 * self.lam2 * m * m) - 0.5 * zg * zg
        keep = (gap.sum(1, keepdim=True) + price < 0) & (m > 0).any(1, keepdim=True)
        return torch.where(keep, torch.sign(zg) * m, torch.zeros_like(zg)).reshape(z.shape)
