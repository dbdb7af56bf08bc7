"""The workloads: one module each, one decorated function each (see benchmarks/README.md,
"Adding a workload"). Every module in this package is imported by all_workloads(); the
@workload decorator registers its function, and `order` places its rows in the table."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..common import Metric
from ..fixtures import Sizes


@dataclass(frozen=True)
class Workload:
    name: str                                # for --only/--skip and the log
    fn: Callable                             # fn(bench, target, rows) -> {row name: value}
    rows: Callable[[Sizes], List[Metric]]    # the rows it produces, for this run's sizes
    order: int                               # place in the table (and in the run)
    drop_retry: bool                         # repeat the cell if another process drops caches
    reps: Optional[int]                      # at most this many repetitions (long workloads)
    doc: str


REGISTRY: Dict[str, Workload] = {}


def workload(name: str, *, order: int, rows: Callable[[Sizes], List[Metric]],
             drop_retry: bool = True, reps: Optional[int] = None):
    """Register fn(bench, target, rows) as workload `name`.

    rows(sizes) lists the Metric rows it fills, in table order; fn gets their names (the
    same list) and returns {name: value} for the rows it measured. It raises NotApplicable
    for a target that cannot run it; any other exception fails that cell only. reps caps
    the repetitions of a workload that runs for minutes (--reps applies below it)."""
    def deco(fn):
        if name in REGISTRY and REGISTRY[name].fn.__module__ != fn.__module__:
            raise RuntimeError(f"two workloads named {name!r}: {REGISTRY[name].fn.__module__} "
                               f"and {fn.__module__}")
        REGISTRY[name] = Workload(name, fn, rows, order, drop_retry, reps,
                                  (fn.__doc__ or "").strip())
        return fn
    return deco


def all_workloads() -> List[Workload]:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return sorted(REGISTRY.values(), key=lambda w: (w.order, w.name))
