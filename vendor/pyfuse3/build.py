#!/usr/bin/env python3
"""Build and install pyfuse3 3.5.0 with the small patch set overlayfs-py needs.

pyfuse3 3.5 hides two FUSE features that decide directory-listing speed and default-ACL
correctness, and it compiles from source anyway (there is no binary wheel for libfuse3), so
we fetch its pinned sdist from PyPI, apply exact text edits to its Cython source, and let
pip build it as usual. Each edit must match exactly once: a different sdist fails loudly
instead of building something half-patched.

The patch set (``pyfuse3.OVERLAYFS_PY_PATCH`` = its level):

1. ``readdir`` and ``fsyncdir`` receive the directory's inode number when the kernel sends no
   file handle (fh 0). The kernel does that once the daemon answers OPENDIR with ENOSYS
   (``no_opendir``, Linux >= 5.1), and it then caches each directory's listing in its page
   cache (``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE`` by default): a warm ``find`` sends no
   request at all. Stock pyfuse3 passes only the (zero) file handle, so a daemon could not
   tell which directory is being read.
2. ``Operations.enable_dont_mask = True`` asks for ``FUSE_CAP_DONT_MASK``: the kernel stops
   applying the umask to create/mkdir/mknod and passes it in ``ctx.umask`` instead, so the
   daemon can let a parent's default ACL decide the mode as a local filesystem does.

Usage: build.py PYTHON   (installs into that interpreter's environment; no-op when the
installed pyfuse3 already carries this patch level).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.5.0"
SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
PATCH_LEVEL = 1

EDITS = {
    "src/pyfuse3/handlers.pxi": [
        # 1. readdirplus: fh 0 means "no opendir": pass the inode instead
        ("""    c.size = size
    c.off = off
    c.fh = fi.fh
    save_retval(fuse_readdirplus_async(c))""",
         """    c.size = size
    c.off = off
    c.fh = fi.fh if fi.fh != 0 else ino    # overlayfs-py: no_opendir
    save_retval(fuse_readdirplus_async(c))"""),
        # 1. fsyncdir: same
        ("""    c.flags = datasync
    c.fh = fi.fh
    save_retval(fuse_fsyncdir_async(c))""",
         """    c.flags = datasync
    c.fh = fi.fh if fi.fh != 0 else ino    # overlayfs-py: no_opendir
    save_retval(fuse_fsyncdir_async(c))"""),
        # 2. DONT_MASK on request
        ("""    if (operations.enable_acl and
        conn.capable & FUSE_CAP_POSIX_ACL):
        conn.want |= FUSE_CAP_POSIX_ACL
""",
         """    if (operations.enable_acl and
        conn.capable & FUSE_CAP_POSIX_ACL):
        conn.want |= FUSE_CAP_POSIX_ACL
    if (getattr(operations, 'enable_dont_mask', False) and
        conn.capable & FUSE_CAP_DONT_MASK):
        conn.want |= FUSE_CAP_DONT_MASK
"""),
    ],
    "src/pyfuse3/__init__.pyx": [
        ("""ROOT_INODE = FUSE_ROOT_ID
""",
         f"""ROOT_INODE = FUSE_ROOT_ID
OVERLAYFS_PY_PATCH = {PATCH_LEVEL}
"""),
    ],
    "PKG-INFO": [
        (f"\nVersion: {VERSION}\n", f"\nVersion: {VERSION}+overlayfspy{PATCH_LEVEL}\n"),
    ],
}


def installed_level(python: str) -> int:
    probe = "import pyfuse3; print(getattr(pyfuse3, 'OVERLAYFS_PY_PATCH', 0))"
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return int(r.stdout.strip() or 0) if r.returncode == 0 else -1


def apply_edits(src: Path) -> None:
    for rel, edits in EDITS.items():
        path = src / rel
        text = path.read_text()
        for old, new in edits:
            n = text.count(old)
            if n != 1:
                sys.exit(f"vendor/pyfuse3: edit for {rel} matches {n} times (expected 1); "
                         f"is this pyfuse3 {VERSION}?")
            text = text.replace(old, new)
        path.write_text(text)


def main() -> None:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    if installed_level(python) >= PATCH_LEVEL:
        return
    with tempfile.TemporaryDirectory(prefix="pyfuse3-build-") as tmp:
        tmp = Path(tmp)
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"pyfuse3=={VERSION}", "-d", str(tmp)],
                       check=True)
        sdist = tmp / f"pyfuse3-{VERSION}.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"vendor/pyfuse3: {sdist.name} has sha256 {digest}, expected {SHA256}")
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = tmp / f"pyfuse3-{VERSION}"
        apply_edits(src)
        print(f"vendor/pyfuse3: building pyfuse3 {VERSION} with overlayfs-py patch "
              f"level {PATCH_LEVEL} (about a minute)", flush=True)
        # replace a stock pyfuse3 of the same version; pip resolves its dependency (trio)
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "pyfuse3"],
                       check=False, capture_output=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", str(src)], check=True)
    level = installed_level(python)
    if level < PATCH_LEVEL:
        sys.exit(f"vendor/pyfuse3: installed pyfuse3 reports patch level {level}")


if __name__ == "__main__":
    main()
