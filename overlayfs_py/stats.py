"""Opt-in request statistics: how many requests of each kind a mount served, and how long
the daemon spent on them.

Set ``OVERLAYFS_PY_STATS`` in the daemon's environment to a directory (made if needed): at
unmount the daemon writes ``<dir>/stats-<pid>.json`` there, with per request type the count,
the errors (FUSEError replies: ENOENT, ENODATA, ENOSYS...), the handler time (from the
handler's entry to its return, the reply not included: wall and the thread's CPU, which
other processes on the machine do not inflate) and the slowest one, plus a few
details (which xattrs were asked for, negative lookups), the mount's timeline (start, INIT,
first and last request, end, wall seconds), the daemon's CPU time, and what the idle
worker's spin did (pyfuse3 patch 0013: hits and misses). With any other value
(``1``, ``-``) the same goes to the log at INFO level (stderr in the foreground). Off, it
costs nothing but one attribute test per request.

For a container engine that runs us as its ``mount_program``, a wrapper script that sets the
variable and execs the program gives one file per mount (one per container and build step);
``benchmarks/podstats.py`` sums them up.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

log = logging.getLogger("overlayfs_py")

ENV = "OVERLAYFS_PY_STATS"


class Stats:
    __slots__ = ("dest", "ops", "detail", "info", "t_start", "t_init", "t_first", "t_last")

    def __init__(self, dest: str):
        self.dest = dest
        # name -> [count, errors, wall ns, max wall ns, CPU ns]
        self.ops: Dict[str, List[int]] = {}
        self.detail: Dict[str, int] = {}
        self.info: dict = {}
        self.t_start = time.time()
        self.t_init = self.t_first = self.t_last = None

    def add(self, name: str, ns: int, cpu_ns: int, failed: bool) -> None:
        rec = self.ops.get(name)
        if rec is None:
            rec = self.ops[name] = [0, 0, 0, 0, 0]
        rec[0] += 1
        rec[1] += failed
        rec[2] += ns
        if ns > rec[3]:
            rec[3] = ns
        rec[4] += cpu_ns
        now = time.time()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now

    def note(self, what: str) -> None:
        self.detail[what] = self.detail.get(what, 0) + 1

    def report(self) -> dict:
        end = time.time()
        t = os.times()
        pyfuse3 = sys.modules.get("pyfuse3")        # loaded by now; a stock one has no spin
        spin_stats = getattr(pyfuse3, "poll_spin_stats", None)
        ops = {name: {"count": c, "errors": e, "ms": round(ns / 1e6, 3),
                      "us_each": round(ns / c / 1e3, 1), "max_ms": round(mx / 1e6, 3),
                      "cpu_ms": round(cpu / 1e6, 3), "cpu_us_each": round(cpu / c / 1e3, 1)}
               for name, (c, e, ns, mx, cpu) in sorted(self.ops.items(),
                                                       key=lambda kv: -kv[1][2])}
        return {
            "pid": os.getpid(), **self.info,
            "start": self.t_start, "init": self.t_init, "first_request": self.t_first,
            "last_request": self.t_last, "end": end, "wall_s": round(end - self.t_start, 3),
            "cpu_user_s": round(t.user, 3), "cpu_sys_s": round(t.system, 3),
            "requests": sum(r[0] for r in self.ops.values()),
            "handler_ms": round(sum(r[2] for r in self.ops.values()) / 1e6, 3),
            "handler_cpu_ms": round(sum(r[4] for r in self.ops.values()) / 1e6, 3),
            "ops": ops, "detail": dict(sorted(self.detail.items(), key=lambda kv: -kv[1])),
            "spin": spin_stats() if spin_stats else None,
        }

    def dump(self) -> None:
        rep = self.report()
        if self.dest in ("1", "-", "yes", "on"):
            log.info("request statistics: %s", json.dumps(rep))
            return
        try:
            os.makedirs(self.dest, exist_ok=True)
            path = os.path.join(self.dest, f"stats-{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(rep, f, indent=1)
            os.rename(path + ".tmp", path)
        except OSError as e:
            log.warning("cannot write request statistics to %s: %s", self.dest, e)


# The daemon's one Stats, if asked for (cli dumps it once the mount is gone).
current: Optional[Stats] = None


def from_env() -> Optional[Stats]:
    global current
    dest = os.environ.get(ENV)
    if dest and current is None:
        current = Stats(dest)
    return current


def dump() -> None:
    if current is not None:
        current.dump()
