"""Differential read test: random layer stacks, our mount vs the kernel overlay.

Each case generates a stack of 2-5 layers (optionally with an upper dir, which is only
read), mixing regular files, directories, symlinks, hard links, fifos, sockets, device
nodes, xattrs, odd modes and owners, whiteouts (char 0/0, ``.wh.NAME`` and xattr
whiteouts) and opaque directories in both the kernel and the OCI format. The stack is mounted by the FUSE overlay under test and, after
``to_kernel_format`` on a copy, by the kernel overlay; ``layerkit.snapshot`` of the two
merged trees must be identical, readdir's d_type must agree with lstat, and reading
through the mount must leave every layer unchanged.

Stacks are generated under the rules the kernel imposes: a whiteout inside a directory
that only its own layer contributes to is *listed* by the kernel (it reads such a
directory straight from the layer; see test_merged_view.py::
test_whiteouts_in_unmerged_dirs_are_hidden), and an xattr whiteout is only honoured in a
lower layer, in a directory marked opaque=x that is not a layer root and has a layer below
it in the merge. The generator turns whiteouts breaking these rules into plain files.
Everything else the generator makes is fair game.

Two drivers share the generator: a seeded-random one (fixed seeds, many cases) and a
hypothesis one (~30 examples, shrinking to a small failing stack).
"""
from __future__ import annotations

import dataclasses
import os
import random
import stat
from pathlib import Path
from typing import Dict, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerkit
from conftest import fuse_only, require_fuse, require_kernel_overlay
from layerkit import (
    BlockDevice, CharDevice, Dir, Fifo, File, Hardlink, Socket, Symlink,
    OPAQUE_KERNEL, OPAQUE_OCI, WHITEOUT_KERNEL, WHITEOUT_OCI, WHITEOUT_XATTR,
)

NAMES = ["a", "b", "c", "d"]
MAX_DEPTH = 3
# Kinds, repeated to weight them; "absent" first so hypothesis shrinks towards nothing.
KIND_TABLE = (["absent"] * 7 + ["file"] * 4 + ["dir"] * 3
              + ["symlink", "hardlink", "fifo", "socket", "chardev", "blockdev",
                 "wh_kernel", "wh_oci", "wh_xattr", "wh_kernel", "wh_oci", "opq_kernel",
                 "opq_oci"])
DIR_KINDS = {"dir", "opq_kernel", "opq_oci"}
OPAQUE_KINDS = {"opq_kernel", "opq_oci"}
WHITEOUT_KINDS = {"wh_kernel", "wh_oci", "wh_xattr"}
FILE_MODES = [0o644, 0o600, 0o755, 0o4755, 0o2711, 0o000, 0o444]
DIR_MODES = [0o755, 0o700, 0o555, 0o1777, 0o2775]
OWNERS = [0, 0, 1000, 65534]
SYMLINK_TARGETS = ["a", "../b", "/etc/passwd", "c/d", "does-not-exist", ".", "/"]
XATTR_SETS = [{}, {}, {"user.k": b"v"}, {"user.k": b"other", "user.z": b""},
              {"user.bin": bytes(range(256))}, {"security.t": b"lbl"}]


class RandomChooser:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options):
        return self.rng.choice(options)


class DataChooser:
    def __init__(self, data) -> None:
        self.data = data

    def pick(self, options):
        return self.data.draw(st.sampled_from(options))


@dataclasses.dataclass
class Node:
    kind: str
    spec: object          # the layerkit spec value


