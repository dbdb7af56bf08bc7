"""A directory's attributes when a copy-up makes it merged, against the kernel overlay.

A directory that only a lower layer has shows that directory's link count; once a change
below it copies it up it is merged, and the kernel overlay shows one link ("nlink=1
pacifies find"). The kernel caches a FUSE directory's attributes for the whole attribute
timeout, so the daemon must have it fetch them again at the copy-up: found by the
differential state machine (an fstat of a directory whose subdirectory got a symlink).
"""
from __future__ import annotations

import os

import pytest

from layerkit import OPAQUE_KERNEL, OPAQUE_OCI
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]


def nlink(f):
    return os.stat(f).st_nlink


@pytest.mark.parametrize("how", ["symlink", "create", "mkdir"])
def test_copy_up_of_a_lower_directory_refreshes_its_link_count(pair, how):
    p = pair({"a": OPAQUE_KERNEL, "a/x": OPAQUE_OCI, "b/x/f": "f\n"}, {"c/x": "lower2\n"})
    for d in ("a", "b"):
        fd_o, fd_k = os.open(p.o(d), os.O_RDONLY), os.open(p.k(d), os.O_RDONLY)
        try:
            assert os.fstat(fd_o).st_nlink == os.fstat(fd_k).st_nlink == 3, d
            p.both(nlink, d)
            make = {"symlink": lambda f: os.symlink("t", f),
                    "create": lambda f: os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)),
                    "mkdir": lambda f: os.mkdir(f)}[how]
            p.both(make, f"{d}/x/new", what=how)
            p.both(nlink, d, what="stat")
            p.both(nlink, f"{d}/x", what="stat")
            assert os.fstat(fd_o).st_nlink == os.fstat(fd_k).st_nlink == 1, d
        finally:
            os.close(fd_o)
            os.close(fd_k)
    p.check()
