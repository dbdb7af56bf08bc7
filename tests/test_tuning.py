"""Kernel-side tuning the daemon applies to its own mount."""
from __future__ import annotations

import os
import time

import pytest

import writekit as wk
from conftest import fuse_only

pytestmark = pytest.mark.mount


def _bdi(mnt: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return fields[2]
    raise AssertionError(f"{mnt} not in mountinfo")


def test_read_ahead_is_raised_after_init(make_layers, mounted):
    """The bdi read-ahead must be set after INIT: the kernel lowers it to the INIT reply's
    value (the 128 KiB it offered at mount time), undoing an earlier write."""
    fuse_only("the kernel overlay has no bdi of its own")
    if wk.is_fuse_overlayfs():
        pytest.skip("overlayfs-py's tuning")
    from overlayfs_py.session import READ_AHEAD_KB
    m = mounted(make_layers({"f": "x"}))
    os.stat(os.path.join(wk.mp(m), "f"))              # INIT is done once a request is served
    path = f"/sys/class/bdi/{_bdi(wk.mp(m))}/read_ahead_kb"
    deadline = time.monotonic() + 5
    while True:
        with open(path) as f:
            value = int(f.read())
        if value == READ_AHEAD_KB or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert value == READ_AHEAD_KB
