"""Benchmark: the routing layer of CapsNet against the textbook implementation, in one run.

Layer: 1152 child capsules (8-D) -> 10 parent capsules (16-D), 3 routing passes, batch 128,
forward + backward. Compared:

- ``textbook``: what public PyTorch CapsNets do -- votes by broadcast ``torch.matmul`` of
  ``W (1, N, M, 16, 8)`` with ``u (B, 1, M, 8, 1)`` into ``(B, N, M, 16)``, softmax over the parent
  axis, inner passes on detached votes. Written here as the baseline.
- ``einsum``: votes materialized by one einsum, routing by einsums (``DenseVotes``).
- ``ours``: ``CapsuleLinear(gradient="last")`` -- the textbook's semantics (inner passes detached). The batch
  is routed in cache-sized chunks whose votes are formed once (``FactoredVotes.parent_major``) and read by
  batched matrix-vector products; the output pass back-propagates through the factored maps, so the
  ``(B, M, N, D)`` votes never exist in full.
- ``ours-all``: ``CapsuleLinear(gradient="all")``, the official code's choice and the library default
  (back-propagation through every pass; more work). At this size (94 MB of votes) one autograd Function
  (``routing._AdjointRouting``) routes cache-sized chunks without a graph, keeps the small per-pass tensors, and in
  backward re-forms each chunk's votes and runs the hand-derived adjoint of the passes.
- ``compiled`` / ``compiled-all``: the same layers with ``backend="compiled"`` (opt-in): the routing passes of
  each cache-sized chunk as one ``torch.compile`` graph (``proxnets.capsules.compiled``). The first call compiles;
  its time is printed separately and excluded from the timings; their peak memory is that of a warm call.

Timing: ``--rounds`` (default 15) interleaved rounds (one call of each implementation and of the matmul per round)
for each ``--threads`` count (e.g. ``--threads 1 2``). Printed per implementation: median and interquartile range
of its times, and the median and IQR of its **per-round** ratios (to the equal-FLOP matmul and to the textbook of
the same round: load from other processes hits a round alike). A target counts as met / not met only when the whole
per-round IQR is on one side of it, else "undecided". Peak memory per implementation in a fresh interpreter.
``RATIOS`` lines and a summary give the three ratios (textbook / ours, ours / equal-FLOP matmul, peak memory
textbook / ours) for ``gradient="last"`` and ``"all"``, eager and compiled. Then the epoch time of the small
CapsNet on mnist5k (``--quick``: extrapolated from 8 steps).

``--capsnet-step`` instead times one training step (forward, loss, backward, Adam) of the quick suite's CapsNet
(28x28 input, conv 32, 4 primary channels, decoder 256/512, ``gradient="all"``, bias, batch 25) with
``backend="eager"`` vs ``"compiled"``, interleaved step by step; the compiling first step is timed separately.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from proxnets.capsules import CapsNet, CapsuleLinear, DenseVotes, capsnet_loss, dynamic_routing, small_config, squash
from proxnets.utils.benchmark import interleaved_rounds, spread, time_interleaved, verdict

B, M, N, D_IN, D_OUT, ITERATIONS = 128, 1152, 10, 8, 16, 3


def textbook_routing(u: torch.Tensor, W: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """The broadcast-matmul CapsNet layer; ``u (B, M, 8)``, ``W (1, N, M, 16, 8)`` -> ``(B, N, 16)``."""
    priors = (W @ u[:, None, :, :, None]).squeeze(-1)  # (B, N, M, 16)
    detached = priors.detach()
    logits = torch.zeros(priors.shape[:3], dtype=u.dtype)  # (B, N, M)
    for t in range(iterations):
        c = torch.softmax(logits, dim=1)  # over parents
        if t < iterations - 1:
            v = squash((c.unsqueeze(-1) * detached).sum(2))  # (B, N, 16)
            logits = logits + (detached * v.unsqueeze(2)).sum(-1)
        else:
            v = squash((c.unsqueeze(-1) * priors).sum(2))
    return v


def build(seed: int = 0):
    """The three implementations on the same weights and inputs: ``{name: fn}`` plus the tensors."""
    torch.manual_seed(seed)
    layer = CapsuleLinear(M, D_IN, N, D_OUT, iterations=ITERATIONS, gradient="last")
    layer_all = CapsuleLinear(M, D_IN, N, D_OUT, iterations=ITERATIONS, gradient="all")
    layer_all.weight.data.copy_(layer.weight.data)
    layer_c = CapsuleLinear(M, D_IN, N, D_OUT, iterations=ITERATIONS, gradient="last", backend="compiled")
    layer_all_c = CapsuleLinear(M, D_IN, N, D_OUT, iterations=ITERATIONS, gradient="all", backend="compiled")
    for lay in (layer_c, layer_all_c):
        lay.weight.data.copy_(layer.weight.data)
    W_text = layer.weight.detach().permute(0, 1, 3, 2).unsqueeze(0).clone().requires_grad_()  # (1, N, M, 16, 8)
    W_dense = layer.weight.detach().clone().requires_grad_()  # (N, M, 8, 16)
    u = squash(torch.randn(B, M, D_IN) * 0.5)
    probe = torch.randn(B, N, D_OUT)  # a fixed random direction for the backward pass

    def layer_step(lay):
        """One fwd+bwd of a routing layer along the fixed probe direction."""
        def run():
            lay.weight.grad = None
            v, _ = lay(u)
            (v * probe).sum().backward()
            return v
        return run

    run_ours, run_ours_all = layer_step(layer), layer_step(layer_all)
    run_compiled, run_all_compiled = layer_step(layer_c), layer_step(layer_all_c)

    def run_einsum():
        W_dense.grad = None
        votes = torch.einsum("bmk,nmkd->bmnd", u, W_dense)  # (B, M, N, 16)
        v, _ = dynamic_routing(DenseVotes(votes, validate=False), ITERATIONS)
        (v * probe).sum().backward()
        return v

    def run_textbook():
        W_text.grad = None
        v = textbook_routing(u, W_text)
        (v * probe).sum().backward()
        return v

    fns = {"ours": run_ours, "ours-all": run_ours_all, "einsum": run_einsum, "textbook": run_textbook,
           "compiled": run_compiled, "compiled-all": run_all_compiled}
    return fns, (layer, layer_all, layer_c, layer_all_c), W_text


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """High-water mark of this process's resident set (``VmHWM``; ``ru_maxrss`` survives exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _memory_child(name: str, threads: int | None, conn) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    fns, _, _ = build()
    if name.startswith("compiled"):
        fns[name]()  # compile first (its memory is the compiler's, not the layer's); the call below is warm
    base = _rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the high-water mark to the current resident set
    except OSError:
        pass
    fns[name]()
    conn.send(_peak_rss_mb() - base)


