"""proxnets: deep learning read as optimization.

Five methods, one shared engine. Every model reports an *optimization certificate* -- the
quantity its theory says must behave -- and the library checks it:

- :mod:`proxnets.capsules`     dynamic routing as mirror descent on a concave energy (seed 000)
- :mod:`proxnets.convex`       convexified CNNs, primal and dual, with a duality gap (seed 001)
- :mod:`proxnets.pmp`          training by the Pontryagin maximum principle, bSQH with L0 (seed 002)
- :mod:`proxnets.equilibrium`  equilibrium layers minimizing an explicit convex objective (seed 003)
- :mod:`proxnets.stable`       non-expansive / averaged networks from convex gradient flows (seed 004)

Shared: :mod:`proxnets.data` (real datasets), :mod:`proxnets.engine` (training loop, checkpoints,
distributed), :mod:`proxnets.operators` (operator norms, adjoint tests), :mod:`proxnets.report`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
