"""python -m compileall of a copy of a few stdlib packages: small reads, .pyc writes."""
import os
import shutil
import sys

from ..common import Metric
from . import workload


@workload("compileall", order=140, rows=lambda s: [Metric("python -m compileall pkg", "s")])
def compileall(b, t, rows):
    (name,) = rows

    def copy(p):
        shutil.copytree(os.path.join(b.fx.image, "pkg"), os.path.join(p, "pkg"), symlinks=True)

    with b.view(t, [b.fx.image], plain_copy=copy) as v:
        dt, _ = b.timed_cmd([sys.executable, "-m", "compileall", "-q", "pkg"], cwd=v.path)
        npyc = sum(1 for _d, _s, fs in os.walk(os.path.join(v.path, "pkg"))
                   for f in fs if f.endswith(".pyc"))
        b.check("compileall: .pyc written", t.name, npyc)
    return {name: dt}
