"""BSQH's step (its fast paths: the rule written into the parameters, the price search's buffers and guessed
``order_pair``, the batched regularizer terms and counts, the one-call bookkeeping) equals a straightforward
reference bSQH bit for bit: losses, weights, eps, rho and every accept/reject decision, over mini-batch steps
with rejections, with and without ``target_density``. Broken variants of the optimizer's fast paths differ."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import proxnets.pmp.optimizer as optimizer_module
import proxnets.pmp.regularizers as regularizers_module
from proxnets.pmp import BSQH, LinearizedHamiltonianRule, SmallLeNet5, SparseRegularizer, TrialStep
from proxnets.pmp.sparsity import sparsity_param_groups

from pmp_closures import cross_entropy_closure

REG = SparseRegularizer(beta=1.0, lam2=1e-3, normalize="group", bound=1.0)


def _batches(steps, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(steps)]


def _terms(reg: SparseRegularizer, w: torch.Tensor) -> torch.Tensor:
    """(L0 price, |w|_1, |w|^2) of one tensor, term by term (weight-level L0)."""
    zero = w.new_zeros(())
    l0 = reg.l0_weight(w) * torch.count_nonzero(w).to(w.dtype) if reg.beta else zero
    return torch.stack([l0, w.abs().sum() if reg.lam1 else zero, (w * w).sum() if reg.lam2 else zero])


def _reference_price(scores: torch.Tensor, d: float) -> float:
    """rho keeping exactly round(d N) weights: the geometric mean of the (k+1)-th and k-th largest score."""
    n = scores.numel()
    k = int(round(d * n))
    if k >= n:
        return 0.5 * float(scores.min())
    lo = float(torch.kthvalue(scores, n - k).values)
    hi = float(scores[scores > lo].min()) if k > 0 else math.inf
    if not math.isfinite(hi):
        return 2.0 * lo if lo > 0 else 1.0
    return math.sqrt(lo * hi) if lo > 0 else 0.5 * hi


def reference_run(model, batches, eps0, eta, eps_rule, target_density=None, max_trials=50):
    """bSQH, ``layer="map"``, written out plainly: one loop over the parameters per operation."""
    groups = sparsity_param_groups(model, 1.0)
    layers = []  # (param, rho, regularizer, adapt)
    for g in groups:
        count = sum(p.numel() for p in g["params"])
        for p in g["params"]:
            layers.append([p, g["rho"], dataclasses.replace(REG, count=count), g["rho"] > 0 and target_density])
    l2_weight = {id(p): rho * reg.lam2 for p, rho, reg, _ in layers}
    rule = LinearizedHamiltonianRule()
    eps = torch.full((len(layers),), float(eps0), dtype=torch.float64)
    out = []
    for xb, yb in batches:
        for p in model.parameters():
            p.grad = None
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
        loss_k = float(loss.detach())
        w_k = [p.detach().clone() for p, *_ in layers]
        grads = [p.grad.detach().clone() for p, *_ in layers]
        priced = [i for i, (_, rho, _, adapt) in enumerate(layers) if rho > 0 or adapt]
        terms_k = torch.stack([_terms(layers[i][2], w_k[i]) for i in priced])
        accepted = rejected = 0
        for _ in range(max_trials):
            e = eps.tolist()
            if target_density:
                scores = []
                for i in priced:
                    p, rho, reg, _ = layers[i]
                    factor = e[i] / (reg.l0_weight(w_k[i]) * (1.0 + l2_weight[id(p)] / (2.0 * e[i])))
                    z = torch.add(w_k[i], grads[i], alpha=-0.5 / e[i])
                    scores.append(((z * z) * factor).reshape(-1))
                rho = _reference_price(torch.cat(scores), target_density)
                for i in priced:
                    layers[i][1] = rho
                    layers[i][2] = dataclasses.replace(layers[i][2], lam2=l2_weight[id(layers[i][0])] / rho)
            new = [rule(w_k[i], grads[i], e[i], rho, reg) for i, (_, rho, reg, _) in enumerate(layers)]
            tau = torch.stack([((w - wk) * (w - wk)).sum() for w, wk in zip(new, w_k)]).double()
            lin = float(torch.stack([(g * (w - wk)).sum() for g, w, wk in zip(grads, new, w_k)]).double().sum())
            coef = torch.tensor([(layers[i][1], layers[i][1] * layers[i][2].lam1, 0.5 * layers[i][1] * layers[i][2].lam2)
                                 for i in priced], dtype=torch.float64)
            terms_new = torch.stack([_terms(layers[i][2], new[i]) for i in priced])
            reg_k, reg_new = float((coef * terms_k.double()).sum()), float((coef * terms_new.double()).sum())
            with torch.no_grad():
                for (p, *_), w in zip(layers, new):
                    p.copy_(w)
                loss_new = float(F.cross_entropy(model(xb), yb))
            j_k, j_new, total = loss_k + reg_k, loss_new + reg_new, float(tau.sum())
            trial = TrialStep(tau=tau, lin=lin, d_loss=loss_new - loss_k, d_reg=reg_new - reg_k, eta=eta)
            if math.isfinite(j_new) and j_new - j_k <= -eta * total:
                accepted += 1
                eps = eps_rule.accept(eps, trial)
                break
            rejected += 1
            with torch.no_grad():
                for (p, *_), w in zip(layers, w_k):
                    p.copy_(w)
            eps = eps_rule.reject(eps, trial)
        out.append(dict(loss=loss_k, accepted=accepted, rejected=rejected, eps=eps.clone(),
                        rho=[layer[1] for layer in layers], weights=[p.detach().clone() for p in model.parameters()]))
    return out


def optimizer_run(model, batches, eps0, eta, eps_rule, target_density=None, cls=BSQH):
    opt = cls(sparsity_param_groups(model, 1.0), eps=eps0, eta=eta, eps_rule=eps_rule, eps_min=1e-3,
              regularizer=REG, target_density=target_density)
    out = []
    for xb, yb in batches:
        before = (opt.run_state["accepted"], opt.run_state["rejected"])
        loss = float(opt.step(cross_entropy_closure(model, opt, xb, yb)))
        ps = [p for g in opt.param_groups for p in g["params"]]
        out.append(dict(loss=loss, accepted=opt.run_state["accepted"] - before[0],
                        rejected=opt.run_state["rejected"] - before[1],
                        eps=torch.stack([opt.state[p]["eps"] for p in ps]),
                        rho=[g["rho"] for g in opt.param_groups for _ in g["params"]],
                        weights=[p.detach().clone() for p in model.parameters()]))
    return out, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().view(torch.int64)


def _same(a, b) -> bool:
    """Equal bit for bit (floats by their bits, signed zeros and NaNs included), step by step."""
    for ra, rb in zip(a, b, strict=True):
        if ra["accepted"] != rb["accepted"] or ra["rejected"] != rb["rejected"]:
            return False
        numbers = [torch.tensor([r["loss"], *r["rho"]], dtype=torch.float64) for r in (ra, rb)]
        if not torch.equal(_bits(numbers[0]), _bits(numbers[1])):
            return False
        if not torch.equal(_bits(ra["eps"]), _bits(rb["eps"])):
            return False
        if not all(torch.equal(_bits(u), _bits(v)) for u, v in zip(ra["weights"], rb["weights"], strict=True)):
            return False
    return True


CASES = {  # eps0 small: huge first steps, rejected and retried (the retry paths are compared too)
    "curvature": dict(eps0=0.01, eta=1e-4, eps_rule="curvature", target_density=None),
    "sigma-zeta, target density": dict(eps0=0.05, eta=1e-4, eps_rule="sigma-zeta", target_density=0.3),
    "curvature, target density": dict(eps0=2.0, eta=1e-5, eps_rule="curvature", target_density=0.1),
}


def _both(case, steps=10, cls=BSQH, calls=None):
    """(optimizer's steps, reference's steps) from the same initial weights and batches; ``calls``: a dict that
    receives the optimizer's order_pair calls and how many of them ran kthvalue (the reference path)."""
    batches = _batches(steps)
    torch.manual_seed(0)
    model = SmallLeNet5()
    init = [p.detach().clone() for p in model.parameters()]
    counted = dict(order_pair=0, kthvalue=0)
    exact_pair, exact_kth = optimizer_module.order_pair, torch.kthvalue

    def pair(*a, **k):
        counted["order_pair"] += 1
        return exact_pair(*a, **k)

    def kth(*a, **k):
        counted["kthvalue"] += 1
        return exact_kth(*a, **k)

    optimizer_module.order_pair, torch.kthvalue = pair, kth
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, opt = optimizer_run(model, batches, case["eps0"], case["eta"], case["eps_rule"],
                                     case["target_density"], cls=cls)
    finally:
        optimizer_module.order_pair, torch.kthvalue = exact_pair, exact_kth
    if calls is not None:
        calls.update(counted)
    with torch.no_grad():
        for p, w in zip(model.parameters(), init):
            p.copy_(w)
    ref = reference_run(model, batches, case["eps0"], case["eta"], opt.eps_rule, case["target_density"])
    return got, ref


