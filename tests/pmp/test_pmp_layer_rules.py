"""The layer-rule comparison's paired design (``experiments.layer_rules``): both rules' sweeps start from the
same state, and the map rule's sweep taken from the reference run is bitwise that of an identical copy."""

import copy
import warnings

import torch

from proxnets.data import load_dataset
from proxnets.pmp import experiments as E
from proxnets.pmp.training import full_batch_closure
from proxnets.report.suite import SuiteContext


def _data():
    ds = load_dataset("mnist5k", seed=0)
    return ds.subset(64, 10, seed=0)


def test_reference_sweep_equals_a_fresh_copys_sweep_bitwise(tmp_path):
    sub = _data()
    x, y = sub.x_train, sub.y_train
    model = E._model(sub, 3)
    ref = E._rule_optimizer(model, "map", {})
    closure = full_batch_closure(model, ref, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            ref.step(closure)
        twin = copy.deepcopy(model)
        opt = E._rule_optimizer(twin, "map", {})
        for p, q in zip((p for g in ref.param_groups for p in g["params"]),
                        (q for g in opt.param_groups for q in g["params"])):
            opt.state[q]["eps"] = ref.state[p]["eps"].clone()
        ref.step(closure)
        opt.step(full_batch_closure(twin, opt, x, y))
    a, b = ref.history[-1], opt.history[-1]
    assert a["J_before"] == b["J_before"] and a["J_after"] == b["J_after"] and a["trials"] == b["trials"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(ref.state[p]["eps"], opt.state[q]["eps"])
               for p, q in zip(model.parameters(), twin.parameters()))


def test_layer_rules_pairs_both_rules_on_the_same_states(tmp_path):
    sub = _data()
    ctx = SuiteContext(out_dir=tmp_path, size="smoke", log=lambda s: None)
    out = E.layer_rules(ctx, sub, [3], sweeps=5, first=2, every=2)["3"]
    assert [q["t"] for q in out["states"]] == [2, 4]
    assert out["same_start"]
    # the states lie on one full-batch trajectory, along which every accepted sweep lowers J
    assert out["states"][1]["J_before"] <= out["states"][0]["J_map"] <= out["states"][0]["J_before"]
    assert all(q["diff"] == q["J_nl"] - q["J_map"] for q in out["states"])
    # the broken variant's rule is the linearized one: every paired difference is exactly 0
    broken = SuiteContext(out_dir=tmp_path, size="smoke", log=lambda s: None, mutation="linearized-layer")
    assert all(q["diff"] == 0.0 for q in E.layer_rules(broken, sub, [3], 5, 2, 2)["3"]["states"])
