"""Defer a module's import until it is first used: trio, until the mount is live.

A daemon start spends most of its time importing; trio alone is about half of it, and
nothing before the mount needs trio: pyfuse3 and the daemon's modules only bind the name
at import time and call into it once they serve (``trio.run``). ``defer("trio")`` puts a
stand-in into ``sys.modules``; every ``import trio`` binds the stand-in, and the first
attribute looked up on it imports the real module and copies its namespace into the
stand-in, so later lookups are plain module lookups of the same objects. Code that uses
trio earlier just loads it earlier: correct either way, only slower.

The daemon defers trio, and three modules trio imports for features the daemon never uses
(TLS streams, DTLS, international host names): ``ssl`` (which maps libssl and libcrypto),
``hmac`` and ``idna``. Together about 5 MiB of the daemon's resident memory and ~10 ms of
trio's import.

(``importlib.util.LazyLoader`` cannot do this on Python 3.11: the import statement itself
reads ``__spec__`` from a module found in ``sys.modules``, and that already triggers the load.)
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


DAEMON_DEFERRED = ("trio", "ssl", "hmac", "idna")


class _Deferred(types.ModuleType):
    """Stand-in for a module that is imported on first attribute use."""

    def __getattr__(self, attr: str):      # only called for names not (yet) in __dict__
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)       # introspection (copy, pickle, doctest) loads nothing
        return getattr(load(self.__name__), attr)


def defer(name: str) -> types.ModuleType:
    """Put a stand-in for top-level module ``name`` into sys.modules, unless it is already
    imported. Raises ImportError now if the module cannot be found."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"No module named {name!r}", name=name)
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in
    return stand_in


def load(name: str) -> types.ModuleType:
    """Import a deferred module now (a no-op for one that is loaded or was never deferred)
    and make its stand-in equal to it."""
    stand_in = sys.modules.get(name)
    if not isinstance(stand_in, _Deferred):
        return stand_in if stand_in is not None else importlib.import_module(name)
    del sys.modules[name]
    try:
        real = importlib.import_module(name)
    except BaseException:
        sys.modules.setdefault(name, stand_in)
        raise
    stand_in.__dict__.update(real.__dict__)
    stand_in.__class__ = types.ModuleType      # no __getattr__ fallback any more
    return real
