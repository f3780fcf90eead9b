"""proxnets: deep learning read as optimization.

Five methods, one shared engine. Every model reports an *optimization certificate* -- the
quantity its theory says must behave -- and the library checks it:

- :mod:`proxnets.capsules`     dynamic routing as mirror descent on a concave energy (seed 000)
- :mod:`proxnets.convex`       convexified CNNs, primal and dual, with a duality gap (seed 001)
- :mod:`proxnets.pmp`          training by the Pontryagin maximum principle, bSQH with L0 (seed 002)
- :mod:`proxnets.opteq`        equilibrium layers minimizing an explicit convex objective (seed 003;
  also reachable as :mod:`proxnets.equilibrium`)
- :mod:`proxnets.stable`       non-expansive / averaged networks from convex gradient flows (seed 004)

Shared: :mod:`proxnets.data` (real datasets), :mod:`proxnets.engine` (training loop, checkpoints,
distributed), :mod:`proxnets.operators` (operator norms, adjoint tests), :mod:`proxnets.report`.

``import proxnets`` is cheap (it imports neither torch nor any subpackage) and changes nothing
global; ``proxnets.stable`` and the other subpackages load on first access.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__version__ = "0.1.0"

METHODS = ("capsules", "convex", "pmp", "opteq", "stable")
# subpackages and modules loaded on first attribute access
_LAZY = frozenset({*METHODS, "equilibrium", "data", "engine", "report", "utils", "models", "certificates",
                   "solvers", "constraints", "norm_bounds", "operators"})

__all__ = ["__version__", *METHODS]


def __getattr__(name: str) -> ModuleType:
    if name not in _LAZY:
        raise AttributeError(f"module 'proxnets' has no attribute {name!r}; subpackages: {sorted(_LAZY)}")
    target = f"proxnets.{name}"
    if name == "opteq" and importlib.util.find_spec("proxnets.opteq") is None:
        target = "proxnets.equilibrium"  # the package's original name
    module = importlib.import_module(target)
    globals()[name] = module  # later accesses skip __getattr__
    return module


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
