"""metacopy=on: the first metadata change of the big lower file, one fresh mount per
operation; kernel and overlayfs-py must leave a metadata-only upper file."""
import os
import subprocess
import time

from ..common import FIXED_MTIME, MiB, Metric, human_bytes, log, read_file, same_blocks
from . import workload

METACOPY_OPS = ("chmod", "chown", "utimes", "setxattr")
METACOPY_TARGETS = ("kernel", "overlayfs-py")   # mounted with metacopy=on, and checked
METACOPY_XATTR = "trusted.overlay.metacopy"
METACOPY_MAX_ALLOC = 64 * 1024    # allocated bytes still counted as "no data" (an xattr block)
METACOPY_UID = 1000
METACOPY_TIME = FIXED_MTIME + 86400


@workload("metacopy", order=100, rows=lambda s: [
    Metric(f"metacopy=on: {op} {human_bytes(s.big_bytes)} lower file", "s")
    for op in METACOPY_OPS])
def metacopy(b, t, rows):
    """chmod, chown, utimes, setxattr: each the first metadata change of the big lower file,
    each on its own fresh mount. kernel and overlayfs-py get -o metacopy=on (a metadata-only
    copy-up: a sparse upper file with the trusted.overlay.metacopy xattr, checked after each
    operation); fuse-overlayfs has no metacopy and copies the whole file."""
    src = os.path.join(b.fx.image, "big.bin")
    size = os.stat(src).st_size
    read_file(src, size)      # lower data in the page cache: measure the fs, not the disk
    meta = t.name in METACOPY_TARGETS
    opts = ("metacopy=on",) if meta else ()
    xname, xvalue = "user.bench", b"metacopy"
    ops = {
        "chmod": (lambda p: os.chmod(p, 0o600),
                  lambda p, st: st.st_mode & 0o7777 == 0o600),
        "chown": (lambda p: os.chown(p, METACOPY_UID, -1),
                  lambda p, st: st.st_uid == METACOPY_UID),
        "utimes": (lambda p: os.utime(p, (METACOPY_TIME, METACOPY_TIME)),
                   lambda p, st: int(st.st_mtime) == METACOPY_TIME),
        "setxattr": (lambda p: os.setxattr(p, xname, xvalue),
                     lambda p, st: os.getxattr(p, xname) == xvalue),
    }

    def copy(p):
        subprocess.run(["cp", "--reflink=auto", "--preserve=all", src, p], check=True)

    out = {}
    for op, name in zip(METACOPY_OPS, rows):
        change, took = ops[op]
        try:
            with b.view(t, [b.fx.image], plain_copy=copy, options=opts) as v:
                p = os.path.join(v.path, "big.bin")
                os.lstat(p)       # the lookup is not part of the measurement
                t0 = time.perf_counter()
                change(p)
                dt = time.perf_counter() - t0
                st = os.stat(p)
                if not took(p, st):
                    raise RuntimeError(f"{op} did not take effect")
                if st.st_size != size:
                    raise RuntimeError(f"size after {op} is {st.st_size}, want {size}")
                if meta:
                    _check_metacopy(b, t, op, os.path.join(v.base, "u", "big.bin"))
                same_blocks(p, src, size)
            out[name] = dt
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            # one operation failing must not hide the others
            err = b.cell_error(e)
            b.record_error(name, t.name, err)
            log(f"metacopy {op} {t.name}: FAILED {err[:300]}")
    return out

def _check_metacopy(b, t, op: str, upper: str) -> None:
    """After a metadata change with metacopy=on, the upper file must carry the metacopy
    xattr and hold (about) no data blocks. Recorded as a consistency check, and noted when
    it fails. Outside the timed part."""
    problems = []
    try:
        ust = os.lstat(upper)
    except FileNotFoundError:
        problems.append("no upper file (no copy-up at all)")
    else:
        try:
            os.getxattr(upper, METACOPY_XATTR, follow_symlinks=False)
        except OSError as e:
            problems.append(f"no {METACOPY_XATTR} xattr ({os.strerror(e.errno)})")
        alloc = ust.st_blocks * 512
        if alloc > METACOPY_MAX_ALLOC:
            problems.append(f"{alloc / MiB:.0f} MiB of data allocated in the upper file "
                            f"(st_blocks {ust.st_blocks}): the data was copied")
    b.check(f"metacopy=on {op}: upper file is metadata-only", t.name,
               "yes" if not problems else "NO: " + "; ".join(problems))
    if problems:
        note = f"metacopy check FAILED for {t.name}, {op}: " + "; ".join(problems)
        if note not in b.notes:
            b.notes.append(note)
