"""The daemon's resident memory after a long mixed workload: the soak clients (soak/client.py:
create, write, read back, rename, chmod, xattrs, unlink, rmdir, listings, each checked against
the client's model) on three small lower layers stacked on the 50k-file image, after a walk
of the whole tree. 10 minutes in full mode, 30 s in quick mode; one repetition (a cell takes
as long as the workload). FUSE targets only. A client error fails the cell.
"""
import json
import multiprocessing
import os
import sys
import time

from ..common import REPO, Metric, NotApplicable, vmrss_mib
from . import workload

CLIENTS = 16
SECONDS = {"full": 600, "quick": 30}


def _label(s) -> str:
    secs = SECONDS[s.mode]
    return f"{secs // 60} min" if secs % 60 == 0 else f"{secs} s"


@workload("mixed", order=65, reps=1, drop_retry=False, rows=lambda s: [
    Metric(f"daemon RSS after the walk + {_label(s)} mixed workload ({CLIENTS} clients)",
           "MiB")])
def mixed(b, t, rows):
    (name,) = rows
    if t.kind != "fuse":
        raise NotApplicable("no daemon" if t.kind == "kernel" else "no mount")
    for sub in ("tests", "soak"):
        if os.path.join(REPO, sub) not in sys.path:
            sys.path.insert(0, os.path.join(REPO, sub))
    try:
        import client as soak_client
        import layerkit
    except ImportError as e:
        raise NotApplicable(f"soak/client.py or tests/layerkit.py missing: {e}")
    seconds = SECONDS[b.sizes.mode]
    d = b.scratch()
    try:
        specs = soak_client.layer_specs(CLIENTS)
        lowers = [str(layerkit.make_layer(os.path.join(d, f"soak{i}"), spec))
                  for i, spec in enumerate(specs)]
        with b.view(t, lowers + [b.fx.image]) as v:
            b.timed_cmd(["du", "-s", v.path])
            ctx = multiprocessing.get_context("fork")
            busy = ctx.Array("d", CLIENTS, lock=False)
            ops = ctx.Array("q", CLIENTS, lock=False)
            until = time.time() + seconds
            out = [os.path.join(d, f"client{c}.json") for c in range(CLIENTS)]
            procs = [ctx.Process(target=soak_client.main,
                                 args=(c, v.path, specs, busy, ops, 1000 + c, until, out[c]))
                     for c in range(CLIENTS)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=max(1.0, until - time.time()) + 300)
                if p.is_alive():
                    p.kill()
                    p.join()
                    raise RuntimeError("a mixed-workload client did not finish in time")
            rss = vmrss_mib(v.pid)
            errors = []
            for c in range(CLIENTS):
                with open(out[c]) as f:
                    errors += json.load(f)["errors"]
            if errors:
                raise RuntimeError(f"{len(errors)} client errors, e.g. {errors[:3]}")
            b.notes.append(f"mixed workload on {t.name}: {sum(ops)} operations in {seconds} s "
                           f"by {CLIENTS} clients")
    finally:
        b.remove(d)
    return {name: rss}
