"""Votes (prediction vectors) and the two linear maps routing needs.

Routing between ``M`` child capsules and ``N`` parent capsules of dimension ``D`` only ever touches
the votes ``u_hat[b, i, j]`` (child ``i``'s prediction for parent ``j`` in sample ``b``) through

    combine:  A(c)[b, j]     = sum_i c[b, i, j] * u_hat[b, i, j]          (B, M, N) -> (B, N, D)
    agree:    A^*(v)[b, i, j] = <u_hat[b, i, j], v[b, j]>                 (B, N, D) -> (B, M, N)

and ``agree`` is the adjoint of ``combine``: ``<A(c), v> = <c, A^*(v)>``. Two implementations:

- :class:`DenseVotes` holds an explicit ``(B, M, N, D)`` tensor (any votes a user has).
- :class:`FactoredVotes` holds the votes of a capsule layer as the product
  ``u_hat[b, i, j] = u[b, i] @ weight[j, i]`` with child capsules ``u (B, M, d_in)`` and transformation
  matrices ``weight (N, M, d_in, D)``, and never forms ``u_hat``. Both maps become batched
  matrix products over the parents with ``x[j, b, (i, k)] = c[b, i, j] * u[b, i, k]``:

      A(c)[b, j]      = x[j, b, :] @ weight[j].reshape(M * d_in, D)
      A^*(v)[b, i, j] = sum_k u[b, i, k] * (v[b, j] @ weight[j].reshape(M * d_in, D).T)[i, k]

  They run over chunks of the batch so that every temporary stays in cache, and their backward
  passes recompute ``x`` instead of storing it: memory stays at the size of ``u``, ``weight`` and
  the couplings, never of the votes.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from proxnets.utils.buffers import workspace_buffer  # re-exported (it was defined here first)
from proxnets.utils.validation import check_tensor, fail

__all__ = ["Votes", "DenseVotes", "FactoredVotes", "ParentMajorVotes", "form_parent_major", "workspace_buffer",
           "as_votes"]

# Elements of one chunk's temporary (N, chunk, M * d_in): 2^20 floats = 4 MiB in float32, which stays
# in the cache of the machines we measured; larger chunks are slower (the kernels are memory-bound).
_CHUNK_ELEMENTS = 1 << 20
# Elements of one block of freshly formed child-major votes (form_parent_major with a workspace): 2^17 floats =
# 512 KiB, which stays in a core's L2 until the transposing copy reads it. Forming a whole 8 MiB chunk first and
# copying it after went through the shared last-level cache twice: 0.81x the layer's time with blocks (1 thread,
# 30 interleaved rounds; 2^16-2^19 within 0.82-0.86x, 2^15 0.95x: too many small calls).
_FORM_BLOCK_ELEMENTS = 1 << 17


class Votes:
    """The votes ``u_hat (B, M, N, D)`` seen through ``combine`` and ``agree`` (see module docstring)."""

    batch: int
    children: int
    parents: int
    dim: int

    def combine(self, c: torch.Tensor) -> torch.Tensor:  # (B, M, N) -> (B, N, D)
        raise NotImplementedError

    def agree(self, v: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, M, N)
        raise NotImplementedError

    def detach(self) -> "Votes":
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The explicit ``(B, M, N, D)`` votes (tests, small problems)."""
        raise NotImplementedError

    def vote_scale(self) -> torch.Tensor:
        """An upper bound of ``S_b = sum_i max_j |u_hat[b, i, j]|`` per sample, shape ``(B,)``.

        It bounds every ``|s_j|`` sum and every agreement sum of routing (``|v_j| < 1``), hence the
        size of their rounding errors (:mod:`proxnets.capsules.certificate`).
        """
        raise NotImplementedError

    def vote_max(self) -> torch.Tensor:
        """An upper bound of ``max_{i,j} |u_hat[b, i, j]|`` per sample, shape ``(B,)``."""
        raise NotImplementedError

    def column_sq_norms(self) -> torch.Tensor:
        """``sum_i |u_hat[b, i, j]|^2`` per sample and parent, shape ``(B, N)`` (the squared Frobenius norm
        of the ``M x D`` votes for parent ``j``: it bounds the curvature of the routing energy)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError


class DenseVotes(Votes):
    """Explicit votes ``u_hat`` of shape ``(B, M, N, D)``."""

    def __init__(self, u_hat: torch.Tensor, *, validate: bool = True):
        if validate:
            check_tensor("votes", u_hat, ndim=4)
        self.u_hat = u_hat
        self.batch, self.children, self.parents, self.dim = u_hat.shape

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bmn,bmnd->bnd", c, self.u_hat)  # (B, N, D)

    def agree(self, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bmnd,bnd->bmn", self.u_hat, v)  # (B, M, N)

    def detach(self) -> "DenseVotes":
        return DenseVotes(self.u_hat.detach(), validate=False)

    def dense(self) -> torch.Tensor:
        return self.u_hat

    def vote_scale(self) -> torch.Tensor:
        return self.u_hat.norm(dim=-1).amax(-1).sum(-1)  # exact

    def vote_max(self) -> torch.Tensor:
        return self.u_hat.norm(dim=-1).flatten(1).amax(-1)  # exact

    def column_sq_norms(self) -> torch.Tensor:
        return self.u_hat.pow(2).sum((1, 3))  # (B, N)

    @property
    def dtype(self) -> torch.dtype:
        return self.u_hat.dtype

    @property
    def device(self) -> torch.device:
        return self.u_hat.device


def _chunks(batch: int, per_sample: int, budget: int = _CHUNK_ELEMENTS) -> list[slice]:
    """Slices of ``range(batch)`` of at most ``budget // per_sample`` items (at least one) each."""
    step = max(1, min(batch, budget // max(per_sample, 1)))
    return [slice(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


def _child_blocks(children: int, per_child: int) -> list[slice]:
    """Blocks of children whose child-major votes (``per_child`` numbers each) fit in ``_FORM_BLOCK_ELEMENTS``: what a
    transposition between the child-major and the parent-major layout reads or writes while it is still in cache."""
    return _chunks(children, per_child, _FORM_BLOCK_ELEMENTS)


def _parent_major(p: torch.Tensor, sl: slice) -> torch.Tensor:
    """``p[sl]`` of logical shape ``(b, M, N)`` as a contiguous ``(N, b, M, 1)``."""
    return p[sl].permute(2, 0, 1).contiguous().unsqueeze(-1)


def _combine_kernel(c: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``s[b, j] = sum_{i,k} c[b,i,j] u[b,i,k] w[j, i*k, :]``; c (B,M,N), u (B,M,K), w (N, M*K, D)."""
    B, M, K = u.shape
    N, _, D = w.shape
    out = torch.empty(N, B, D, dtype=w.dtype, device=w.device)
    for sl in _chunks(B, N * M * K):
        x = _parent_major(c, sl) * u[sl]  # (N, b, M, K), contiguous
        out[:, sl] = torch.bmm(x.view(N, -1, M * K), w)  # (N, b, D)
    return out.transpose(0, 1)  # (B, N, D)


def _agree_kernel(v: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a[b, i, j] = sum_{k,d} u[b,i,k] w[j, i*k, d] v[b,j,d]``; v (B,N,D) -> a (B,M,N).

    The result is a ``(B, M, N)`` view of a parent-major ``(N, B, M)`` buffer: routing keeps its
    logits in that layout, where the softmax over parents is fast.
    """
    B, M, K = u.shape
    N = w.shape[0]
    out = torch.empty(N, B, M, dtype=w.dtype, device=w.device)
    wt = w.transpose(1, 2)  # (N, D, M*K), a strided view: BLAS reads it transposed
    vt = v.transpose(0, 1)  # (N, B, D)
    for sl in _chunks(B, N * M * K):
        b = sl.stop - sl.start
        z = torch.bmm(vt[:, sl], wt).view(N, b * M, K)  # (N, b*M, K): rows W_ij^T v_j
        us = u[sl].reshape(b * M, K, 1)  # (b*M, K, 1)
        out[:, sl] = torch.bmm(z.transpose(0, 1), us).view(b, M, N).permute(2, 0, 1)  # (N, b, M)
    return out.permute(1, 2, 0)  # (B, M, N) view


def _trilinear_grads(p, y, u, w, need_u: bool, need_w: bool):
    """Gradients in ``u`` and ``w`` of ``T = sum p[b,i,j] u[b,i,k] w[j,i*k,d] y[b,j,d]``.

    ``combine`` and ``agree`` are the partial derivatives of this one trilinear form (in ``y`` and in
    ``p``), so their backward passes share this routine: ``p (B,M,N)``, ``y (B,N,D)``.
    """
    B, M, K = u.shape
    N, _, D = w.shape
    gu = torch.empty_like(u) if need_u else None
    gw = torch.zeros_like(w) if need_w else None
    wt = w.transpose(1, 2)  # (N, D, M*K)
    yt = y.transpose(0, 1)  # (N, B, D)
    chunks = _chunks(B, N * M * K)
    b_max = chunks[0].stop - chunks[0].start
    # one buffer each for every chunk (fresh chunk-sized tensors cost page faults: workspace_buffer)
    p_buf = torch.empty(N, b_max, M, 1, dtype=w.dtype, device=w.device)
    x_buf = torch.empty(N, b_max, M, K, dtype=w.dtype, device=w.device) if need_w else None
    for sl in chunks:
        b = sl.stop - sl.start
        pt = p_buf[:, :b]
        pt.copy_(p[sl].permute(2, 0, 1).unsqueeze(-1))  # (N, b, M, 1) parent-major
        if need_w:
            x = torch.mul(pt, u[sl], out=x_buf[:, :b]).view(N, b, M * K)  # (N, b, M*K)
            gw.baddbmm_(x.transpose(1, 2), yt[:, sl])  # (N, M*K, D)
        if need_u:
            z = torch.bmm(yt[:, sl], wt).view(N, b, M, K)  # (N, b, M, K)
            gu[sl] = (z * pt).sum(0)  # (b, M, K)
    return gu, gw


class _Partial(torch.autograd.Function):
    """``combine`` (``dT/dy``, input ``c``) or ``agree`` (``dT/dp``, input ``v``) of the trilinear form
    ``T(p, u, w, y)``, with a backward pass that recomputes instead of storing the votes."""

    @staticmethod
    def forward(ctx, which, x, u, w):
        ctx.which = which
        ctx.save_for_backward(x, u, w)
        return _combine_kernel(x, u, w) if which == "combine" else _agree_kernel(x, u, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, u, w = ctx.saved_tensors
        if ctx.which == "combine":  # x = p (couplings), g in the place of y
            gx = _agree_kernel(g, u, w) if ctx.needs_input_grad[1] else None
            gu, gw = _trilinear_grads(x, g, u, w, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        else:  # x = y (parent capsules), g in the place of p
            gx = _combine_kernel(g, u, w) if ctx.needs_input_grad[1] else None
            gu, gw = _trilinear_grads(g, x, u, w, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        return None, gx, gu, gw


class _GivenCombine(torch.autograd.Function):
    """``combine(c)`` whose value ``s`` is already known (computed from formed votes): returns ``s`` and
    back-propagates to ``u`` and ``w`` with the couplings held constant (the factored gradient routine)."""

    @staticmethod
    def forward(ctx, s, c, u, w):
        ctx.save_for_backward(c, u, w)
        return s.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        c, u, w = ctx.saved_tensors
        gu, gw = _trilinear_grads(c, g, u, w, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        return None, None, gu, gw


class FactoredVotes(Votes):
    """Votes ``u_hat[b, i, j] = u[b, i] @ weight[j, i]`` of a capsule layer, never materialized.

    ``u``: child capsules ``(B, M, d_in)``; ``weight``: ``(N, M, d_in, D)``.
    """

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, *, validate: bool = True):
        if validate:
            check_tensor("weight", weight, ndim=4)
            check_tensor("u", u, shape=(None, weight.shape[1], weight.shape[2]))
            if u.dtype != weight.dtype or u.device != weight.device:
                fail("u", f"dtype {weight.dtype} on {weight.device} (those of weight)", f"{u.dtype} on {u.device}")
        self.u = u.contiguous()
        self.weight = weight
        self.batch, self.children, _ = u.shape
        self.parents, _, _, self.dim = weight.shape
        self._w = weight.reshape(self.parents, -1, self.dim)  # (N, M*d_in, D), a view when contiguous
        self._wi: torch.Tensor | None = None  # (M, d_in, N*D) for parent_major, formed on first use

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        return _Partial.apply("combine", c, self.u, self._w)  # any strides: the kernels read c parent-major

    def agree(self, v: torch.Tensor) -> torch.Tensor:
        return _Partial.apply("agree", v, self.u, self._w)

    def combine_given(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``combine(c)`` when its value ``s`` (B, N, D) is known: ``s`` with gradients to ``u`` and ``weight``
        (not to ``c``, a constant here)."""
        return _GivenCombine.apply(s.detach(), c.detach(), self.u, self._w)

    def detach(self) -> "FactoredVotes":
        return FactoredVotes(self.u.detach(), self.weight.detach(), validate=False)

    def parent_major(self, batch: slice | None = None) -> ParentMajorVotes:
        """The explicit votes of the samples ``batch`` (all by default) as :class:`ParentMajorVotes`:
        one product per child, ``u[:, i] (b, d_in) @ [W_1i .. W_Ni] (d_in, N D)``, then one transpose
        into the parent-major layout. Differentiable in ``u`` and ``weight``."""
        u = self.u if batch is None else self.u[batch]
        return form_parent_major(u, self.child_major_weight(), self.parents)

    def child_major_weight(self) -> torch.Tensor:
        """``weight`` as ``(M, d_in, N D)`` (a copy, formed once): the operand of :func:`form_parent_major`."""
        if self._wi is None or (torch.is_grad_enabled() and self.weight.requires_grad and not self._wi.requires_grad):
            N, M, K, D = self.weight.shape  # (re)formed with a graph when one is wanted and the cached has none
            self._wi = self.weight.permute(1, 2, 0, 3).reshape(M, K, N * D)
        return self._wi

    def dense(self) -> torch.Tensor:
        return torch.einsum("bmk,nmkd->bmnd", self.u, self.weight)  # (B, M, N, D)

    def vote_scale(self) -> torch.Tensor:
        # |u_i W_ji| <= |u_i| |W_ji|_F: an upper bound without forming the votes
        w_norm = self.weight.flatten(2).norm(dim=-1).amax(0)  # (M,) max over parents of |W_ji|_F
        return (self.u.norm(dim=-1) * w_norm).sum(-1)  # (B,)

    def vote_max(self) -> torch.Tensor:
        w_norm = self.weight.flatten(2).norm(dim=-1).amax(0)  # (M,)
        return (self.u.norm(dim=-1) * w_norm).amax(-1)  # (B,)

    def column_sq_norms(self) -> torch.Tensor:
        # |u_i W_ji|^2 = u_i^T (W_ji W_ji^T) u_i: one small Gram matrix per pair, no votes formed
        gram = self.weight @ self.weight.transpose(-1, -2)  # (N, M, K, K)
        out = torch.empty(self.batch, self.parents, dtype=self.dtype, device=self.device)
        for sl in _chunks(self.batch, self.parents * self.u.shape[1] * self.u.shape[2]):
            out[sl] = torch.einsum("bmk,nmkl,bml->bn", self.u[sl], gram, self.u[sl])
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device


class ParentMajorVotes(Votes):
    """Explicit votes stored parent-major, ``U[b, j] = (u_hat[b, i, j])_i`` of shape ``(B, N, M, D)``.

    Both maps become one batched matrix-vector product over the ``B * N`` pairs ``(b, j)``:
    ``A(c)[b, j] = c[b, :, j] @ U[b, j]`` and ``A^*(v)[b, :, j] = U[b, j] @ v[b, j]``, each a single
    pass over ``U`` (memory-bound, in cache for the sizes routing uses), against ``d_in`` times the
    arithmetic of the factored maps. Routing makes ``2 r - 1`` such calls on the same votes, so forming
    ``U`` once (:meth:`FactoredVotes.parent_major`, one batched product) pays for itself from ``r = 2``.
    Differentiable (autograd through ``bmm``); ``U`` is what backward keeps, ``B N M D`` numbers.
    """

    def __init__(self, u_pm: torch.Tensor, *, validate: bool = True):
        if validate:
            check_tensor("votes", u_pm, ndim=4)
        self.u_pm = u_pm.contiguous()
        self.batch, self.parents, self.children, self.dim = u_pm.shape

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        B, N, M, D = self.u_pm.shape
        cp = c.permute(0, 2, 1).reshape(B * N, 1, M)  # (b, j) rows; a copy unless c is parent-major already
        return torch.bmm(cp, self.u_pm.view(B * N, M, D)).view(B, N, D)

    def agree(self, v: torch.Tensor) -> torch.Tensor:
        B, N, M, D = self.u_pm.shape
        # v^T U^T: BLAS reads U transposed (measured 3x faster than U @ v for these shapes)
        a = torch.bmm(v.reshape(B * N, 1, D), self.u_pm.view(B * N, M, D).transpose(1, 2))  # (B N, 1, M)
        return a.view(B, N, M).permute(0, 2, 1)  # (B, M, N) view of a parent-major buffer

    def detach(self) -> "ParentMajorVotes":
        return ParentMajorVotes(self.u_pm.detach(), validate=False)

    def dense(self) -> torch.Tensor:
        return self.u_pm.permute(0, 2, 1, 3)

    def vote_scale(self) -> torch.Tensor:
        return self.u_pm.norm(dim=-1).amax(1).sum(-1)  # exact

    def vote_max(self) -> torch.Tensor:
        return self.u_pm.norm(dim=-1).flatten(1).amax(-1)  # exact

    def column_sq_norms(self) -> torch.Tensor:
        return self.u_pm.pow(2).sum((2, 3))  # (B, N)

    @property
    def dtype(self) -> torch.dtype:
        return self.u_pm.dtype

    @property
    def device(self) -> torch.device:
        return self.u_pm.device


def form_parent_major(u: torch.Tensor, wi: torch.Tensor, parents: int, workspace: dict | None = None) -> ParentMajorVotes:
    """Votes of ``u (b, M, d_in)`` and ``wi (M, d_in, N D)`` (:meth:`FactoredVotes.child_major_weight`) as
    :class:`ParentMajorVotes`: one batched product per child, ``u[:, i] @ wi[i]``, then one transposing copy.
    With a ``workspace`` (no autograd) the votes land in its reused buffer ``"pm"``, formed and copied a block of
    children at a time through the small buffer ``"cm"`` (``_FORM_BLOCK_ELEMENTS``: the block is still in cache
    when it is copied)."""
    M, _, ND = wi.shape
    b, D = u.shape[0], ND // parents
    if workspace is None:
        pm = torch.bmm(u.transpose(0, 1), wi)  # (M, b, N D)
        return ParentMajorVotes(pm.view(M, b, parents, D).permute(1, 2, 0, 3), validate=False)
    out = workspace_buffer(workspace, "pm", (b, parents, M, D), wi)
    ut = u.transpose(0, 1)  # (M, b, d_in)
    for blk in _child_blocks(M, b * ND):
        mi = blk.stop - blk.start
        cm = torch.bmm(ut[blk], wi[blk], out=workspace_buffer(workspace, "cm", (mi, b, ND), wi))
        out[:, :, blk].copy_(cm.view(mi, b, parents, D).permute(1, 2, 0, 3))
    return ParentMajorVotes(out, validate=False)


def as_votes(votes: torch.Tensor | Votes) -> Votes:
    """Wrap a ``(B, M, N, D)`` tensor as :class:`DenseVotes`; pass :class:`Votes` through."""
    if isinstance(votes, Votes):
        return votes
    if isinstance(votes, torch.Tensor):
        return DenseVotes(votes)
    fail("votes", "a (B, M, N, D) tensor or a Votes object", type(votes).__name__, TypeError)
