"""One stack mounted twice, by the program under test and by the kernel overlay, for
differential tests that drive both with the same calls.

``Pair.both(fn, *rels)`` runs ``fn`` on the same relative paths in both mounts and asserts
that the outcomes (value, or errno name) are equal; ``Pair.check()`` compares the merged
views and the upper directories (writekit.compare_uppers); ``Pair.remount()`` unmounts both
and mounts them again on the same layers (for what must survive an unmount).

The kernel gets its own copy of the layers (converted to its on-disk format) and of the
upper, so both start from the same state and never share a directory.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

import layerkit
import writekit as wk


@pytest.fixture
def pair(make_layers, tmp_path):
    """``pair(*lower_specs, upper=True, ours=(), kernel=())`` -> Pair, unmounted at the end."""
    made = []

    def make(*lowers, **kw):
        p = Pair(make_layers, tmp_path, *lowers, **kw)
        made.append(p)
        return p
    try:
        yield make
    finally:
        for p in made:
            p.close()


class Pair:
    def __init__(self, make_layers, tmp_path, *lowers, upper=True, ours=(), kernel=(),
                 kernel_upper_from=None):
        """``ours`` / ``kernel``: mount options of each side (the kernel's default to
        writekit.KERNEL_OPTS)."""
        if wk.kernel_mode():
            pytest.skip("OVL_TEST_PROG=kernel: nothing to compare against")
        if not (wk.fuse_available() and wk.kernel_overlay_available()):
            pytest.skip("needs /dev/fuse, fusermount3 and the kernel overlay driver as root")
        self.stack = make_layers(*lowers, upper=upper)
        self.ours_opts = tuple(ours)
        self.kernel_opts = tuple(kernel) if kernel else wk.KERNEL_OPTS
        kroot = Path(tmp_path) / f"kernel-{self.stack.root.name}"
        kroot.mkdir()
        self.klowers = []
        for i, layer in enumerate(self.stack.lowers):
            dst = layerkit.copy_tree(layer, kroot / f"lower{i}")
            layerkit.to_kernel_format(dst)
            self.klowers.append(dst)
        self.kupper = layerkit.copy_tree(self.stack.upper, kroot / "upper")
        layerkit.to_kernel_format(self.kupper)
        self.kwork = kroot / "work"
        self.kwork.mkdir()
        self.kmnt = kroot / "mnt"
        self.kmnt.mkdir()
        self.omnt = self.stack.mnt
        self.oupper = self.stack.upper
        self.exits = contextlib.ExitStack()
        self.fm = None
        try:
            self.mount()
        except BaseException:
            self.exits.close()
            raise

    # -- mounts ---------------------------------------------------------------------------
    def mount(self):
        self.fm = self.exits.enter_context(layerkit.fuse_mount(
            None, self.stack.lowers, self.stack.upper, self.stack.work, self.omnt,
            self.ours_opts))
        self.exits.enter_context(layerkit.kernel_overlay(
            self.klowers, self.kupper, self.kwork, mnt=self.kmnt, options=self.kernel_opts))

    def unmount(self):
        """Unmount both (ours must exit 0)."""
        self.exits.close()
        self.exits = contextlib.ExitStack()

    def remount(self):
        self.unmount()
        self.mount()

    def close(self):
        self.exits.close()

    # -- operations -----------------------------------------------------------------------
    def o(self, rel=""):
        return os.path.join(self.omnt, rel) if rel else os.fspath(self.omnt)

    def k(self, rel=""):
        return os.path.join(self.kmnt, rel) if rel else os.fspath(self.kmnt)

    def both(self, fn, *rels, what=None, compare_value=True):
        """fn(*paths) on both mounts; the outcomes must match. Returns ours."""
        ro = wk.attempt(fn, *[self.o(r) for r in rels])
        rk = wk.attempt(fn, *[self.k(r) for r in rels])
        label = what or getattr(fn, "__name__", "op")
        if compare_value:
            assert ro == rk, f"{label}{rels}: kernel -> {rk}, ours -> {ro}"
        else:
            assert wk.outcome(ro) == wk.outcome(rk), \
                f"{label}{rels}: kernel -> {rk}, ours -> {ro}"
        return ro

    def check(self, uppers=True):
        """Same merged view; same upper dirs (copy-ups one side did not need aside)."""
        sk = wk.merged_snapshot(self.kmnt)
        so = wk.merged_snapshot(self.omnt)
        diff = wk.diff_snapshots(sk, so, "kernel", "ours")
        assert not diff, "merged views differ:\n  " + "\n  ".join(diff)
        if uppers:
            diff, _ = wk.compare_uppers(self.kupper, self.oupper, self.klowers)
            assert not diff, "upper dirs differ:\n  " + "\n  ".join(diff)
        return so