def gen_layer(ch, idx: int, is_upper: bool = False) -> Dict[str, Node]:
    nodes: Dict[str, Node] = {}
    files: List[str] = []

    def gen_dir(prefix: str, depth: int) -> None:
        parent_kind = nodes[prefix[:-1]].kind if prefix else "root"
        for name in NAMES:
            path = f"{prefix}{name}"
            kind = ch.pick(KIND_TABLE)
            if kind == "wh_xattr" and (parent_kind != "dir" or is_upper):
                # xattr whiteouts need their directory marked opaque=x: not possible in an
                # opaque (=y) dir; the kernel ignores the mark on a layer root, and honours
                # xattr whiteouts in lower layers only (they are for layer builders).
                kind = "wh_kernel"
            if kind in DIR_KINDS and depth >= MAX_DEPTH:
                kind = "file"
            if kind == "hardlink" and not files:
                kind = "file"
            if kind == "absent":
                continue
            if kind == "file":
                content = ch.pick(["", f"L{idx}:{path}", f"L{idx}:{path}\n" * 50, "same"])
                spec = File(content, mode=ch.pick(FILE_MODES), uid=ch.pick(OWNERS),
                            gid=ch.pick(OWNERS), xattrs=ch.pick(XATTR_SETS))
                files.append(path)
            elif kind == "dir":
                spec = Dir(mode=ch.pick(DIR_MODES), uid=ch.pick(OWNERS), gid=ch.pick(OWNERS),
                           xattrs=ch.pick(XATTR_SETS))
            elif kind == "opq_kernel":
                spec = OPAQUE_KERNEL
            elif kind == "opq_oci":
                spec = OPAQUE_OCI
            elif kind == "symlink":
                spec = Symlink(ch.pick(SYMLINK_TARGETS), uid=ch.pick(OWNERS))
            elif kind == "hardlink":
                spec = Hardlink(ch.pick(files))
            elif kind == "fifo":
                spec = Fifo(mode=ch.pick([0o644, 0o600]))
            elif kind == "socket":
                spec = Socket(mode=ch.pick([0o755, 0o777]))
            elif kind == "chardev":
                spec = CharDevice(ch.pick([1, 5, 136]), ch.pick([1, 3, 7]))
            elif kind == "blockdev":
                spec = BlockDevice(ch.pick([7, 8]), ch.pick([0, 1, 16]))
            elif kind == "wh_kernel":
                spec = WHITEOUT_KERNEL
            elif kind == "wh_oci":
                spec = WHITEOUT_OCI
            elif kind == "wh_xattr":
                spec = WHITEOUT_XATTR
            else:                                   # pragma: no cover
                raise AssertionError(kind)
            nodes[path] = Node(kind, spec)
            if kind in DIR_KINDS:
                gen_dir(path + "/", depth + 1)

    gen_dir("", 1)
    return nodes


def contributors(layers: List[Dict[str, Node]], path: str) -> List[int]:
    """Indices (top first) of the layers whose directory at ``path`` is part of the merged
    directory, following the kernel's lookup: stop at a whiteout, a non-directory or an
    opaque directory. Empty if ``path`` is not a directory in the merged view."""
    if path == "":
        return list(range(len(layers)))
    parent = path.rpartition("/")[0]
    out: List[int] = []
    for i in contributors(layers, parent):
        node = layers[i].get(path)
        if node is None:
            continue
        if node.kind in WHITEOUT_KINDS or node.kind not in DIR_KINDS:
            break
        out.append(i)
        if node.kind in OPAQUE_KINDS:
            break
    return out


def repair(layers: List[Dict[str, Node]]) -> None:
    """Turn whiteouts the kernel would list (their layer is the only one contributing to
    their directory) into plain files. This leaves every contributor set unchanged: a file
    stops the lookup exactly where the whiteout did."""
    for i, layer in enumerate(layers):
        for path, node in list(layer.items()):
            if node.kind not in WHITEOUT_KINDS:
                continue
            pc = contributors(layers, path.rpartition("/")[0])
            if i in pc and (len(pc) == 1 or (node.kind == "wh_xattr" and pc[-1] == i)):
                # (an xattr whiteout needs a layer below it in the same merged dir: the
                # kernel does not read the opaque=x mark of the lowest layer of a lookup)
                layer[path] = Node("file", File(f"was-whiteout L{i}:{path}"))


def gen_stack(ch):
    n = ch.pick([2, 2, 3, 3, 4, 5])
    has_upper = ch.pick([False, True])
    layers = [gen_layer(ch, i, is_upper=has_upper and i == 0) for i in range(n)]
    repair(layers)
    return layers, has_upper


def _show(spec) -> str:
    if isinstance(spec, (File, Dir)):
        parts = []
        if isinstance(spec, File):
            parts.append(f"{len(spec.content)}B {spec.content[:24]!r}")
        parts.append(f"mode={spec.mode:o}")
        if spec.uid is not None or spec.gid is not None:
            parts.append(f"owner={spec.uid}:{spec.gid}")
        if spec.xattrs:
            parts.append("xattrs=" + ",".join(f"{k}({len(v)}B)" for k, v in spec.xattrs.items()))
        return " ".join(parts)
    if isinstance(spec, (Symlink, Hardlink)):
        return f"-> {spec.target}"
    if isinstance(spec, layerkit.Device):
        return f"{spec.kind} {spec.major}:{spec.minor}"
    return ""


def describe(layers, has_upper) -> str:
    lines = []
    for i, layer in enumerate(layers):
        role = "upper" if (has_upper and i == 0) else f"lower{i - has_upper}"
        lines.append(f"  layer {i} ({role}):")
        for path in sorted(layer):
            lines.append(f"    {path}: {layer[path].kind} {_show(layer[path].spec)}")
    return "\n".join(lines)


def _layer_state(path: Path):
    # Everything but atime/ctime: reading through the mount must not change a layer.
    return layerkit.snapshot(path, times=True,
                             xattr_filter=lambda n: not n.startswith("system."))


