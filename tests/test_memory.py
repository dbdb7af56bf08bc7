"""What the daemon keeps per node and per directory (the memory figures are in `make bench`).

The unit tests build an Overlay on tmp_path layers, without a mount, and check that state
shared or dropped to save memory is shared or dropped, and that what is asked for is still
right: attributes built fresh, listings rebuilt with the same offsets.
"""
from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

import pytest

import layerkit
from overlayfs_py.config import parse_argv
from overlayfs_py.lookup import DIR, NONDIR, merge_listings
from overlayfs_py.overlay import Overlay
from test_merged_view import _libc, _read_one


def _overlay(tmp_path: Path, *specs) -> Overlay:
    lowers = [layerkit.make_layer(tmp_path / f"l{i}", spec) for i, spec in enumerate(specs)]
    (tmp_path / "m").mkdir()
    config = parse_argv(["-o", "lowerdir=" + ":".join(map(str, lowers)), str(tmp_path / "m")])
    return Overlay(config)


def test_single_occurrences_are_shared():
    idx = merge_listings([(0, [(b"a", NONDIR), (b"b", NONDIR), (b"d", DIR), (b"m", DIR)]),
                          (1, [(b"c", NONDIR), (b"m", DIR)])])
    assert idx[b"a"] == idx[b"b"] == ((0, False),) and idx[b"a"] is idx[b"b"]
    assert idx[b"c"] == ((1, False),) and idx[b"d"] == ((0, True),)
    assert idx[b"m"] == ((0, True), (1, True))
    again = merge_listings([(0, [(b"x", NONDIR)])])
    assert again[b"x"] is idx[b"a"]


def test_file_nodes_share_layers_and_keep_packed_keys(tmp_path):
    ov = _overlay(tmp_path, {f"d/f{i}": "x" for i in range(20)}, {"d/low": "y"})
    try:
        d = ov.child(ov.root, b"d")
        nodes = [ov.child(d, f"f{i}".encode()) for i in range(20)]
        assert all(n.layers == (0,) for n in nodes)
        assert len({id(n.layers) for n in nodes}) == 1
        low = ov.child(d, b"low")
        assert low.layers == (1,)
        # keys are one int each, and files numbered after their key need no by_key entry
        assert all(isinstance(n.key, int) for n in nodes + [low])
        assert not any(n in ov.table.by_key.values() for n in nodes + [low])
        assert ov.table.find((0, os.stat(tmp_path / "l0").st_dev,
                              os.stat(tmp_path / "l0" / "d" / "f3").st_ino)) is nodes[3]
    finally:
        ov.close()


def test_nodes_are_compact_and_files_are_found_by_key_not_kept_by_name(tmp_path):
    ov = _overlay(tmp_path, {"d/f": "x", "d/sub/y": "y", "d/h": "z"})
    try:
        d = ov.child(ov.root, b"d")
        f = ov.child(d, b"f")
        sub = ov.child(d, b"sub")
        assert d.is_dir and sub.is_dir and not f.is_dir
        # a file has no __dict__ and no room for a directory's index, listing and kids
        assert not hasattr(f, "__dict__") and f.index is f.kids is f.listing is None
        with pytest.raises(AttributeError):
            f.kids = {}
        assert type(sub).__slots__ == ("index", "listing", "kids")
        # one name: no list of paths is kept, only the parent and the name
        assert (f.parent, f.name, f.more) == (d, b"f", None) and f.paths == [(d, b"f")]
        # a file numbered after its key keeps a small number instead of the packed key
        assert f.key < 256 and f not in ov.table.by_key.values()
        assert ov.table._packed(f) >> 64 == f.key
        # files are not kept in the directory's kids; looking one up again finds its node
        assert set(d.kids) == {b"sub"}
        assert ov.child(d, b"f") is f and f.paths == [(d, b"f")]
        # a second name (a hard link in the layer) is another path of the same node
        os.link(tmp_path / "l0" / "d" / "f", tmp_path / "l0" / "d" / "f2")
        ov.refresh_entry(d, b"f2")
        assert ov.child(d, b"f2") is f
        assert f.paths == [(d, b"f"), (d, b"f2")] and f.more == [(d, b"f2")]
        f.put_path_first(d, b"f2")
        assert f.paths == [(d, b"f2"), (d, b"f")]
        f.remove_path(d, b"f2")
        assert (f.parent, f.name, f.more) == (d, b"f", None)
        f.remove_path(d, b"f")
        assert f.paths == [] and f.parent is None and f.name == b""
    finally:
        ov.close()


def test_file_attributes_are_built_when_asked_for(tmp_path):
    ov = _overlay(tmp_path, {"d/f": "data", "d/sub/x": "x"})
    try:
        d = ov.child(ov.root, b"d")
        f = ov.child(d, b"f")
        first = ov.node_attrs(f)                  # the lookup's reply takes child()'s attrs
        assert first.st_size == 4 and first.st_ino == f.ino
        assert f.attr is None                     # a file never opened keeps none
        os.chmod(tmp_path / "l0" / "d" / "f", 0o600)
        again = ov.node_attrs(f)                  # built afresh, not a stale copy
        assert stat.S_IMODE(again.st_mode) == 0o600 and again is not first
        assert f.attr is None
        sub = ov.child(d, b"sub")
        assert ov.node_attrs(sub) is sub.attr is not None     # directories keep theirs
        f.handles = set()                         # as after an open and a close
        kept = ov.node_attrs(f)
        assert f.attr is kept and ov.node_attrs(f) is kept
    finally:
        ov.close()


def test_listing_rebuilt_after_the_kernel_forgot_it_resumes_at_the_same_offsets(
        make_layers, mounted):
    # The daemon drops a directory's listing once the kernel has read all of it. Read it
    # fully, drop the kernel's page cache (its copy of the listing), then seek to positions
    # taken in the first pass: the kernel asks the daemon again from those offsets, and the
    # rebuilt listing must continue with the same entries.
    s = make_layers({f"big/t{i:04d}": "t" for i in range(300)},
                    {f"big/b{i:04d}": "b" for i in range(700)})
    m = mounted(s).path
    libc = _libc()
    d = libc.opendir(os.fsencode(m / "big"))
    assert d, os.strerror(ctypes.get_errno())
    try:
        order, positions = [], []
        while True:
            pos = libc.telldir(d)
            name = _read_one(libc, d)
            if name is None:
                break
            if name not in (".", ".."):
                positions.append(pos)
                order.append(name)
        assert len(order) == 1000
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        for k in (0, 1, 333, 500, 998, 999):
            libc.seekdir(d, positions[k])
            assert _read_one(libc, d) == order[k], f"seekdir to entry #{k}"
        libc.seekdir(d, positions[700])
        rest = [n for n in iter(lambda: _read_one(libc, d), None)]
        assert rest == order[700:]
    finally:
        libc.closedir(d)
    assert sorted(os.listdir(m / "big")) == sorted(order)
