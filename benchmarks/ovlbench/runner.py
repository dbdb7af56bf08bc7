"""The run: for each workload, each repetition, each target (interleaved), call the
workload's function and record what it returns. Also what workloads use while they run:
fresh views (mount + scratch dirs), timed commands, consistency checks."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional

from .common import (DROP_RETRIES, REPO, DropWatch, Metric, MountError, NotApplicable,
                     fmt_value, log, slowdown)
from .fixtures import FULL, QUICK, Fixtures
from .targets import (ACTIVE, TARGET_ORDER, Mounted, Target, View, kernel_stack, mount,
                      mount_listed)
from .workloads import Workload, all_workloads


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.cache = os.path.abspath(args.cache)
        self.fx = Fixtures(self.cache, self.sizes, rebuild=args.rebuild)
        self.run_root = os.path.join(self.cache, "run")
        self.targets = self._make_targets()
        self.workloads: List[Workload] = all_workloads()
        self.metrics: Dict[str, Metric] = {}
        self.values: Dict[str, Dict[str, List[float]]] = {}
        self.by_rep: Dict[str, Dict[str, Dict[int, float]]] = {}
        self.errors: Dict[str, Dict[str, List[str]]] = {}
        self.na: Dict[str, Dict[str, str]] = {}
        self.checks: Dict[str, Dict[str, set]] = {}
        self.notes: List[str] = []
        self.state: Dict[str, object] = {}     # per-run state a workload keeps between cells
        self._teardown: List[Callable[[], None]] = []
        self._seq = 0
        self.timed_out: Optional[str] = None
        self.tainted: set = set()       # (metric, target): a foreign cache drop hit a value

    # -- targets
    def _make_targets(self) -> List[Target]:
        ours_cmd = self.args.ours_cmd or os.environ.get("OVL_BENCH_OURS")
        if ours_cmd:
            cmd = shlex.split(ours_cmd)
        else:
            venv_py = os.path.join(REPO, ".venv", "bin", "python")
            py = venv_py if os.path.exists(venv_py) else sys.executable
            cmd = [py, "-m", "overlayfs_py"]
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        all_targets = {
            "plain": Target("plain", "plain"),
            "kernel": Target("kernel", "kernel"),
            "fuse-overlayfs": Target("fuse-overlayfs", "fuse", ["fuse-overlayfs"]),
            "overlayfs-py": Target("overlayfs-py", "fuse", cmd, env),
        }
        if not shutil.which("fuse-overlayfs"):
            all_targets["fuse-overlayfs"].disabled = "fuse-overlayfs not installed"
        wanted = self.args.targets.split(",") if self.args.targets else list(TARGET_ORDER)
        unknown = [t for t in wanted if t not in all_targets]
        if unknown:
            raise SystemExit(f"unknown target(s) {unknown}; choose from {list(TARGET_ORDER)}")
        return [all_targets[t] for t in TARGET_ORDER if t in wanted]

    # -- scratch space and views
    def scratch(self, base: Optional[str] = None) -> str:
        """A fresh, empty directory under CACHE/run/ (or under base)."""
        self._seq += 1
        d = os.path.join(base or self.run_root, f"r{self._seq}")
        os.makedirs(d)
        return d

    def remove(self, d: str) -> None:
        for sub in ("m",):
            p = os.path.join(d, sub)
            if mount_listed(p):
                self.notes.append(f"{p} still mounted; not removing its run directory")
                return
        shutil.rmtree(d, ignore_errors=True)

    def mount(self, t: Target, lowers: List[str], upper: str, work: str, mnt: str,
              options: tuple = ()) -> Mounted:
        try:
            h = mount(t, lowers, upper, work, mnt, options=options)
        except MountError as e:
            t.mount_failures += 1
            if t.mounted_ok == 0 and t.mount_failures >= 2:
                t.disabled = f"never mounted: {e}"
            raise
        t.mounted_ok += 1
        return h

    def finish(self, t: Target, h: Mounted) -> None:
        """Unmount; note a daemon that exited with an error."""
        h.unmount()
        if h.exit_status not in (None, 0):
            self.notes.append(f"{t.name}: daemon exited with status {h.exit_status} after "
                              f"unmount: {h.log_tail(200)}")

    @contextlib.contextmanager
    def view(self, t: Target, lowers: List[str], plain_copy: Optional[Callable[[str], None]] = None,
             base: Optional[str] = None, options: tuple = ()):
        """A fresh overlay mount of lowers (top first) with a fresh upper and work dir, or for
        the plain target the bottom layer itself (read-only workloads) or a fresh copy made by
        plain_copy(dir) outside the timed part (workloads that write). options: extra mount
        options for the overlay targets. The upper dir is View.base/u."""
        d = self.scratch(base)
        try:
            if t.kind == "plain":
                if plain_copy is None:
                    yield View(lowers[-1], None, d)
                else:
                    p = os.path.join(d, "plain")
                    os.mkdir(p)
                    plain_copy(p)
                    os.sync()        # the copy's dirty data must not land in the timed part
                    yield View(p, None, d)
                return
            u, w, m = (os.path.join(d, x) for x in ("u", "w", "m"))
            for x in (u, w, m):
                os.mkdir(x)
            h = self.mount(t, lowers, u, w, m, options)
            try:
                os.sync()
                yield View(m, h.pid, d)
            finally:
                self.finish(t, h)
        finally:
            self.remove(d)

    def at_end(self, fn: Callable[[], None]) -> None:
        """Run fn once after the last workload, even on failure (e.g. detach a loop device)."""
        self._teardown.append(fn)

    def teardown(self) -> None:
        while self._teardown:
            fn = self._teardown.pop()
            try:
                fn()
            except Exception as e:
                log(f"teardown {fn!r} failed: {e}")

    # -- helpers for workloads
    def timed_cmd(self, cmd: List[str], cwd: Optional[str] = None, env=None,
                  timeout: float = 3600) -> (float, str):
        """Run cmd, fail on a non-zero exit; return (seconds, stdout)."""
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        return dt, r.stdout.decode(errors="replace")

    def cell_error(self, e: Exception) -> str:
        """How a failed cell is recorded; says so when the watchdog killed the daemon."""
        err = f"{type(e).__name__}: {e}"
        if self.timed_out:
            err = f"timed out after {self.args.cell_timeout:.0f} s, daemon killed; then {err}"
        return err

    # -- recording
    def record(self, metric: str, target: str, value: float, rep: int) -> None:
        self.values.setdefault(metric, {}).setdefault(target, []).append(value)
        self.by_rep.setdefault(metric, {}).setdefault(target, {})[rep] = value

    def paired(self, metric: str, target: str, ref_metric: str, ref_target: str,
               higher_better: bool) -> Optional[float]:
        """Median over repetitions of the per-repetition ratio. Targets are interleaved, so the
        two values of one repetition ran close together, under the same background load."""
        a = self.by_rep.get(metric, {}).get(target, {})
        b = self.by_rep.get(ref_metric, {}).get(ref_target, {})
        ratios = [slowdown(a[r], b[r], higher_better) for r in a if r in b]
        ratios = [x for x in ratios if x is not None]
        return statistics.median(ratios) if ratios else None

    def record_error(self, metric: str, target: str, err: str) -> None:
        self.errors.setdefault(metric, {}).setdefault(target, []).append(err)

    def check(self, what: str, target: str, value) -> None:
        """Record an observable that must be equal across targets (entry counts, tar size)."""
        self.checks.setdefault(what, {}).setdefault(target, set()).add(value)

    # -- the driver
    def rows(self, wl: Workload) -> List[str]:
        """The row names a workload produces, in order (so n/a cells can be filled in)."""
        ms = wl.rows(self.sizes)
        for m in ms:
            self.metrics.setdefault(m.name, m)
        return [m.name for m in ms]

    def selected(self) -> List[Workload]:
        wanted = set(self.args.only.split(",")) if self.args.only else None
        skip = set(self.args.skip.split(",")) if self.args.skip else set()
        if not self.args.xfs:
            skip.add("reflink")
        known = {w.name for w in self.workloads}
        unknown = ((wanted or set()) | skip) - known
        if unknown:
            raise SystemExit(f"unknown workload(s) {sorted(unknown)}; see --list")
        return [w for w in self.workloads
                if (wanted is None or w.name in wanted) and w.name not in skip]

    def run(self) -> None:
        for wl in self.selected():
            names = self.rows(wl)
            reps = min(self.args.reps, wl.reps) if wl.reps else self.args.reps
            for rep in range(reps):
                order = self.targets[rep % len(self.targets):] + self.targets[:rep % len(self.targets)]
                for t in order:
                    if t.disabled:
                        for n in names:
                            self.na.setdefault(n, {})[t.name] = t.disabled
                        continue
                    t0 = time.monotonic()
                    self.timed_out = None
                    timer = threading.Timer(self.args.cell_timeout, self._on_cell_timeout,
                                            args=(f"{wl.name} rep {rep + 1} {t.name}",))
                    timer.daemon = True
                    timer.start()
                    try:
                        for attempt in range(DROP_RETRIES + 1):
                            watch = DropWatch()
                            got = wl.fn(self, t, names)
                            foreign = watch.foreign()
                            if foreign <= 0 or not wl.drop_retry:
                                break
                            if attempt < DROP_RETRIES:
                                log(f"{wl.name} rep {rep + 1}/{reps} {t.name}: another process "
                                    f"dropped the caches ({foreign}) during the cell; repeating it")
                                continue
                            for n in got:
                                self.tainted.add((n, t.name))
                    except NotApplicable as e:
                        for n in names:
                            self.na.setdefault(n, {})[t.name] = str(e)
                        continue
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:       # one failed cell must not stop the bench
                        err = self.cell_error(e)
                        if not isinstance(e, (MountError, subprocess.CalledProcessError)):
                            fr = traceback.extract_tb(e.__traceback__)[-1]
                            err += f" (at {os.path.basename(fr.filename)}:{fr.lineno})"
                        for n in names:
                            self.record_error(n, t.name, err)
                        log(f"{wl.name} rep {rep + 1}/{reps} {t.name}: FAILED {err[:300]}")
                        continue
                    finally:
                        timer.cancel()
                    unknown = set(got) - set(names)
                    if unknown:
                        raise RuntimeError(f"workload {wl.name} returned undeclared rows {unknown}")
                    for n, v in got.items():
                        self.record(n, t.name, v, rep)
                    shown = ", ".join(f"{n.split(',')[-1].strip() if ',' in n else n}="
                                      f"{fmt_value(v, self.metrics[n].unit)}" for n, v in got.items())
                    log(f"{wl.name} rep {rep + 1}/{reps} {t.name}: {shown}  "
                        f"[{time.monotonic() - t0:.1f} s]")

    def _on_cell_timeout(self, label: str) -> None:
        """Watchdog: a cell ran too long, most likely a hung daemon. Kill the daemons we
        started (by pid); that aborts their FUSE connections, so every blocked syscall returns
        ENOTCONN, the workload fails, and the normal cleanup unmounts."""
        self.timed_out = label
        for m in list(ACTIVE):
            if m.proc is not None and m.proc.poll() is None:
                log(f"watchdog: {label} exceeded {self.args.cell_timeout:.0f} s; "
                    f"killing {m.target.name} daemon pid {m.proc.pid} "
                    f"(kernel stack: {kernel_stack(m.proc.pid)})")
                m.proc.kill()
