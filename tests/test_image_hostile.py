"""Hostile and broken layers: every one is refused with one line naming the problem, exit 1,
nothing left in the store (no layer, an empty tmp/), and nothing written outside it.

Each layer's diff_id and digest are those of its own (bad) bytes, so the digest checks pass
and only the unpacker's own checks can refuse it. Symlinks and hard links in the layers point
at ``outside/``, a directory next to the store holding one file; after each attempt the whole
test directory except the store is compared with how it was before. (Digest and diff_id
mismatches, unknown media types, missing manifests, configs and blobs and unknown tags are
in test_image_store.py.)
"""
from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import imagekit  # noqa: E402
from imagekit import C, D, F, H, L, Layout, O, W, make_tar, raw  # noqa: E402
from test_image_store import cli, one_line_error, stored_layers  # noqa: E402

GZ = imagekit.MEDIA["gzip"]
ZS = imagekit.MEDIA["zstd"]
TAR = imagekit.MEDIA["none"]


def _ti(name: str, type_=tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = 0o644
    ti.mtime = imagekit.MTIME
    return ti


def _sparse_tar(tmp: Path) -> bytes:
    src = tmp / "sparse-src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    out = tmp / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(out), "-C", str(src),
                    "holes"], check=True)
    return out.read_bytes()


def _strip_end(tar: bytes) -> bytes:
    """The tar without its end-of-archive zero blocks."""
    end = len(tar)
    while end >= 512 and tar[end - 512:end] == b"\0" * 512:
        end -= 512
    return tar[:end]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1:]


def _corrupt_second_header(tar: bytes) -> bytes:
    # the second member's header follows the first's header and its 600 bytes of data
    second = 512 + 2 * 512
    assert tar[second:second + 1] == b"b", tar[second:second + 8]
    return _flip(tar, second + 150)              # inside its checksum field


GOOD = make_tar([F("a", "A" * 600), F("b", "B")])

# name -> (builder(outside) -> (blob, media type, diff_id or None=sha of tar), needle)
CASES = {
    "dotdot": (lambda o: make_tar([F("../escape", "x")]), "'..' in its name"),
    "dotdot-deep": (lambda o: make_tar([D("a"), F("a/../../escape", "x")]), "'..' in its name"),
    "absolute": (lambda o: make_tar([F(f"{o}/abs", "x")]), "absolute name"),
    "through-symlink-abs": (lambda o: make_tar([L("link", str(o)), F("link/evil", "x")]),
                            "leads through the symlink 'link'"),
    "through-symlink-rel": (lambda o: make_tar([L("up", "../../../.."), F("up/evil", "x")]),
                            "leads through the symlink 'up'"),
    "symlink-replaces-dir": (lambda o: make_tar([D("d"), F("d/f", "f"), L("d", str(o)),
                                                 F("d/g", "x")]),
                             "leads through the symlink 'd'"),
    "symlink-chain": (lambda o: make_tar([L("a", "b"), L("b", str(o)), F("a/evil", "x")]),
                      "leads through the symlink 'a'"),
    "through-file": (lambda o: make_tar([F("f", "x"), F("f/evil", "x")]),
                     "'f' is not a directory"),
    "device-through-symlink": (lambda o: make_tar([L("l", str(o)), C("l/null", 1, 3)]),
                               "leads through the symlink 'l'"),
    "whiteout-through-symlink": (lambda o: make_tar([L("l", str(o)), W("l/target")]),
                                 "leads through the symlink 'l'"),
    "opaque-through-symlink": (lambda o: make_tar([L("l", str(o)), O("l")]),
                               "leads through the symlink 'l'"),
    "hardlink-absolute": (lambda o: make_tar([H("h", f"{o}/target")]), "absolute name"),
    "hardlink-dotdot": (lambda o: make_tar([H("h", "../../outside/target")]),
                        "'..' in its name"),
    "hardlink-through-symlink": (lambda o: make_tar([L("l", str(o)), H("h", "l/target")]),
                                 "leads through the symlink 'l'"),
    "hardlink-missing": (lambda o: make_tar([H("h", "nothing/here")]),
                         "not an earlier entry of this layer"),
    "hardlink-to-dir": (lambda o: make_tar([D("d"), H("h", "d")]),
                        "hard link to the directory 'd'"),
    "invalid-whiteout": (lambda o: make_tar([F(".wh.", "")]), "invalid whiteout name"),
    "whiteout-dotdot": (lambda o: make_tar([F("a/.wh..", "")]), "invalid whiteout name"),
    "replaces-root": (lambda o: make_tar([raw(_ti("."), b"x")]), "would replace the layer's root"),
    "unsupported-type": (lambda o: make_tar([raw(_ti("vol", b"V"))]),
                         "unsupported tar type"),
    "truncated-data": (lambda o: GOOD[:512 + 300], "truncated tar"),
    "truncated-no-end": (lambda o: _strip_end(GOOD), "no end-of-archive marker"),
    "corrupt-header": (lambda o: _corrupt_second_header(GOOD), "invalid header"),
    "not-a-tar": (lambda o: b"this is not a tar archive\n" * 40, "not a tar archive"),
    "empty": (lambda o: b"", "not a tar archive"),
    "gzip-truncated": (lambda o: (gzip.compress(GOOD)[:-20], GZ, imagekit.sha(GOOD)),
                       "truncated gzip stream"),
    "gzip-corrupt": (lambda o: (_flip(gzip.compress(GOOD, mtime=0), 30), GZ,
                                imagekit.sha(GOOD)), "corrupt gzip data"),
    "gzip-trailing-garbage": (lambda o: (gzip.compress(GOOD) + b"garbage", GZ,
                                         imagekit.sha(GOOD)),
                              "trailing data after the gzip stream"),
    "gzip-not-gzip": (lambda o: (GOOD, GZ, imagekit.sha(GOOD)), "not a gzip stream"),
    "zstd-truncated": (lambda o: (imagekit.compress(GOOD, "zstd")[:-8], ZS,
                                  imagekit.sha(GOOD)), "truncated zstd stream"),
    "zstd-garbage": (lambda o: (imagekit.compress(GOOD, "zstd")[:8] + b"\xff" * 64, ZS,
                                imagekit.sha(GOOD)), "corrupt zstd data"),
}