@pytest.mark.parametrize("name", list(CASES))
def test_step_equals_the_reference_bit_for_bit(name):
    calls = {}
    got, ref = _both(CASES[name], calls=calls)
    assert sum(r["rejected"] for r in ref) > 0 or name == "curvature, target density"  # retries are compared
    assert all(r["accepted"] == 1 for r in ref)
    if CASES[name]["target_density"]:  # the guessed fast path decided most trials (kthvalue: the first, ...)
        assert calls["order_pair"] > 2 * calls["kthvalue"], calls
    assert _same(got, ref)


def test_a_broken_price_search_or_count_is_detected(monkeypatch):
    case = CASES["curvature, target density"]
    exact = optimizer_module.order_pair

    def shifted(s, k, guess=None):  # broken: the price a few ulps off (lo rounded down by one float32 step)
        lo, hi = exact(s, k, guess)
        return float(torch.nextafter(torch.tensor(lo), torch.tensor(-math.inf))), hi

    monkeypatch.setattr(optimizer_module, "order_pair", shifted)
    got, ref = _both(case, steps=4)
    assert not _same(got, ref)
    monkeypatch.setattr(optimizer_module, "order_pair", exact)

    # broken: the L0 count misses negative weights (the terms of J, then eps, then the weights differ)
    monkeypatch.setattr(regularizers_module, "nonzero_count", lambda w: (w > 0).sum().to(torch.int32))
    monkeypatch.setattr(optimizer_module, "nonzero_count", lambda w: (w > 0).sum().to(torch.int32))
    got, ref = _both(CASES["curvature"], steps=4)
    assert not _same(got, ref)
