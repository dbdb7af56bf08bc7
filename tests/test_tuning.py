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


def test_node_table_is_trimmed_on_big_trees(make_layers, mounted, tmp_path):
    """Past max_nodes the daemon asks the kernel to forget unused files of the least recently
    listed directories, and the kernel does (FORGET); everything stays correct after."""
    fuse_only("counts the daemon's requests")
    if wk.is_fuse_overlayfs():
        pytest.skip("overlayfs-py's node table")
    import re
    import subprocess
    import sys
    spec = {f"d{i // 40}/f{i}": f"{i}\n" for i in range(6000)}
    stack = make_layers(spec, {"d0/low": "low\n"}, upper=True)
    m = mounted(stack, options=("max_nodes=1000",), prog=f"{sys.executable} -m overlayfs_py -d")
    mnt = wk.mp(m)
    # a process whose working directory is in the tree must keep it through the trimming
    cwd = os.path.join(mnt, "d0")
    sitter = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; os.chdir(sys.argv[1]); time.sleep(3); "
         "print(os.getcwd()); print(sorted(os.listdir('.'))[:2])", cwd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    subprocess.run(["du", "-s", mnt], check=True, capture_output=True)

    def forgotten():
        return len(re.findall(r"\(\d+, \d+\)", "".join(
            line for line in m.log().splitlines() if "-> forget(" in line)))
    deadline = time.monotonic() + 10
    while forgotten() < 4000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "trim: " in m.log()
    out, err = sitter.communicate(timeout=20)
    assert sitter.returncode == 0, err
    assert out.splitlines() == [cwd, "['f0', 'f1']"]
    assert forgotten() >= 4000, "the kernel did not forget the trimmed directories"
    # trimmed directories are looked up and listed again, unchanged
    out = subprocess.run(["find", mnt, "-type", "f"], check=True, capture_output=True).stdout
    assert len(out.splitlines()) == 6001
    assert wk.read_file(os.path.join(mnt, "d0/f7")) == b"7\n"
    with open(os.path.join(mnt, "d0/f7"), "a") as f:
        f.write("more\n")
    assert wk.read_file(os.path.join(stack.upper, "d0/f7")) == b"7\nmore\n"
    assert wk.read_file(os.path.join(mnt, "d0/low")) == b"low\n"
