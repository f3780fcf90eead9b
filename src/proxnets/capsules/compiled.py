"""Opt-in fused routing: the untraced, fixed-pass routing call as one ``torch.compile`` graph.

``dynamic_routing(..., backend="compiled")`` (and ``CapsuleLinear(backend="compiled")``) runs the same procedure
as the eager code -- votes ``u_hat[b, j, i] = u[b, i] @ W[j, i]`` formed parent-major, ``r`` passes of

    s_j = sum_i c_ij u_hat_ij (+ beta_j),   v_j = squash(s_j),   b <- decay * b + lambda <u_hat_ij, v_j>,
    b <- max(b - max_j b, -floor),          C = softmax_j(b)

and the output pass -- written as plain tensor code that inductor fuses (CPU: C++/OpenMP kernels, so a C++
compiler is required; CUDA: Triton). The passes are :func:`proxnets.capsules.routing._route_passes`, the loop every
routing path runs, with einsum products: values, couplings and gradients agree with the eager paths up to float
round-off (tested in float64).

Only the fixed-pass call without ``trace``/``tol`` is compiled; traced or tolerance-stopped calls (and so every
certificate: energy, KKT gap, symmetric KL) always run the eager code, unchanged. ``gradient="last"`` detaches
the votes and the bias in the inner passes and the couplings of the output pass, as the eager code does.

Compilation happens on the first call of each shape/option combination (tens of seconds on a loaded CPU;
``dynamic=False``: every new batch size recompiles) and is cached by torch for the process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil

import torch

from proxnets.capsules.routing import _route_passes

__all__ = ["RECOMPILE_LIMIT", "compiler_available", "compiled_routing"]


def compiler_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """``(ok, why)``: whether ``torch.compile``'s inductor backend can build kernels for ``device``.

    CPU needs a C++ compiler (``$CXX``, ``g++``, ``c++`` or ``clang++`` on the PATH); CUDA needs Triton.
    """
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "torch.compile on CUDA needs triton, which is not installed"
        return True, ""
    if device.type != "cpu":
        return False, f"no inductor backend tested for device {device.type!r}"
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(n and shutil.which(n) for n in names):
        return False, "torch.compile (inductor) on CPU needs a C++ compiler ($CXX, g++, c++ or clang++); none found"
    return True, ""


def _passes(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, decay: torch.Tensor | None,
            lam: torch.Tensor | None, init: torch.Tensor | None, iterations: int, detach_inner: bool, leaky: bool,
            floor: float, mulsum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing call as tensor code. ``weight`` given: ``u (B, M, K)``, ``weight (N, M, K, D)``; else ``u`` is
    the dense votes ``(B, M, N, D)``. ``decay``/``lam`` ``(B, 1, 1)`` only for regularized routing. Returns
    ``v (B, N, D)`` and the output pass's couplings ``(B, M, N)``; with ``detach_inner`` (``gradient="last"``, run
    without gradients) ``s`` without the bias instead of ``v``."""
    if weight is None:
        votes = u.permute(0, 2, 1, 3)  # (B, N, M, D) view
    elif mulsum:  # an elementwise product summed over k: one fused loop nest instead of a batched product
        votes = (u[:, None, :, :, None] * weight[None]).sum(3)
    else:
        votes = torch.einsum("bmk,nmkd->bnmd", u, weight)  # parent-major, as ParentMajorVotes
    B, N, M, _ = votes.shape
    inner = votes.detach() if detach_inner else votes
    logits = votes.new_zeros(B, N + int(leaky), M)  # batch-major: softmax over dim 1 (the parents)
    if init is not None:
        logits = torch.cat([init.permute(0, 2, 1), logits[:, N:]], 1) if leaky else init.permute(0, 2, 1)
    s, v, c, _, _ = _route_passes(
        lambda c, final: torch.einsum("bnm,bnmd->bnd", c, votes if final else inner),
        lambda v, final: torch.einsum("bnmd,bnd->bnm", inner, v),  # agreement = -grad E(C)
        logits, max(iterations, 1), pdim=1, leaky=leaky, bias=bias,
        inner_bias=None if bias is None else (bias.detach() if detach_inner else bias), decay=decay, lam=lam,
        sign=1.0, axis="parents", floor=floor, inplace=False, uniform=init is None)
    c = c[:, :N]
    if detach_inner:  # gradient="last": the caller runs the output pass with gradients (eager factored kernels)
        return s, c.permute(0, 2, 1)
    return v, c.detach().permute(0, 2, 1)


RECOMPILE_LIMIT = 64
_MULSUM = True  # votes as a product summed over k (measured 2x faster than the einsum for gradient="all")


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(_passes, dynamic=False, fullgraph=True)


def compiled_routing(u: torch.Tensor, weight: torch.Tensor | None, *, iterations: int, gradient: str, leaky: bool,
                     bias: torch.Tensor | None, decay: torch.Tensor | None, lam: torch.Tensor | None,
                     initial_logits: torch.Tensor | None, floor: float, chunk_bytes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`_passes` compiled over chunks of the batch of about ``chunk_bytes`` of votes each.

    Why chunks: routing is per sample, and a chunk's votes stay in the cache while its passes read them (the whole
    batch's 94 MB at the benchmark size made every pass a trip to memory: 2x slower, measured). At most two chunk
    sizes (the tail), so at most two compilations per call shape. ``RuntimeError`` (with the reason) when no
    compiler is available.
    """
    ok, why = compiler_available(u.device)
    if not ok:
        raise RuntimeError(f"backend: expected a working torch.compile toolchain for backend='compiled', got none "
                           f"({why}); use backend='eager'")
    B = u.shape[0]
    per_sample = (u[0].numel() if weight is None else weight.shape[0] * weight.shape[1] * weight.shape[3]) * u.itemsize
    step = max(1, min(B, chunk_bytes // max(per_sample, 1)))
    fn = _compiled()
    last = gradient == "last"
    vs, cs = [], []
    # every option set and chunk size is one graph (dynamic=False): allow up to RECOMPILE_LIMIT of them, then raise
    # rather than silently run eager under the name "compiled"
    import torch._dynamo

    def limits():
        return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)

    for b0 in range(0, B, step):
        sl = slice(b0, min(b0 + step, B))
        rows = (lambda x: x if x is None or (x is bias and x.ndim == 2) else x[sl])  # a shared (N, D) bias: whole
        with limits(), torch.no_grad() if last else contextlib.nullcontext():
            v, c = fn(u[sl], weight, rows(bias), rows(decay), rows(lam), rows(initial_logits), int(iterations),
                      last, bool(leaky), float(floor), _MULSUM)
        vs.append(v)
        cs.append(c)
    return (vs[0], cs[0]) if len(vs) == 1 else (torch.cat(vs), torch.cat(cs))
