"""stat() of the bottom layer's paths through stacks of each depth, cold then warm."""
import os
import time

from ..common import DROP_RETRIES, DropWatch, Metric, drop_caches, kfmt, log
from . import workload


def stat_name(s, depth: int, cold: bool) -> str:
    return (f"stat {kfmt(s.stat_paths)} bottom paths, {depth} "
            f"layer{'s' if depth > 1 else ''}, {'cold' if cold else 'warm'}")


def _rows(s):
    return [Metric(stat_name(s, d, c == "cold"), "s",
                   vs_1layer=stat_name(s, s.depths[0], c == "cold") if d != s.depths[0] else None)
            for d in s.depths for c in ("cold", "warm")]


# drop_retry=False: a foreign cache drop is checked per depth, around the warm pass only
@workload("stat", order=20, rows=_rows, drop_retry=False)
def stat(b, t, rows):
    rel = b.fx.stat_paths()
    out = {}
    for i, depth in enumerate(b.sizes.depths):
        cold, warm = rows[2 * i], rows[2 * i + 1]
        try:
            with b.view(t, b.fx.stack_lowers(depth)) as v:
                paths = [os.path.join(v.path, p) for p in rel]
                st = os.stat
                drop_caches()
                t0 = time.perf_counter()
                for p in paths:
                    st(p)
                out[cold] = time.perf_counter() - t0
                for attempt in range(DROP_RETRIES + 1):
                    watch = DropWatch()
                    t1 = time.perf_counter()
                    for p in paths:
                        st(p)
                    out[warm] = time.perf_counter() - t1
                    foreign = watch.foreign()
                    if foreign <= 0:
                        break
                    if attempt < DROP_RETRIES:
                        log(f"stat {depth} layers {t.name}: another process dropped the "
                            f"caches ({foreign}) during the warm pass; re-warming, repeating it")
                        for p in paths:
                            st(p)
                        continue
                    b.tainted.add((warm, t.name))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            # one depth failing (e.g. too many layers) must not hide the others
            err = b.cell_error(e)
            for n in (cold, warm):
                b.record_error(n, t.name, err)
            log(f"stat {depth} layers {t.name}: FAILED {e}")
    return out
