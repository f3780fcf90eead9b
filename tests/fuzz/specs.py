"""Public entry points and bad inputs for the fuzz suite and ``count_outcomes.py``.

Each :class:`Entry` is a public call with a small valid baseline (built from a seed and a batch
size) and the roles of its arguments. :func:`mutations` derives bad or edge inputs from the roles;
:func:`run` calls once and classifies the outcome:

- ``ok``: finite results (or a warning, for a non-finite input);
- ``clear``: ValueError/TypeError whose message names the argument;
- ``unclear``: any other exception, or one that does not name the argument;
- ``nan_from_finite``: NaN/inf out of finite input;
- ``nan_passed``: NaN/inf input passed through to the result without error;
- ``accepted``: an invalid input (must be refused) returned a result.

The property of the suite: every call is ``ok`` or ``clear``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable

import torch
from torch import nn

Builder = Callable[[torch.Generator, int], dict]


@dataclasses.dataclass
class Entry:
    package: str
    name: str
    fn: Callable[..., Any]
    build: Builder  # (generator, batch) -> kwargs of a valid call
    data: tuple[str, ...] = ()  # float tensor args with a batch dimension 0
    labels: tuple[str, ...] = ()  # class-index vector args (same batch)
    tensors: tuple[str, ...] = ()  # other float tensor args (no batch semantics)
    positive: tuple[str, ...] = ()  # numbers that must be > 0
    nonneg: tuple[str, ...] = ()  # numbers that must be >= 0
    rank_free: bool = False  # any rank is valid for the data args
    empty_ok: bool = True  # an empty batch may return an (empty, finite) result
    scale_safe: tuple[str, ...] = ()  # data args for which huge finite values must give finite results
    elementwise: bool = False  # documented: NaN/inf propagate elementwise (a hot-path map, no check)


@dataclasses.dataclass
class Mutation:
    arg: str
    what: str
    kind: str  # "invalid" (must raise), "either" (finite result or clear error), "valid" (must be finite)
    apply: Callable[[dict], None]
    nonfinite: bool = False


def _set(arg, f):
    def apply(kw):
        kw[arg] = f(kw[arg])
    return apply


def mutations(entry: Entry, kw: dict) -> list[Mutation]:
    out: list[Mutation] = [Mutation("-", "baseline", "valid", lambda kw: None)]
    for a in entry.data + entry.tensors:
        out += [
            Mutation(a, "nan", "invalid", _set(a, _nan_first), nonfinite=True),
            Mutation(a, "inf", "invalid", _set(a, lambda t: _nan_first(t, float("inf"))), nonfinite=True),
            Mutation(a, "int64", "either", _set(a, lambda t: (t * 10).round().to(torch.int64))),
            Mutation(a, "float64", "either", _set(a, lambda t: t.double())),
            Mutation(a, "meta-device", "either", _set(a, lambda t: t.to("meta"))),
            Mutation(a, "list", "either", _set(a, lambda t: t.tolist())),
        ]
        if not entry.rank_free:
            out += [Mutation(a, "extra-dim", "invalid", _set(a, lambda t: t.unsqueeze(0))),
                    Mutation(a, "drop-dim", "invalid", _set(a, lambda t: t.reshape(-1) if t.ndim > 1 else t[0])),]
        if a in entry.scale_safe:
            out.append(Mutation(a, "huge", "valid", _set(a, lambda t: t * 1e30)))
    for a in entry.data:
        out.append(Mutation(a, "empty-batch", "either" if entry.empty_ok else "invalid", _set(a, lambda t: t[:0])))
    for a in entry.labels:
        if len(kw[a]) > 1:
            out.append(Mutation(a, "length-1", "invalid", _set(a, lambda t: t[:1])))
        out += [
            Mutation(a, "length+1", "invalid", _set(a, lambda t: torch.cat([t, t[:1]]))),
            Mutation(a, "out-of-range", "invalid", _set(a, lambda t: t + 1000)),
            Mutation(a, "negative", "invalid", _set(a, lambda t: t - 1000)),
            Mutation(a, "float", "either", _set(a, lambda t: t.float())),
            Mutation(a, "2d", "invalid", _set(a, lambda t: t[:, None])),
        ]
    for a in entry.positive + entry.nonneg:
        out += [
            Mutation(a, "nan", "invalid", _set(a, lambda v: float("nan"))),
            Mutation(a, "inf", "invalid", _set(a, lambda v: float("inf"))),
            Mutation(a, "negative", "invalid", _set(a, lambda v: -1 if isinstance(v, int) else -0.5)),
            Mutation(a, "str", "invalid", _set(a, lambda v: "1")),
        ]
        if a in entry.positive:
            out.append(Mutation(a, "zero", "invalid", _set(a, lambda v: 0 if isinstance(v, int) else 0.0)))
    return out


def _nan_first(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    if t.numel():
        t.view(-1)[0] = value
    return t


def _leaves(obj: Any, depth: int = 0):
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield torch.tensor(float(obj))
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _leaves(o, depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name in ("value", "bound", "residuals", "iterations"):
                yield from _leaves(getattr(obj, f.name), depth + 1)


def _finite(out: Any) -> bool:
    for t in _leaves(out):
        if t.device.type == "meta" or not (t.is_floating_point() or t.is_complex()):
            continue
        if not bool(torch.isfinite(t).all()):
            return False
    return True


def names_arg(msg: str, arg: str) -> bool:
    return arg == "-" or re.search(rf"(^|[^\w.]){re.escape(arg)}(\W|$)", msg) is not None


def run(entry: Entry, mutation: Mutation, seed: int = 0, batch: int = 3) -> tuple[str, str]:
    """(outcome, detail) of one call of ``entry`` under ``mutation``."""
    g = torch.Generator().manual_seed(seed)
    kw = entry.build(g, batch)
    mutation.apply(kw)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = entry.fn(**kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if mutation.kind == "valid":
            return "unclear", f"{type(e).__name__} on valid input: {msg[:120]}"
        # a consistency error between two arguments may name either of them
        named = names_arg(msg, mutation.arg) or any(msg.startswith(f"{k}:") for k in kw)
        return ("clear", msg[:120]) if named else ("unclear", f"{type(e).__name__}: {msg[:120]}")
    except Exception as e:  # noqa: BLE001 - classifying every failure is the point
        return "unclear", f"{type(e).__name__}: {str(e)[:120]}"
    if mutation.nonfinite and entry.elementwise:
        return "ok", "documented elementwise propagation"
    if not _finite(out):
        if mutation.nonfinite:
            return ("ok", "warned") if caught else ("nan_passed", "non-finite output")
        return "nan_from_finite", "non-finite output"
    if mutation.kind == "invalid":
        if mutation.nonfinite and caught:
            return "ok", "warned"
        return "accepted", "returned a finite result"
    return "ok", ""


OUTCOMES = ("ok", "clear", "unclear", "nan_from_finite", "nan_passed", "accepted")


# ----------------------------------------------------------------------------------------------
# Entry points (small baselines: each call takes milliseconds)

def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _rand(g, *shape):
    return torch.rand(*shape, generator=g)


def _labels(g, n, k):
    return torch.randint(k, (n,), generator=g)


_CACHE: dict[str, Any] = {}


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = make()
    return _CACHE[key]


def entries() -> list[Entry]:
    from proxnets import capsules as C
    from proxnets import convex as X
    from proxnets import equilibrium as E
    from proxnets import norm_bounds as NB
    from proxnets.constraints import rounding_allowance
    from proxnets import pmp as P
    from proxnets import solvers as S
    from proxnets import stable as ST
    from proxnets.data import stratified_split
    from proxnets.data.images import random_patches, write_image
    from proxnets.data.variants import rotate
    from proxnets.stable.restore import training_photos
    from proxnets.utils.stats import crossed_difference_interval, crossed_interval

    out: list[Entry] = []
    add = out.append

    # -- capsules
    add(Entry("capsules", "squash", C.squash, lambda g, b: {"s": _randn(g, b, 4, 8)}, data=("s",), rank_free=True,
              scale_safe=("s",)))
    add(Entry("capsules", "capsule_length", C.capsule_length, lambda g, b: {"s": _randn(g, b, 4, 8)}, data=("s",),
              rank_free=True))
    add(Entry("capsules", "margin_loss", lambda lengths, targets, lam=0.5: C.margin_loss(lengths, targets, lam=lam),
              lambda g, b: {"lengths": _rand(g, b, 5), "targets": _labels(g, b, 5), "lam": 0.5},
              data=("lengths",), labels=("targets",), nonneg=("lam",), empty_ok=False))
    add(Entry("capsules", "reconstruction_loss", lambda reconstruction, images, scale=5e-4: C.reconstruction_loss(
        reconstruction, images, scale=scale), lambda g, b: {"reconstruction": _rand(g, b, 1, 6, 6),
                                                            "images": _rand(g, b, 1, 6, 6), "scale": 5e-4},
        data=("reconstruction", "images"), nonneg=("scale",), empty_ok=False))
    dec = lambda: C.ReconstructionDecoder(5, 4, (1, 6, 6), hidden=(8,))  # noqa: E731
    add(Entry("capsules", "ReconstructionDecoder.forward", lambda v, labels: _cached("dec", dec)(v, labels),
              lambda g, b: {"v": _randn(g, b, 5, 4), "labels": _labels(g, b, 5)}, data=("v",), labels=("labels",)))
    add(Entry("capsules", "dynamic_routing", lambda votes, iterations=3: C.dynamic_routing(votes, iterations)[0],
              lambda g, b: {"votes": _randn(g, b, 6, 3, 4) * 0.3, "iterations": 3}, data=("votes",), nonneg=("iterations",)))
    add(Entry("capsules", "coupling_entropy", C.coupling_entropy,
              lambda g, b: {"couplings": torch.softmax(_randn(g, b, 6, 3), -1)}, data=("couplings",)))
    add(Entry("capsules", "routing_energy", C.routing_energy,
              lambda g, b: {"votes": _randn(g, b, 6, 3, 4), "couplings": torch.softmax(_randn(g, b, 6, 3), -1)},
              data=("votes", "couplings")))
    capsnet = lambda: C.CapsNet(C.small_config((1, 12, 12), 3, conv_channels=4, conv_kernel=3, primary_channels=2,  # noqa: E731
                                               primary_dim=4, primary_kernel=3, class_dim=4, decoder_hidden=(8,)))
    add(Entry("capsules", "capsnet_scores", lambda x: C.capsnet_scores(_cached("capsnet", capsnet), x),
              lambda g, b: {"x": _rand(g, b, 1, 12, 12)}, data=("x",)))
    add(Entry("capsules", "capsnet_loss", lambda x, y: C.capsnet_loss(_cached("capsnet", capsnet), x, y)[0],
              lambda g, b: {"x": _rand(g, b, 1, 12, 12), "y": _labels(g, b, 3)}, data=("x",), labels=("y",), empty_ok=False))
    add(Entry("capsules", "random_shift", lambda x, max_shift=2: C.random_shift(x, torch.Generator().manual_seed(0), max_shift),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8), "max_shift": 2}, data=("x",), nonneg=("max_shift",)))

    # -- convex
    add(Entry("convex", "kernel_matrix", lambda x, y, gamma=1.0: X.kernel_matrix("rbf", x, y, gamma=gamma),
              lambda g, b: {"x": _randn(g, b, 4), "y": _randn(g, 5, 4), "gamma": 1.0}, data=("x",), tensors=("y",),
              positive=("gamma",)))
    add(Entry("convex", "kernel_matvec", lambda x, y, v, gamma=1.0: X.kernel_matvec("rbf", x, y, v, gamma=gamma),
              lambda g, b: {"x": _randn(g, b, 4), "y": _randn(g, 5, 4), "v": _randn(g, 5, 2), "gamma": 1.0},
              data=("x",), tensors=("y", "v"), positive=("gamma",)))
    add(Entry("convex", "nuclear_norm", X.nuclear_norm, lambda g, b: {"a": _randn(g, b, 4)}, data=("a",), scale_safe=()))
    add(Entry("convex", "project_l1_ball", X.project_l1_ball, lambda g, b: {"x": _randn(g, 4 * b), "radius": 1.0},
              data=("x",), positive=("radius",)))
    add(Entry("convex", "project_nuclear_ball", X.project_nuclear_ball, lambda g, b: {"a": _randn(g, b, 4), "radius": 1.0},
              data=("a",), positive=("radius",)))
    add(Entry("convex", "singular_value_threshold", X.singular_value_threshold, lambda g, b: {"a": _randn(g, b, 4), "t": 0.5},
              data=("a",), nonneg=("t",)))
    add(Entry("convex", "RandomFourierFeatures.forward",
              lambda x: _cached("rff", lambda: X.RandomFourierFeatures(4, 8, 0.5, generator=torch.Generator().manual_seed(0)))(x),
              lambda g, b: {"x": _randn(g, b, 4)}, data=("x",), rank_free=True))
    def featurizer():  # the fused random-feature path: the public caller of the private SIMD cosine kernels._cos_
        x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        return X.PatchFeaturizer(patch_size=3, n_features=8, pool_size=2).fit(x, torch.Generator().manual_seed(0))

    add(Entry("convex", "PatchFeaturizer.forward", lambda X: _cached("featurizer", featurizer)(X),  # noqa: N803 - its error names X
              lambda g, b: {"X": _rand(g, b, 1, 8, 8)}, data=("X",)))

    from proxnets.convex.sources import GramBound

    def gram_tops(group=4):
        z = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0))
        acc = GramBound(torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(1))).Q, 3, 2)
        acc.add(z)
        acc.value()  # flushes the pending rows into the per-position blocks
        return acc.block_tops(group)

    add(Entry("convex", "GramBound.block_tops", gram_tops, lambda g, b: {"group": 2}, positive=("group",)))
    add(Entry("convex", "solve_primal", lambda z, y, lam=0.01: X.solve_primal(X.CachedFeatures(z), y, 3, lam=lam, max_iter=20,
                                                                           on_nonconvergence="ignore")[0],
              lambda g, b: {"z": _randn(g, b + 3, 2, 4), "y": _labels(g, b + 3, 3), "lam": 0.01},
              data=("z",), labels=("y",), nonneg=("lam",), empty_ok=False))

    # -- pmp
    from proxnets.pmp.regularizers import sparse_terms

    add(Entry("pmp", "soft_threshold", P.soft_threshold, lambda g, b: {"z": _randn(g, b, 4), "a": 0.3}, data=("z",),
              nonneg=("a",), rank_free=True, elementwise=True))
    add(Entry("pmp", "augmented_hamiltonian_1d",
              lambda w, w_k, g, eps=1.0, rho=0.1: P.augmented_hamiltonian_1d(w, w_k, g, eps, rho, P.SparseRegularizer()),
              lambda g, b: {"w": _randn(g, b), "w_k": _randn(g, b), "g": _randn(g, b), "eps": 1.0, "rho": 0.1},
              data=("w", "w_k", "g"), positive=("eps",), nonneg=("rho",), rank_free=True))
    lenet = lambda: P.LeNet5((1, 12, 12), 3, widths=(2, 3, 8, 6))  # noqa: E731
    add(Entry("pmp", "LeNet5.forward", lambda x: _cached("lenet", lenet)(x), lambda g, b: {"x": _rand(g, b, 1, 12, 12)},
              data=("x",)))
    add(Entry("pmp", "sparsity_param_groups", lambda rho: P.sparsity_param_groups(_cached("lenet", lenet), rho),
              lambda g, b: {"rho": 0.1}, nonneg=("rho",)))
    add(Entry("pmp", "SigmaZetaEps", lambda sigma=1.1, zeta=0.9: P.SigmaZetaEps(sigma, zeta), lambda g, b: {"sigma": 1.1, "zeta": 0.9},
              positive=("sigma", "zeta")))
    add(Entry("pmp", "sparse_terms", lambda ws: sparse_terms([P.SparseRegularizer(lam1=0.1, lam2=0.1)], [ws]),
              lambda g, b: {"ws": _randn(g, b, 4)}, data=("ws",), rank_free=True, elementwise=True))
    add(Entry("pmp", "SparseRegularizer", lambda beta=1.0, lam1=0.0: P.SparseRegularizer(beta, lam1).value(torch.linspace(-1, 1, 7)),
              lambda g, b: {"beta": 1.0, "lam1": 0.1}, nonneg=("beta", "lam1")))

    from proxnets.pmp.baselines import strength_search

    add(Entry("pmp", "strength_search",
              lambda target=0.2, rtol=0.25: strength_search(lambda s: 1.0 / (1.0 + (s / 6e-3) ** 3), target,
                                                            (3e-4, 3e-2), 4, rtol)["strength"],
              lambda g, b: {"target": 0.2, "rtol": 0.25}, positive=("target",), nonneg=("rtol",)))

    def bsqh_step(x, y, rho=0.01, eps=1.0):
        torch.manual_seed(0)
        model = lenet()
        opt = P.BSQH(model.parameters(), rho=rho, eps=eps)

        def closure(backward: bool = True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if backward:
                loss.backward()
            return loss

        return opt.step(closure)

    add(Entry("pmp", "BSQH.step", bsqh_step, lambda g, b: {"x": _rand(g, b, 1, 12, 12), "y": _labels(g, b, 3), "rho": 0.01,
                                                            "eps": 1.0},
              tensors=("x",), nonneg=("rho",), positive=("eps",)))  # y, empty batches: only in the user's closure

    # -- equilibrium
    add(Entry("equilibrium", "SoftThreshold.forward", lambda v, lam=0.1: E.SoftThreshold(lam)(v),
              lambda g, b: {"v": _randn(g, b, 4), "lam": 0.1}, data=("v",), nonneg=("lam",), rank_free=True, elementwise=True))
    add(Entry("equilibrium", "BoxClamp.forward", lambda v: E.BoxClamp()(v), lambda g, b: {"v": _randn(g, b, 4)}, data=("v",),
              rank_free=True, elementwise=True))
    opteq = lambda: E.OptEq(4, 6, max_iter=30)  # noqa: E731
    add(Entry("equilibrium", "OptEq.forward", lambda x: _cached("opteq", opteq)(x), lambda g, b: {"x": _randn(g, b, 4)},
              data=("x",)))
    deepconv = lambda: E.DeepOptEqConv2d(1, [2, 2], (5, 5), max_iter=30)  # noqa: E731
    add(Entry("equilibrium", "DeepOptEqConv2d.forward", lambda x: _cached("deepconv", deepconv)(x),
              lambda g, b: {"x": _randn(g, b, 1, 5, 5)}, data=("x",)))
    add(Entry("equilibrium", "equilibrium", lambda z0, tol=1e-4: E.equilibrium(lambda z: 0.5 * z + 1.0, z0, tol=tol)[0],
              lambda g, b: {"z0": _randn(g, b, 4), "tol": 1e-4}, data=("z0",), positive=("tol",), rank_free=True))
    add(Entry("equilibrium", "dense_matrix", lambda in_shape: E.dense_matrix(lambda v: 2 * v, in_shape),
              lambda g, b: {"in_shape": (3,)}))
    add(Entry("equilibrium", "operator_norm_bound", lambda target=0.97: E.operator_norm_bound(nn.Linear(4, 4), target=target),
              lambda g, b: {"target": 0.97}, positive=("target",)))

    # -- stable
    clf = lambda: ST.NonExpansiveClassifier(ST.ClassifierConfig(in_channels=1, image_size=8, num_classes=3, width=2,  # noqa: E731
                                                                stages=1, blocks_per_stage=1, head="flatten"))
    add(Entry("stable", "margins", ST.margins, lambda g, b: {"logits": _randn(g, b, 3), "y": _labels(g, b, 3)},
              data=("logits",), labels=("y",)))
    add(Entry("stable", "certified_radii", lambda x, y: ST.certified_radii(_cached("clf", clf), x, y),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8), "y": _labels(g, b, 3)}, data=("x",), labels=("y",)))
    add(Entry("stable", "certified_accuracy", lambda x, y: ST.certified_accuracy(_cached("clf", clf), x, y, [0.0, 0.1]),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8), "y": _labels(g, b, 3)}, data=("x",), labels=("y",), empty_ok=False))
    add(Entry("stable", "pgd_l2", lambda x, y, eps=0.1: ST.pgd_l2(_cached("clf", clf), x, y, eps, steps=2,
                                                                  generator=torch.Generator().manual_seed(0)),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8), "y": _labels(g, b, 3), "eps": 0.1}, data=("x",), labels=("y",),
              nonneg=("eps",)))
    add(Entry("stable", "NonExpansiveClassifier.forward", lambda x: _cached("clf", clf)(x),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8)}, data=("x",)))
    clf_s2d = lambda: ST.NonExpansiveClassifier(ST.ClassifierConfig(  # noqa: E731
        in_channels=1, image_size=8, num_classes=3, width=2, stages=2, head="flatten", stage_widths=(2, 2, 3), stage_blocks=(1, 0),
        downsample="s2d", head_pool=2))
    add(Entry("stable", "NonExpansiveClassifier.forward(s2d, head pool)", lambda x: _cached("clf_s2d", clf_s2d)(x),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8)}, data=("x",)))
    clf_diag = lambda: ST.NonExpansiveClassifier(ST.ClassifierConfig(  # noqa: E731
        in_channels=1, image_size=8, num_classes=3, width=2, stages=1, blocks_per_stage=1, head="flatten", block_step_scale="diagonal",
        schedule="fixed"))
    add(Entry("stable", "NonExpansiveClassifier.forward(diagonal step scale)", lambda x: _cached("clf_diag", clf_diag)(x),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8)}, data=("x",)))
    add(Entry("stable", "diagonal_step_scale", lambda weight: ST.diagonal_step_scale(weight),
              lambda g, b: {"weight": _randn(g, 3, 2, 3, 3)}, tensors=("weight",)))
    add(Entry("stable", "SpaceToDepth.forward", lambda x: ST.SpaceToDepth(2)(x), lambda g, b: {"x": _rand(g, b, 2, 4, 6)},
              data=("x",), elementwise=True))
    add(Entry("stable", "PairReflection.forward", lambda x: _cached("fold", lambda: ST.PairReflection(4))(x), lambda g, b: {"x": _randn(g, b, 4, 3, 3)},
              data=("x",), elementwise=True))
    add(Entry("stable", "PairReflection(channels)", lambda channels: ST.PairReflection(channels), lambda g, b: {"channels": 4},
              positive=("channels",)))
    add(Entry("stable", "ScaledAvgPool2d.forward(pad)", lambda x: ST.ScaledAvgPool2d(2, pad=True)(x),
              lambda g, b: {"x": _rand(g, b, 2, 5, 7)}, data=("x",), elementwise=True))
    add(Entry("stable", "psnr", ST.psnr, lambda g, b: {"x": _rand(g, b, 1, 8, 8), "ref": _rand(g, b, 1, 8, 8)},
              data=("x", "ref"), empty_ok=False))
    add(Entry("stable", "ssim", ST.ssim, lambda g, b: {"x": _rand(g, b, 1, 16, 16), "ref": _rand(g, b, 1, 16, 16)},
              data=("x", "ref"), empty_ok=False))
    add(Entry("stable", "tv_denoise", lambda y, lam=0.1: ST.tv_denoise(y, lam, max_iter=20, policy="ignore")[0],
              lambda g, b: {"y": _rand(g, b, 1, 8, 8), "lam": 0.1}, data=("y",), nonneg=("lam",), empty_ok=False))
    add(Entry("stable", "tv_denoise(vectorial)", lambda y, lam=0.1: ST.tv_denoise(y, lam, max_iter=20, policy="ignore",
                                                                           vectorial=True)[0],
              lambda g, b: {"y": _rand(g, b, 3, 8, 8), "lam": 0.1}, data=("y",), nonneg=("lam",), empty_ok=False))
    add(Entry("stable", "TVProx.__call__", lambda v, lam=0.1: ST.TVProx(lam, max_iter=20)(v),
              lambda g, b: {"v": _rand(g, b, 1, 8, 8), "lam": 0.1}, data=("v",), nonneg=("lam",), empty_ok=False))
    add(Entry("stable", "training_photos", lambda min_side=200: float(len(training_photos(min_side=min_side))),
              lambda g, b: {"min_side": 200}, positive=("min_side",)))
    add(Entry("stable", "gaussian_kernel", ST.gaussian_kernel, lambda g, b: {"size": 5, "sigma": 1.0},
              positive=("size", "sigma")))
    add(Entry("stable", "motion_kernel", ST.motion_kernel, lambda g, b: {"size": 5, "angle": 0.3}, positive=("size",)))
    add(Entry("stable", "compose_averaged", lambda alphas: ST.compose_averaged(alphas), lambda g, b: {"alphas": [0.5, 0.6]}))
    add(Entry("stable", "Blur.A", lambda x: ST.Blur(ST.gaussian_kernel(5, 1.0)).A(x),
              lambda g, b: {"x": _rand(g, b, 1, 8, 8)}, data=("x",)))
    add(Entry("stable", "lipschitz_linear", lambda in_features, out_features, bound=1.0: ST.lipschitz_linear(
        in_features, out_features, bound=bound), lambda g, b: {"in_features": 3, "out_features": 2, "bound": 1.0},
        positive=("in_features", "out_features", "bound")))
    add(Entry("stable", "empirical_lipschitz", lambda x0: ST.empirical_lipschitz(lambda x: 2 * x, x0, steps=3,
                                                                                  generator=torch.Generator().manual_seed(0))[0],
              lambda g, b: {"x0": _randn(g, b, 4)}, data=("x0",), rank_free=True))

    # -- solvers
    for name in ("fixed_point", "anderson", "safeguarded_anderson", "accelerated", "halpern"):
        fn = getattr(S, name)
        add(Entry("solvers", name, lambda z0, tol=1e-4, max_iter=50, _fn=fn: _fn(lambda z: 0.5 * z + 1.0, z0, tol=tol,
                                                                                  max_iter=max_iter)[0],
                  lambda g, b: {"z0": _randn(g, b, 4), "tol": 1e-4, "max_iter": 50}, data=("z0",), nonneg=("tol",),
                  positive=("max_iter",),
                  rank_free=True))
    add(Entry("solvers", "solve_linear", lambda b, tol=1e-6: S.solve_linear(lambda v: 2 * v, b, tol=tol)[0],
              lambda g, n: {"b": _randn(g, n, 4), "tol": 1e-6}, data=("b",), nonneg=("tol",), rank_free=True))
    add(Entry("solvers", "relative_residual", S.relative_residual, lambda g, b: {"z": _randn(g, b, 4), "tz": _randn(g, b, 4)},
              data=("z", "tz"), rank_free=True, elementwise=True))  # documented: NaN where a norm is not finite

    # -- utils
    add(Entry("utils", "crossed_interval", lambda table: crossed_interval(table), lambda g, b: {"table": _randn(g, b + 1, 3)},
              tensors=("table",)))
    add(Entry("utils", "crossed_difference_interval", lambda a, b: crossed_difference_interval(a, b),
              lambda g, b: {"a": _randn(g, b + 1, 3), "b": _randn(g, 1, 3)}, tensors=("a", "b")))

    # -- norm_bounds
    add(Entry("norm_bounds", "norm_bound(matrix)", lambda target: NB.norm_bound(target).value,
              lambda g, b: {"target": _randn(g, b + 1, 4)}, data=("target",), scale_safe=()))
    add(Entry("norm_bounds", "dense_norm_bound", lambda target: NB.dense_norm_bound(NB.as_operator(target)).value,
              lambda g, b: {"target": _randn(g, b + 1, 4)}, data=("target",)))
    add(Entry("norm_bounds", "fourier_norm_bound", lambda weight, padding=1: NB.fourier_norm_bound(weight, (2, 6, 6), padding).value,
              lambda g, b: {"weight": _randn(g, 3, 2, 3, 3), "padding": 1}, tensors=("weight",), nonneg=("padding",)))
    add(Entry("norm_bounds", "gram_iteration", lambda mats, iterations=4: NB.gram_iteration(mats, iterations),
              lambda g, b: {"mats": _randn(g, b, 3, 3), "iterations": 4}, data=("mats",), nonneg=("iterations",),
              rank_free=True))  # (..., m, n): batched; 1-D still refused
    add(Entry("norm_bounds", "rounding_allowance", lambda weight, scale=0.5: rounding_allowance(weight, scale),
              lambda g, b: {"weight": _randn(g, 3, 2, 3, 3), "scale": 0.5}, tensors=("weight",), nonneg=("scale",)))
    add(Entry("norm_bounds", "norm_bound(conv)", lambda in_shape: NB.norm_bound(nn.Conv2d(2, 3, 3, padding=1), in_shape).value,
              lambda g, b: {"in_shape": (2, 6, 6)}))

    # -- data
    add(Entry("data", "stratified_split", lambda y, n_first=4: stratified_split(y, n_first, seed=0),
              lambda g, b: {"y": _labels(g, b + 9, 3), "n_first": 4}, positive=("n_first",)))
    add(Entry("data", "random_patches", lambda images, size=4, n=3: random_patches(images, size, n),
              lambda g, b: {"images": [_rand(g, 1, 8, 8)], "size": 4, "n": 3}, positive=("size", "n")))
    add(Entry("data", "rotate", lambda x, angles: rotate(x, angles), lambda g, b: {"x": _rand(g, b, 1, 8, 8),
                                                                                    "angles": _rand(g, b)},
              data=("x", "angles")))
    add(Entry("data", "write_image", lambda image: write_image(_tmpdir() + "/img.png", image) and 0.0,
              lambda g, b: {"image": _rand(g, 1, 6, 6)}, tensors=("image",)))
    return out


_TMP: list[str] = []


def _tmpdir() -> str:
    import tempfile

    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="proxnets-fuzz-"))
    return _TMP[0]


def all_cases(seed: int = 0, batch: int = 3) -> list[tuple[Entry, Mutation]]:
    cases = []
    for e in entries():
        kw = e.build(torch.Generator().manual_seed(seed), batch)
        for m in mutations(e, kw):
            if m.arg == "-" or m.arg in kw:
                cases.append((e, m))
    return cases