def _listing(root: Path, skip: str):
    """Everything below root except ``skip``: path -> (type, size, mode, nlink, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.abspath(dirpath) == os.path.abspath(root / skip):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.abspath(p) == os.path.abspath(root / skip):
                continue
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size,
                                             st.st_mode, st.st_nlink, st.st_mtime_ns)
    return out


@pytest.fixture
def arena(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("precious\n")
    return tmp_path, outside


@pytest.mark.parametrize("threads", ["0", "4"])             # one thread; the writer pool
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_layer_is_refused(arena, case, threads):
    tmp_path, outside = arena
    build, needle = CASES[case]
    made = build(outside)
    blob, media, diff_id = made if isinstance(made, tuple) else (made, TAR, None)
    if diff_id is None:
        diff_id = imagekit.sha(blob)
    lay = Layout(tmp_path / "layout")
    lay.write_raw_layer_image(blob, media, diff_id)
    store = tmp_path / "store"
    before = _listing(tmp_path, "store")
    r = cli("image", "unpack", f"{lay.root}:t", "--store", store,
            env={"OVERLAYFS_PY_UNPACK_THREADS": threads})
    one_line_error(r, needle)
    assert "layer 1/1" in r.stderr
    assert _listing(tmp_path, "store") == before          # nothing outside the store
    assert (outside / "target").read_text() == "precious\n"
    assert stored_layers(store) == []
    assert list((store / "tmp").iterdir()) == []


def test_sparse_member_is_refused(arena):
    tmp_path, outside = arena
    blob = _sparse_tar(tmp_path)
    with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as t:
        assert t.getmembers()[0].issparse()
    lay = Layout(tmp_path / "layout")
    lay.write_raw_layer_image(blob, TAR, imagekit.sha(blob))
    r = cli("image", "unpack", f"{lay.root}:t", "--store", tmp_path / "store")
    one_line_error(r, "sparse file")


def test_hostile_docker_archive_names_are_never_followed(arena):
    """Member names of the archive itself: looked up in the archive's index, never opened on
    the file system."""
    tmp_path, outside = arena
    import io
    import json
    layer = make_tar([F("ok", "1")])
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [imagekit.sha(layer)]}}).encode()
    for name, layer_path, needle in [
            ("escape.tar", f"../../{outside.name}/target", "is missing"),
            ("abs.tar", str(outside / "target"), "is missing"),
            ("link.tar", "evil-link", "")]:
        dest = tmp_path / name
        with tarfile.open(dest, "w") as t:
            for n, data in [("manifest.json", json.dumps([{
                    "Config": "c.json", "RepoTags": ["x:1"], "Layers": [layer_path]}]).encode()),
                    ("c.json", config)]:
                ti = tarfile.TarInfo(n)
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            ti = tarfile.TarInfo("evil-link")
            ti.type = tarfile.SYMTYPE
            ti.linkname = str(outside / "target")
            t.addfile(ti)
        before = _listing(tmp_path, "store")
        r = cli("image", "unpack", dest, "--store", tmp_path / "store")
        assert r.returncode == 1, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert _listing(tmp_path, "store") == before


def test_deep_tree_replaced_by_a_file(tmp_path):
    """Not hostile, but what a hostile tar could use: a tree deeper than Python's recursion
    limit, then replaced by a file (removed through fds, without recursion)."""
    depth = 1500
    entries = [D("/".join(["d"] * i)) for i in range(1, depth + 1)]
    entries += [F("/".join(["d"] * depth) + "/leaf", "x"), F("d", "flat now")]
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar(entries)], tag="t", compression="gzip")
    r = cli("image", "unpack", f"{lay.root}:t", "--store", tmp_path / "store")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "store/layers/sha256" / built.diff_ids[0].split(":")[1] / "root"
    assert (root / "d").read_text() == "flat now"
