"""The soak test (``make soak``): many clients, a mixed workload, minutes on end.

    soak/soak.py [--seconds 600] [--clients 64] [--targets ours,kernel] [--keep]

(``SOAK_SECONDS`` / ``SOAK_CLIENTS`` set the defaults.) For each target -- our daemon, then
the kernel overlay for comparison -- it builds three lower layers, mounts them with an
empty upper, and runs the clients of ``client.py`` in parallel for the given time. Then:

- every client's errors (any errno, any mismatch with its model) are counted: none may occur;
- a watchdog fails the run if any syscall of a client takes more than 10 s (it then aborts
  the FUSE connection so that the run ends);
- every file a client owns must read back as its model says (content, mode, xattr), and
  each of its directories list exactly the model's names;
- ours: the upper layer is mounted again by us and by the kernel overlay, which must show the
  same tree (kernel interop);
- ours: the daemon's resident memory is sampled every 10 s and must stay flat after the
  first fifth of the run (growth under 10 % and 16 MiB from the second quarter to the last).

Results (ops/s per operation, errors, RSS over time) are printed and written to
``soak/results/soak-<time>.json``. Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import client  # noqa: E402
import layerkit  # noqa: E402
import writekit as wk  # noqa: E402

HANG_SECONDS = 10.0
RSS_EVERY = 10.0


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Run:
    def __init__(self, target: str, seconds: float, clients: int, base: Path):
        self.target, self.seconds, self.nclients, self.base = target, seconds, clients, base
        self.specs = client.layer_specs(clients)
        self.lowers = [layerkit.make_layer(base / f"lower{i}", spec)
                       for i, spec in enumerate(self.specs)]
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "mnt"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()
        self.result = {"target": target, "seconds": seconds, "clients": clients,
                       "failures": []}

    def fail(self, what: str) -> None:
        self.result["failures"].append(what)

    @contextlib.contextmanager
    def mounted(self):
        if self.target == "kernel":
            with layerkit.kernel_overlay(self.lowers, self.upper, self.work, mnt=self.mnt,
                                         options=wk.KERNEL_OPTS):
                yield None
        else:
            with layerkit.fuse_mount(None, self.lowers, self.upper, self.work, self.mnt,
                                     check_exit=False) as fm:
                yield fm
            rc = fm.proc.returncode
            if rc != 0:
                what = "killed: no exit within 20 s of the unmount" if rc == -9 else f"exit {rc}"
                self.fail(f"daemon {what}; log {fm.log_path}: {fm.log()[-2000:]}")

    def run(self) -> dict:
        ctx = multiprocessing.get_context("fork")
        n = self.nclients
        busy = ctx.Array("d", n, lock=False)
        ops = ctx.Array("q", n, lock=False)
        out = self.base / "reports"
        out.mkdir()
        with self.mounted() as fm:
            conn = wk.fuse_conn(str(self.mnt)) if fm is not None else None
            start = time.time()
            until = start + self.seconds
            procs = [ctx.Process(target=client.main,
                                 args=(c, str(self.mnt), self.specs, busy, ops, 1000 + c,
                                       until, str(out / f"{c}.json")))
                     for c in range(n)]
            for p in procs:
                p.start()
            timeline, hang = [], None
            next_sample = start
            while any(p.is_alive() for p in procs):
                now = time.time()
                stuck = [(c, now - t) for c, t in enumerate(busy) if t and now - t > HANG_SECONDS]
                if stuck and hang is None:
                    hang = stuck
                    self.fail(f"watchdog: syscalls running for more than {HANG_SECONDS:.0f} s "
                              f"(client, seconds): {[(c, round(s, 1)) for c, s in stuck]}")
                    if conn:
                        wk.abort_fuse_conn(conn)
                    else:
                        for p in procs:
                            p.kill()
                if now >= next_sample:
                    timeline.append({"t": round(now - start, 1), "ops": sum(ops),
                                     "rss_kib": rss_kib(fm.pid) if fm is not None else None})
                    next_sample += RSS_EVERY
                if now > until + 120:
                    self.fail("clients did not finish within 120 s of the end")
                    for p in procs:
                        p.kill()
                time.sleep(0.5)
            elapsed = time.time() - start
            for p in procs:
                p.join()
            timeline.append({"t": round(elapsed, 1), "ops": sum(ops),
                             "rss_kib": rss_kib(fm.pid) if fm is not None else None})
            reports = []
            for c in range(n):
                try:
                    reports.append(json.loads((out / f"{c}.json").read_text()))
                except (OSError, ValueError):
                    self.fail(f"client {c} left no report (exit {procs[c].exitcode})")
            self._summarize(reports, timeline, elapsed)
            if hang is None:
                self._verify(reports)
        if self.target == "ours" and hang is None:
            self._interop()
        return self.result

    def _summarize(self, reports, timeline, elapsed) -> None:
        counts = {}
        errors = []
        for r in reports:
            for k, v in r["counts"].items():
                counts[k] = counts.get(k, 0) + v
            errors += [f"client {r['client']}: {e}" for e in r["errors"]]
        total = sum(counts.values())
        self.result.update(elapsed=round(elapsed, 1), ops=total,
                           ops_per_s=round(total / elapsed, 1),
                           per_op={k: round(v / elapsed, 1) for k, v in sorted(counts.items())},
                           errors=len(errors), error_samples=errors[:20], timeline=timeline)
        if errors:
            self.fail(f"{len(errors)} client errors, e.g. {errors[:5]}")
        if self.target == "ours":
            self._check_rss(timeline)

    def _check_rss(self, timeline) -> None:
        samples = [(s["t"], s["rss_kib"]) for s in timeline if s["rss_kib"]]
        if len(samples) < 8:
            self.result["rss_verdict"] = "too few samples to judge"
            return
        q = len(samples) // 4
        second = [r for _, r in samples[q:2 * q]]
        last = [r for _, r in samples[-q:]]
        a, b = sum(second) / len(second), sum(last) / len(last)
        growth = b - a
        self.result["rss_kib"] = {"start": samples[0][1], "second_quarter_mean": round(a),
                                  "last_quarter_mean": round(b), "max": max(r for _, r in samples)}
        flat = growth <= max(0.10 * a, 16 * 1024)
        self.result["rss_verdict"] = ("flat" if flat else "growing") + \
            f" ({growth / 1024:+.1f} MiB from the second quarter to the last)"
        if not flat:
            self.fail(f"daemon RSS grows after warm-up: {self.result['rss_verdict']}")

    def _verify(self, reports) -> None:
        problems = []
        m = self.mnt
        for r in reports:
            c = r["client"]
            for rel, want in r["files"].items():
                p = m / rel
                try:
                    data = p.read_bytes()
                    st = os.lstat(p)
                    xa = None
                    with contextlib.suppress(OSError):
                        xa = os.getxattr(p, client.XATTR).decode()
                except OSError as e:
                    problems.append(f"{rel}: {e}")
                    continue
                if hashlib.sha256(data).hexdigest() != want["sha"]:
                    problems.append(f"{rel}: content is not what client {c} wrote")
                if st.st_mode & 0o7777 != want["mode"]:
                    problems.append(f"{rel}: mode {oct(st.st_mode & 0o7777)} != {oct(want['mode'])}")
                if want["xattr"] is not None and xa != want["xattr"]:
                    problems.append(f"{rel}: xattr {xa!r} != {want['xattr']!r}")
            for d in r["dirs"] + ["shared"]:
                names = sorted(os.listdir(m / d))
                if d == "shared":
                    names = [x for x in names if x.startswith(f"s{c}_")]
                want = sorted([f.rpartition("/")[2] for f in r["files"]
                               if f.rpartition("/")[0] == d] +
                              [x.rpartition("/")[2] for x in r["dirs"]
                               if x.rpartition("/")[0] == d])
                if names != want:
                    problems.append(f"{d}: lists {names}, client {c} expects {want}")
        self.result["verify_problems"] = len(problems)
        if problems:
            self.fail(f"{len(problems)} files or dirs differ from the clients' models, e.g. "
                      f"{problems[:5]}")

    def _interop(self) -> None:
        """Our remount and the kernel overlay must show the same tree from this upper."""
        with layerkit.fuse_mount(None, self.lowers, self.upper, self.work, self.mnt) as fm:
            ours = layerkit.snapshot(self.mnt)
        shutil.rmtree(self.work)
        self.work.mkdir()
        with layerkit.kernel_overlay(self.lowers, self.upper, self.work, mnt=self.mnt,
                                     options=wk.KERNEL_OPTS):
            kernel = layerkit.snapshot(self.mnt)
        diffs = layerkit.diff_snapshots(kernel, ours, names=("kernel", "ours"))
        self.result["interop_entries"] = len(ours)
        self.result["interop_diffs"] = len(diffs)
        if diffs:
            self.fail(f"kernel overlay on our upper differs in {len(diffs)} places: {diffs[:5]}")


def render(results) -> str:
    lines = []
    for r in results:
        lines.append(f"== {r['target']}: {r['clients']} clients, {r.get('elapsed')} s: "
                     f"{r.get('ops')} ops, {r.get('ops_per_s')} ops/s, {r.get('errors')} errors, "
                     f"{'OK' if not r['failures'] else 'FAILED'}")
        if r.get("per_op"):
            lines.append("   ops/s by operation: " + ", ".join(f"{k} {v}" for k, v in
                                                            r["per_op"].items()))
        if r["target"] == "ours":
            lines.append(f"   RSS: {r.get('rss_verdict')}; {r.get('rss_kib')}")
            tl = [s for s in r.get("timeline", []) if s.get("rss_kib")]
            step = max(1, len(tl) // 12)
            lines.append("   RSS over time (s: MiB): " + ", ".join(
                f"{s['t']:.0f}: {s['rss_kib'] / 1024:.1f}" for s in tl[::step]))
            lines.append(f"   kernel interop: {r.get('interop_entries')} entries, "
                         f"{r.get('interop_diffs')} differences")
        for f in r["failures"]:
            lines.append(f"   FAIL: {f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    ap.add_argument("--clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", 64)))
    ap.add_argument("--targets", default=os.environ.get("SOAK_TARGETS", "ours,kernel"))
    ap.add_argument("--keep", action="store_true", help="keep the layers afterwards")
    args = ap.parse_args()
    os.environ["OVL_KEEP_LOGS"] = "1"      # the daemon's log stays for a failure report
    if os.geteuid() != 0 or not layerkit.fuse_available():
        print("soak: needs root, /dev/fuse and fusermount3", file=sys.stderr)
        return 1
    results = []
    for target in args.targets.split(","):
        if target == "kernel" and not layerkit.kernel_overlay_available():
            print("soak: no kernel overlay, skipping its run", file=sys.stderr)
            continue
        base = Path(tempfile.mkdtemp(prefix="ovlpy-soak-"))
        try:
            print(f"soak: {target}: {args.clients} clients for {args.seconds:.0f} s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
            res = Run(target, args.seconds, args.clients, base).run()
            res["load_before"] = None
            results.append(res)
        finally:
            for mp in layerkit.mounts_under(base):
                layerkit.unmount_quietly(mp)
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
            else:
                print(f"soak: kept {base}")
    text = render(results)
    print(text)
    out = HERE / "results" / time.strftime("soak-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"load_after": os.getloadavg(), "results": results}, indent=1))
    print(f"soak: results in {out.relative_to(HERE.parent)}")
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