def peak_memory(name: str, threads: int | None) -> float:
    """Peak resident memory (MiB) one forward+backward adds, in a fresh (spawned) interpreter.

    A forked child of a process whose OpenMP threads have run can hang, so no fork here.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(name, threads, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return float(value)


IMPLS = {"ours": "eager, gradient='last'", "ours-all": "eager, gradient='all' (default)",
         "compiled": "compiled, gradient='last'", "compiled-all": "compiled, gradient='all'"}


def main(quick: bool, threads: list[int] | None, rounds: int) -> None:
    import os

    fns, (layer, layer_all, layer_c, layer_all_c), W_text = build()
    run_ours, run_einsum, run_textbook = fns["ours"], fns["einsum"], fns["textbook"]

    v_ours, v_e, v_t = run_ours(), run_einsum(), run_textbook()
    g_ours = layer.weight.grad
    compile_s = {}
    for name in ("compiled", "compiled-all"):  # the first call compiles (torch also caches kernels on disk)
        t0, c0 = time.perf_counter(), time.process_time()
        fns[name]()
        compile_s[name] = (time.perf_counter() - t0, time.process_time() - c0)
    v_all = fns["ours-all"]()
    v_c, v_all_c = fns["compiled"](), fns["compiled-all"]()
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    g_t = W_text.grad[0].permute(0, 1, 3, 2)
    print(f"routing layer {M}x{D_IN} -> {N}x{D_OUT}, {ITERATIONS} passes, batch {B}, forward+backward")
    print(f"max |v_ours - v_textbook| = {float((v_ours - v_t).detach().abs().max()):.2e}, "
          f"max |v_einsum - v_textbook| = {float((v_e - v_t).detach().abs().max()):.2e}, "
          f"max |dW_ours - dW_textbook| / max |dW| = {float((g_ours - g_t).abs().max() / g_t.abs().max()):.2e}")
    print(f"backend='compiled' vs eager: gradient='last' max |dv| = {float((v_c - v_ours).detach().abs().max()):.2e}, "
          f"max |dW| rel = {rel(layer_c.weight.grad, layer.weight.grad):.2e}; gradient='all' max |dv| = "
          f"{float((v_all_c - v_all).detach().abs().max()):.2e}, max |dW| rel = "
          f"{rel(layer_all_c.weight.grad, layer_all.weight.grad):.2e}")
    print("compile (first call, excluded from the timings): " + ", ".join(
        f"{k} {w:.1f} s wall / {c:.1f} s CPU" for k, (w, c) in compile_s.items()))

    # The reference FLOPs (fixed since issue 16, so that the ratio stays comparable): the factored algorithm's
    # 5 forward passes of the trilinear map (2 x combine+agree, 1 combine) and 2 backward ones (weights,
    # inputs), each 2 * B * M * N * d_in * d_out. The same matmul is the reference of every implementation
    # (gradient='all' does more work than this count: its ratio is the stricter statement).
    trilinear = 2 * B * M * N * D_IN * D_OUT
    flops = 7 * trilinear
    n = round((flops / 2) ** (1 / 3))
    a, b = torch.randn(n, n), torch.randn(n, n)
    timed = {"textbook": run_textbook, **{k: fns[k] for k in IMPLS}, "matmul": lambda: a @ b}
    summary = []
    for th in threads or [torch.get_num_threads()]:
        torch.set_num_threads(th)
        load0, c0 = os.getloadavg()[0], time.process_time()
        times = interleaved_rounds(timed, rounds)
        print(f"\n== {th} thread(s), {rounds} interleaved rounds, load {load0:.1f} -> {os.getloadavg()[0]:.1f}, "
              f"process CPU {time.process_time() - c0:.0f} s ==")
        for name, ts in times.items():
            med, q1, q3 = spread(ts)
            print(f"  {name:13s} median {med * 1e3:8.1f} ms  IQR {q1 * 1e3:8.1f}-{q3 * 1e3:8.1f}")
        print(f"  matmul of equal FLOPs: {flops / 1e9:.2f} GFLOP ({n}x{n}), "
              f"{flops / spread(times['matmul'])[0] / 1e9:.1f} GFLOP/s")
        for name, what in IMPLS.items():
            per_mm = spread([x / y for x, y in zip(times[name], times["matmul"])])
            per_text = spread([y / x for x, y in zip(times[name], times["textbook"])])
            line = (f"RATIOS {th}t {name} ({what}): / matmul {per_mm[0]:.2f}x (per-round IQR {per_mm[1]:.2f}-"
                    f"{per_mm[2]:.2f}; <= 2x: {verdict(per_mm, 2.0, True)}); vs textbook {per_text[0]:.1f}x faster "
                    f"(IQR {per_text[1]:.1f}-{per_text[2]:.1f}; >= 20x: {verdict(per_text, 20.0, False)})")
            print(line)
            summary.append(line)
        all_last = spread([x / y for x, y in zip(times["ours-all"], times["ours"])])
        print(f"  per-round eager 'all' / 'last' {all_last[0]:.2f}x (IQR {all_last[1]:.2f}-{all_last[2]:.2f})")
        for th_name in ("ours", "ours-all"):
            comp = "compiled" + th_name[4:]
            r = spread([x / y for x, y in zip(times[comp], times[th_name])])
            print(f"  per-round {comp} / eager {th_name}: {r[0]:.2f}x (IQR {r[1]:.2f}-{r[2]:.2f})")

        mem = {name: peak_memory(name, th) for name in ("textbook", *IMPLS)}
        print("  peak memory (MiB, one fwd+bwd in a fresh interpreter; compiled: a warm call): " +
              ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
        for name in IMPLS:
            # under 1 MiB the resident-memory difference is page granularity, not a size: no ratio from it
            ratio = (f"{mem['textbook'] / mem[name]:.1f}x" if mem[name] >= 1.0 else
                     f"> {mem['textbook']:.0f}x ({name} added {mem[name]:.2f} MiB, below the 1 MiB resolution)")
            line = (f"RATIOS {th}t {name}: peak memory textbook / {name} {ratio} "
                    f"(no higher: {'met' if mem[name] <= mem['textbook'] else 'not met'})")
            print(line)
            summary.append(line)
    print("\nsummary:\n" + "\n".join(summary))
    if threads:
        torch.set_num_threads(threads[0])

    from proxnets.data import load_dataset
    from proxnets.engine import TrainConfig, fit

    ds = load_dataset("mnist5k")
    model = CapsNet(small_config(ds.input_shape, ds.num_classes))
    steps = 8 if quick else None
    cfg = TrainConfig(epochs=1, batch_size=128, lr=1e-3, progress=False, max_steps=steps, eval_every_epoch=False)
    t0 = time.perf_counter()
    fit(model, ds, cfg, loss_fn=capsnet_loss, log=lambda msg: None)
    elapsed = time.perf_counter() - t0
    per_epoch = elapsed * (len(ds.x_train) / (steps * 128)) if steps else elapsed
    how = f"extrapolated from {steps} steps" if steps else "measured"
    print(f"small CapsNet ({model.num_parameters():,} parameters) on mnist5k: {per_epoch:.1f} s per epoch "
          f"of {len(ds.x_train)} images, batch 128 ({how}, {torch.get_num_threads()} threads)")


def capsnet_step(quick: bool, threads: list[int] | None) -> None:
    """Training-step time of the quick suite's CapsNet, eager vs compiled routing (see the module docstring)."""
    import os

    if threads:
        torch.set_num_threads(threads[0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(25, 1, 28, 28, generator=g), torch.randint(0, 10, (25,), generator=g)
    steps = {}
    for backend in ("eager", "compiled"):
        torch.manual_seed(0)  # the same initial weights for both
        model = CapsNet(small_config((1, 28, 28), 10, conv_channels=32, primary_channels=4, decoder_hidden=(256, 512),
                                     backend=backend))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)

        def step(model=model, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            loss, _ = capsnet_loss(model, x, y)
            loss.backward()
            opt.step()
            return float(loss.detach())

        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()  # compiles for "compiled" (forward graph + AOT backward; torch caches kernels on disk)
        print(f"first step {backend}: {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU, "
              f"loss {loss:.6f}")
        steps[backend] = step
    print(f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} before timing")
    timings = time_interleaved(steps, warmup=1, repeats=20 if quick else 60)
    for name, t in timings.items():
        print(f"capsnet step {name}: {t}")
    print(f"eager / compiled = {timings['eager'].median / timings['compiled'].median:.2f}x, "
          f"load {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="epoch time from 8 steps")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts, each timed in its own interleaved rounds (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per thread count (default 15)")
    parser.add_argument("--capsnet-step", action="store_true",
                        help="only: training step of the quick suite's CapsNet, eager vs backend='compiled'")
    args = parser.parse_args()
    if args.capsnet_step:
        capsnet_step(args.quick, args.threads)
    else:
        main(args.quick, args.threads, args.rounds)
