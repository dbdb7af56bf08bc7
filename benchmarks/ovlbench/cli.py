"""Performance yardstick for overlayfs-py.

Runs the same workloads on four targets and prints the median of each cell and how many
times slower it is than a plain directory:

  plain           a plain directory (the layer itself, or a copy of it when the workload writes)
  kernel          the kernel overlay driver (mount -t overlay)
  fuse-overlayfs  the C FUSE implementation (Debian package)
  overlayfs-py    this project (python -m overlayfs_py -f -o ...)

Fixtures are built once, deterministically, under benchmarks/cache/ (or --cache DIR) and reused.
See benchmarks/README.md for the workloads, how to read the table and how to add a workload.

Run as root: it mounts, drops the page cache, and (optionally) sets up an xfs loop device.
Every mount it makes is undone in a finally block (lazy unmount as a fallback), and it only
ever signals the daemons it started, by pid.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict

from .common import HERE, RESULTS_DIR, log
from .report import (consistency_notes, machine_info, render_section, render_table,
                     spread_notes, summary, update_results_md)
from .runner import Bench
from .targets import TARGET_ORDER, cleanup_active, cleanup_stale


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fixtures; finishes in minutes")
    p.add_argument("--cache", default=os.path.join(HERE, "cache"),
                   help="fixture and scratch directory (default benchmarks/cache)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per cell (default 3)")
    p.add_argument("--targets", help="comma list from " + ",".join(TARGET_ORDER))
    p.add_argument("--only", help="comma list of workloads to run")
    p.add_argument("--skip", help="comma list of workloads to skip")
    p.add_argument("--list", action="store_true", help="list workloads and exit")
    p.add_argument("--ours-cmd", help="command for the overlayfs-py target "
                   "(default: the project venv python -m overlayfs_py; env OVL_BENCH_OURS)")
    p.add_argument("--xfs", dest="xfs", action="store_true", default=None,
                   help="run the reflink workload on an xfs loop image (default: if mkfs.xfs exists)")
    p.add_argument("--no-xfs", dest="xfs", action="store_false")
    p.add_argument("--cell-timeout", type=float,
                   help="seconds one target may spend on one repetition of one workload before "
                        "its daemon is killed (default 1800; 300 with --quick)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the fixtures")
    p.add_argument("--write-results", action="store_true",
                   help="replace this mode's section of benchmarks/RESULTS.md")
    p.add_argument("--render", metavar="JSON",
                   help="only re-render the table of a saved result file (no benchmarking)")
    p.add_argument("--json", help="result file (default benchmarks/results/results-DATE-MODE.json)")
    args = p.parse_args(argv)
    if args.cell_timeout is None:
        args.cell_timeout = 300.0 if args.quick else 1800.0
    if args.xfs is None:
        args.xfs = shutil.which("mkfs.xfs") is not None
    return args


def render_only(args: argparse.Namespace) -> int:
    """Re-render the table (and with --write-results, the RESULTS.md section) of a saved run."""
    with open(args.render) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["results"]
    notes = [n for n in data.get("notes", []) if not n.startswith("wide spread")]
    notes += spread_notes(rows)
    table = render_table(rows, meta["targets"])
    print(table)
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if args.write_results:
        path = os.path.join(HERE, "RESULTS.md")
        update_results_md(path, meta["mode"], render_section(meta["mode"], meta, table, notes))
        print(f"updated {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_only(args)
    bench = Bench(args)
    if args.list:
        for wl in bench.workloads:
            print(f"{wl.name:11s} " + "; ".join(bench.rows(wl)))
        return 0
    if os.geteuid() != 0:
        print("bench.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)       # unwinds through every finally: unmounts
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(cleanup_active)

    start = time.monotonic()
    date = datetime.datetime.now().astimezone()
    os.makedirs(bench.cache, exist_ok=True)
    # one run per cache directory: a second one would unmount and delete the first's scratch
    lock = open(os.path.join(bench.cache, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench.py: another run is using {bench.cache} (use --cache DIR)", file=sys.stderr)
        return 2
    cleanup_stale(bench.cache)
    shutil.rmtree(bench.run_root, ignore_errors=True)
    os.makedirs(bench.run_root)
    machine = machine_info(bench.cache)
    t0 = time.monotonic()
    bench.fx.build()
    build_s = time.monotonic() - t0
    prime_s = bench.fx.prime()
    log(f"primed the host's cache of the fixtures in {prime_s:.1f} s")
    ours_t = next((t for t in bench.targets if t.name == "overlayfs-py"), None)
    log(f"mode {bench.sizes.mode}, targets {[t.name for t in bench.targets]}, reps {args.reps}; "
        f"overlayfs-py = {' '.join(ours_t.cmd) if ours_t else '-'}")
    try:
        bench.run()
    finally:
        cleanup_active()
        bench.teardown()
        shutil.rmtree(bench.run_root, ignore_errors=True)
    wall = time.monotonic() - start

    rows = summary(bench)
    table = render_table(rows, [t.name for t in bench.targets])
    notes = consistency_notes(bench) + bench.notes + spread_notes(rows)
    ours = next((t for t in bench.targets if t.name == "overlayfs-py"), None)
    stamp = date.strftime("%Y%m%d-%H%M%S")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = args.json or os.path.join(RESULTS_DIR, f"results-{stamp}-{bench.sizes.mode}.json")
    meta = {
        "date": date.strftime("%Y-%m-%d %H:%M %Z"), "mode": bench.sizes.mode,
        "sizes": asdict(bench.sizes), "reps": args.reps, "machine": machine,
        "targets": [t.name for t in bench.targets],
        "ours_cmd": shlex.join(ours.cmd) if ours else None,
        "fixtures": bench.fx.meta, "wall_seconds": round(wall, 1),
        "fixture_build_seconds": round(build_s, 1), "prime_seconds": round(prime_s, 1),
        "json_name": os.path.basename(json_path),
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
    }
    with open(json_path, "w") as f:
        checks = {w: {t: sorted(v, key=str) for t, v in per.items()}
                  for w, per in bench.checks.items()}
        json.dump({"meta": meta, "results": rows, "checks": checks, "notes": notes}, f,
                  indent=1, default=str)
    print()
    print(f"{bench.sizes.mode} run, {args.reps} reps, {wall / 60:.1f} min wall (value: median; "
          f"ratio: times slower than plain, paired per repetition; 1L: vs the same target's "
          f"1-layer time)")
    print(table)
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\nJSON: {json_path}")
    if args.write_results:
        path = os.path.join(HERE, "RESULTS.md")
        update_results_md(path, bench.sizes.mode, render_section(bench.sizes.mode, meta, table, notes))
        print(f"updated {path}")
    return 0
