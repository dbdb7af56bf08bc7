"""The copy-up append again, on an xfs (reflink=1) loop image: does a target clone?"""
import contextlib
import os
import shutil
import subprocess
from typing import Optional

from ..common import FIXED_MTIME, MiB, Metric, NotApplicable, human_bytes
from . import workload
from .copyup import copy_up


@workload("reflink", order=150, rows=lambda s: [
    Metric(f"xfs reflink copy-up: append 1 B to {human_bytes(s.big_bytes)}", "s")])
def reflink(b, t, rows):
    """Skipped with --no-xfs (the default when mkfs.xfs is missing)."""
    (name,) = rows
    err = b.state.get("xfs_error")
    if err:
        raise NotApplicable(err)
    xfs = b.state.get("xfs")
    if xfs is None:
        xfs = b.state["xfs"] = XfsImage(b.fx)
        b.at_end(xfs.teardown)
        try:
            xfs.setup()
        except NotApplicable as e:
            b.state["xfs_error"] = str(e)
            raise
        except Exception as e:
            b.state["xfs_error"] = f"xfs setup failed: {e}"
            raise NotApplicable(b.state["xfs_error"])
    a, _ = copy_up(b, t, xfs.lower, base=os.path.join(xfs.mnt, "run"))
    return {name: a}


class XfsImage:
    def __init__(self, fx):
        self.fx = fx
        self.img = os.path.join(fx.root, "xfs.img")
        self.mnt = os.path.join(fx.root, "xfs")
        self.loop: Optional[str] = None
        self.mounted = False
        self.lower = os.path.join(self.mnt, "lower")

    def setup(self) -> str:
        if not shutil.which("mkfs.xfs"):
            raise NotApplicable("mkfs.xfs not installed (apt-get install xfsprogs)")
        size = 3 * self.fx.sizes.big_bytes + 512 * MiB
        if not os.path.exists(self.img + ".ok"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.img)
            with open(self.img, "wb") as f:
                f.truncate(size)
            subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.img], check=True)
            open(self.img + ".ok", "w").close()
        os.makedirs(self.mnt, exist_ok=True)
        self.loop = subprocess.run(["losetup", "--find", "--show", self.img], check=True,
                                   capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-t", "xfs", self.loop, self.mnt], check=True)
        self.mounted = True
        lower = os.path.join(self.mnt, "lower")
        big = os.path.join(lower, "big.bin")
        if not os.path.exists(os.path.join(self.mnt, "lower.ok")):
            shutil.rmtree(lower, ignore_errors=True)
            os.makedirs(lower)
            shutil.copyfile(os.path.join(self.fx.image, "big.bin"), big)
            os.utime(big, (FIXED_MTIME, FIXED_MTIME))
            os.sync()
            open(os.path.join(self.mnt, "lower.ok"), "w").close()
        runs = os.path.join(self.mnt, "run")
        shutil.rmtree(runs, ignore_errors=True)
        os.makedirs(runs)
        return lower

    def teardown(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
            self.mounted = False
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None