def _readdir_types_agree(root: Path) -> List[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        with os.scandir(dirpath) as it:
            for e in it:
                mode = os.lstat(e.path).st_mode
                if e.is_dir(follow_symlinks=False) != stat.S_ISDIR(mode) or \
                        e.is_symlink() != stat.S_ISLNK(mode) or \
                        e.is_file(follow_symlinks=False) != stat.S_ISREG(mode):
                    bad.append(f"{os.path.relpath(e.path, root)}: d_type disagrees with lstat")
    return bad


def run_case(workdir: Path, layers, has_upper: bool, options=()) -> None:
    """Build the stack under ``workdir``, mount it both ways, compare."""
    workdir.mkdir(parents=True)
    dirs = [layerkit.make_layer(workdir / f"L{i}", {p: n.spec for p, n in layer.items()})
            for i, layer in enumerate(layers)]
    upper = dirs[0] if has_upper else None
    lowers = dirs[1:] if has_upper else dirs
    work = None
    if has_upper:
        work = workdir / "work"
        work.mkdir()
    before = {d: _layer_state(d) for d in dirs}

    kroot = workdir / "kernel"
    kroot.mkdir()
    klowers = []
    for i, d in enumerate(lowers):
        c = layerkit.copy_tree(d, kroot / f"lower{i}")
        layerkit.to_kernel_format(c)
        klowers.append(c)
    kupper = kwork = None
    if has_upper:
        kupper = layerkit.copy_tree(upper, kroot / "upper")
        layerkit.to_kernel_format(kupper)
        kwork = kroot / "work"
        kwork.mkdir()
    kmnt = kroot / "mnt"
    kmnt.mkdir()
    with layerkit.kernel_overlay(klowers, kupper, kwork, mnt=kmnt):
        want = layerkit.snapshot(kmnt, times=True)

    mnt = workdir / "mnt"
    mnt.mkdir()
    with layerkit.fuse_mount(None, lowers, upper, work, mnt, options):
        got = layerkit.snapshot(mnt, times=True)
        bad_types = _readdir_types_agree(mnt)

    problems = layerkit.diff_snapshots(want, got, names=("kernel", "fuse")) + bad_types
    after = {d: _layer_state(d) for d in dirs}
    for d in dirs:
        problems += [f"layer {d.name} changed: {x}"
                     for x in layerkit.diff_snapshots(before[d], after[d], ("before", "after"))]
    assert not problems, ("merged views differ:\n  " + "\n  ".join(problems[:60])
                          + f"\nstack:\n{describe(layers, has_upper)}")


def _skip_unless_possible() -> None:
    fuse_only("compares a FUSE mount with the kernel")
    require_fuse()
    require_kernel_overlay()


# --------------------------------------------------------------------------------------


def test_generator_respects_the_kernel_rule():
    # The generator's own invariant, checked without mounting.
    for seed in range(200):
        layers, _ = gen_stack(RandomChooser(seed))
        for i, layer in enumerate(layers):
            for path, node in layer.items():
                if node.kind in WHITEOUT_KINDS:
                    pc = contributors(layers, path.rpartition("/")[0])
                    assert not (i in pc and len(pc) == 1), (seed, i, path)
                    if node.kind == "wh_xattr" and i in pc:
                        assert pc[-1] != i, (seed, i, path)


def test_contributors_model():
    f = Node("file", File("x"))
    d = Node("dir", Dir())
    o = Node("opq_kernel", OPAQUE_KERNEL)
    w = Node("wh_oci", WHITEOUT_OCI)
    layers = [{"x": d, "y": o, "z": d}, {"x": d, "y": d, "z": w}, {"x": f, "y": d, "z": d}]
    assert contributors(layers, "x") == [0, 1]
    assert contributors(layers, "y") == [0]
    assert contributors(layers, "z") == [0]
    assert contributors(layers, "") == [0, 1, 2]


SEEDS = list(range(80))
# The cache switches change nothing that can be read through the mount: a few stacks again
# with everything off.
NO_CACHE = ("timeout=0", "writeback=0", "keep_cache=0")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_stack_matches_kernel(seed, tmp_path):
    _skip_unless_possible()
    layers, has_upper = gen_stack(RandomChooser(seed))
    run_case(tmp_path / "case", layers, has_upper)


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_random_stack_matches_kernel_without_caches(seed, tmp_path):
    _skip_unless_possible()
    layers, has_upper = gen_stack(RandomChooser(seed))
    run_case(tmp_path / "case", layers, has_upper, options=NO_CACHE)


_counter = [0]


@pytest.mark.timeout(900)
@settings(max_examples=int(os.environ.get("OVL_HYPOTHESIS_EXAMPLES", "30")), deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_stack_matches_kernel(tmp_path, data):
    _skip_unless_possible()
    layers, has_upper = gen_stack(DataChooser(data))
    _counter[0] += 1
    run_case(tmp_path / f"ex{_counter[0]}", layers, has_upper)
