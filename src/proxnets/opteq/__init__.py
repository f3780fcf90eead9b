"""``proxnets.opteq``: the name of the OptEq method (seed 003) everywhere else in the project
(``proxnets reproduce opteq``, model names ``opteq*``); the package itself is
:mod:`proxnets.equilibrium`. This module *is* that package: after ``import proxnets.opteq``,
``proxnets.opteq is proxnets.equilibrium``, and every submodule is reachable under both names as one
module object (``proxnets.opteq.experiments is proxnets.equilibrium.experiments``), so classes and
registries are never duplicated.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

import proxnets.equilibrium as _package

_ALIAS, _TARGET = __name__, _package.__name__  # "proxnets.opteq", "proxnets.equilibrium"


class _AliasLoader(importlib.abc.Loader):
    """Hands back the module already imported under the package's own name (no second copy)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):  # already executed under its own name
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """``proxnets.opteq.X`` -> the module ``proxnets.equilibrium.X``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_ALIAS + "."):
            return None
        real = _TARGET + fullname[len(_ALIAS):]
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
sys.modules[_ALIAS] = _package
