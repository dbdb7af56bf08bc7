#!/usr/bin/env python3
"""Sum up the request statistics of overlayfs-py mounts (OVERLAYFS_PY_STATS=DIR, see
overlayfs_py/stats.py): one line per mount in start order (its life, requests, handler time,
CPU, the busiest request types), then the totals per request type.

    benchmarks/podstats.py DIR [--top N] [--json]

To collect them from a podman build, make the mount program a wrapper, e.g.
    #!/bin/sh
    OVERLAYFS_PY_STATS=/tmp/stats exec /path/to/.venv/bin/overlayfs-py "$@"
or, in the bench: --ours-cmd "env OVERLAYFS_PY_STATS=/tmp/stats .venv/bin/python -m overlayfs_py".
"""
import argparse
import glob
import json
import os
import sys


def load(d):
    out = []
    for p in glob.glob(os.path.join(d, "stats-*.json")):
        with open(p) as f:
            out.append(json.load(f))
    out.sort(key=lambda r: r["start"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--top", type=int, default=4, help="request types shown per mount")
    ap.add_argument("--json", action="store_true", help="print the totals as JSON")
    a = ap.parse_args(argv)
    runs = load(a.dir)
    if not runs:
        print(f"no stats-*.json in {a.dir}", file=sys.stderr)
        return 1
    t0 = runs[0]["start"]
    total = {}
    detail = {}
    print(f"{'start':>7} {'life':>6} {'init':>6} {'reqs':>7} {'hdl s':>6} {'hcpu s':>6} "
          f"{'cpu s':>6} "
          f"{'lay':>3} {'ro':>2}  busiest (count, ms)")
    for r in runs:
        for name, o in r["ops"].items():
            t = total.setdefault(name, [0, 0, 0.0, 0.0])
            t[0] += o["count"]
            t[1] += o["errors"]
            t[2] += o["ms"]
            t[3] += o.get("cpu_ms", 0.0)
        for k, v in r.get("detail", {}).items():
            detail[k] = detail.get(k, 0) + v
        init = (r["init"] - r["start"]) if r.get("init") else float("nan")
        busiest = ", ".join(f"{n} {o['count']}/{o['ms']:.0f}"
                            for n, o in list(r["ops"].items())[:a.top])
        print(f"{r['start'] - t0:7.2f} {r['wall_s']:6.2f} {init:6.3f} {r['requests']:7d} "
              f"{r['handler_ms'] / 1000:6.2f} {r.get('handler_cpu_ms', 0) / 1000:6.2f} "
              f"{r['cpu_user_s'] + r['cpu_sys_s']:6.2f} "
              f"{r.get('layers', 0):3d} {'' if r.get('upper') else 'ro':>2}  {busiest}")
    n = sum(r["requests"] for r in runs)
    hdl = sum(r["handler_ms"] for r in runs) / 1000
    hcpu = sum(r.get("handler_cpu_ms", 0) for r in runs) / 1000
    cpu = sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in runs)
    print(f"\n{len(runs)} mounts, {n} requests, handler time {hdl:.2f} s (CPU {hcpu:.2f} s), "
          f"daemon CPU {cpu:.2f} s")
    print(f"{'request':16s} {'count':>8} {'errors':>7} {'ms':>9} {'us each':>8} {'cpu ms':>9} "
          f"{'cpu us':>7}")
    for name, (c, e, ms, cms) in sorted(total.items(), key=lambda kv: -kv[1][2]):
        print(f"{name:16s} {c:8d} {e:7d} {ms:9.1f} {ms * 1000 / c:8.1f} {cms:9.1f} "
              f"{cms * 1000 / c:7.1f}")
    spin = {}
    for r in runs:
        for k, v in (r.get("spin") or {}).items():
            spin[k] = spin.get(k, 0) + v
    if spin:
        print("\nidle worker's spin (pyfuse3 patch 0013): " +
              ", ".join(f"{k} {v}" for k, v in spin.items()))
    if detail:
        print("\n" + "\n".join(f"{k:40s} {v:8d}" for k, v in
                               sorted(detail.items(), key=lambda kv: -kv[1])))
    if a.json:
        print(json.dumps({"mounts": len(runs), "requests": n, "handler_s": hdl,
                          "handler_cpu_s": hcpu, "cpu_s": cpu,
                          "ops": total, "detail": detail, "spin": spin}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
