"""Start less: import kserve without the parts of it that the servers never use.

``import kserve`` executes its package ``__init__``, which imports everything kserve offers: the Kubernetes
client behind ``KServeClient`` (with google-auth and cryptography), pandas for DataFrame payloads, and so
on. Measured with ``python -X importtime`` (BENCHMARKS.md, "Start less") that was about half of the
predictor's import time, and a new replica pays it before it can take traffic. The servers use kserve's
ModelServer, its protocol (REST v1/v2, gRPC v2) and its metrics; they never build a ``KServeClient`` and never
see a DataFrame.

So, while kserve's package imports (and only then), :data:`DEFERRED` modules are stand-ins: whatever kserve
takes from them (``from kubernetes import client``, ``pd.DataFrame`` in an annotation) is a
:class:`DeferredAttribute` that imports the real module the first time it is called or looked into. Nothing
changes for code that does use them: after kserve's import the stand-ins leave ``sys.modules``, so any later
``import pandas`` gets the real package, and kserve's own references resolve to it on first use.

Import this module before anything imports kserve: the entry points (:mod:`serving.predictor_main`,
:mod:`serving.transformer_main`) do it first. Where kserve is already imported it does nothing.
"""

from __future__ import annotations

import importlib
import sys
import types

#: imported by kserve's package __init__, used by no code path of the servers
DEFERRED = ("pandas", "kserve.api.kserve_client")


class DeferredAttribute:
    """``module.name``, imported when first called or looked into."""

    def __init__(self, module: str, name: str):
        self._module, self._name = module, name

    def resolve(self):
        return getattr(importlib.import_module(self._module), self._name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._name}>"


class DeferredModule(types.ModuleType):
    """A module not imported yet: during kserve's import it hands out :class:`DeferredAttribute`; afterwards,
    any attribute imports the real module (kserve keeps a reference to this object as ``pd``)."""

    importing = False  # true while kserve's package imports

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if DeferredModule.importing:
            return DeferredAttribute(self.__name__, name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def import_kserve() -> types.ModuleType:
    """``import kserve`` with :data:`DEFERRED` left unimported; returns the kserve package."""
    if "kserve" in sys.modules:
        return sys.modules["kserve"]
    stand_ins = [DeferredModule(name) for name in DEFERRED if name not in sys.modules]
    for module in stand_ins:
        sys.modules[module.__name__] = module
    DeferredModule.importing = True
    try:
        import kserve
    finally:
        DeferredModule.importing = False
        for module in stand_ins:
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]
    return kserve


import_kserve()
