"""Count fuzz outcomes per package (run by hand): every entry point of ``specs.entries()`` under
every mutation of ``specs.mutations()``, for a few seeds and batch sizes.

    PYTHONPATH=src python tests/fuzz/count_outcomes.py [--seeds 2] [--details]

Columns: ok (finite result or warned), clear (ValueError/TypeError naming the argument), unclear
(other errors, or not naming it), nan_from_finite, nan_passed (NaN input through to the output
silently), accepted (invalid input returned a result).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from specs import OUTCOMES, all_cases, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--details", action="store_true", help="print every call that is not ok/clear")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    for seed in range(args.seeds):
        for batch in (1, 3):
            for entry, mut in all_cases(seed, batch):
                outcome, detail = run(entry, mut, seed=seed, batch=batch)
                table[entry.package][outcome] += 1
                if outcome not in ("ok", "clear"):
                    bad.append((entry.package, entry.name, mut.arg, mut.what, batch, outcome, detail))
    names = sorted(table)
    print(f"{'package':<12}" + "".join(f"{o:>16}" for o in OUTCOMES) + f"{'calls':>8}")
    total = collections.Counter()
    for p in names:
        total.update(table[p])
        print(f"{p:<12}" + "".join(f"{table[p][o]:>16}" for o in OUTCOMES) + f"{sum(table[p].values()):>8}")
    print(f"{'all':<12}" + "".join(f"{total[o]:>16}" for o in OUTCOMES) + f"{sum(total.values()):>8}")
    if args.details:
        seen = set()
        for row in bad:
            key = row[:4] + row[5:6]
            if key not in seen:
                seen.add(key)
                print(" | ".join(str(r) for r in row))


if __name__ == "__main__":
    main()
