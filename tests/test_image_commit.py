"""History, diff and commit: an image is mounted with an upper layer, changed through the mount
(as a container would), and the upper is shown (``diff``) and committed (``commit``) as a new
layer; the new image is read back by us, by umoci and by skopeo.

The uppers come from real mounts (overlayfs-py, and the kernel overlay for comparison), not
from hand-made trees, except where a format only another writer produces is tested (OCI
``.wh.`` files, xattr whiteouts).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import imagekit  # noqa: E402
import layerkit  # noqa: E402
from conftest import require_fuse, require_kernel_overlay  # noqa: E402
from imagekit import D, F, H, L, Layout, O, W, make_tar  # noqa: E402
from test_image_store import CAP, cli, one_line_error  # noqa: E402

import overlayfs_py  # noqa: E402

ROOT = os.geteuid() == 0

BASE = [
    D("etc"), F("etc/motd", "hello\n"), F("etc/hosts", "127.0.0.1 localhost\n"),
    F("etc/keep", "same\n"),
    D("usr"), D("usr/share"), D("usr/share/doc"), F("usr/share/doc/a", "a"),
    F("usr/share/doc/b", "b"), D("usr/share/doc/sub"), F("usr/share/doc/sub/c", "c"),
    D("var"), D("var/cache"), F("var/cache/one", "1"), F("var/cache/two", "2"),
    F("bin/tool", b"\x7fELF" + b"t" * 3000, mode=0o755, xattrs={"security.capability": CAP}),
    F("bin/suid", "s", mode=0o4755),
    D("opt"), F("opt/x", "x"),
]
HISTORY = [
    {"created": "2023-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in /"},
    {"created": "2023-01-01T00:00:01Z", "created_by": "/bin/sh -c #(nop)  ENV A=b",
     "empty_layer": True},
    {"created": "2023-01-01T00:00:02Z", "created_by": "/bin/sh -c apt-get install -y x",
     "comment": "second"},
    {"created": "2023-01-01T00:00:03Z", "created_by": "/bin/sh -c #(nop)  CMD [\"sh\"]",
     "empty_layer": True},
]


@pytest.fixture
def base_image(tmp_path):
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar(BASE), make_tar([F("etc/motd", "layer two\n"),
                                                       F("opt/y", "y" * 1000)])],
                            tag="base", compression="gzip", history=HISTORY)
    return lay, built, tmp_path / "store"


def _work(tmp_path: Path, name: str):
    d = tmp_path / name
    (d / "upper").mkdir(parents=True)
    (d / "work").mkdir()
    (d / "mnt").mkdir()
    return d / "upper", d / "work", d / "mnt"


def _change(mnt: Path) -> None:
    """What a container might do."""
    (mnt / "etc/motd").write_text("changed\n")              # content change: C
    with open(mnt / "etc/keep", "r+b"):                       # copy-up, nothing changed
        pass
    (mnt / "etc/new").write_text("new\n")                    # A
    os.unlink(mnt / "etc/hosts")                              # D
    shutil.rmtree(mnt / "usr/share/doc")                      # D of a directory
    shutil.rmtree(mnt / "var/cache")                          # opaque: removed, made again
    (mnt / "var/cache").mkdir()
    (mnt / "var/cache/two").write_text("2 again")
    os.chmod(mnt / "bin/suid", 0o755)                         # metadata change
    os.link(mnt / "etc/new", mnt / "etc/new-link")            # a hard link
    os.symlink("new", mnt / "etc/new-sym")
    (mnt / "home").mkdir()                                    # A directory and its contents
    (mnt / "home/a").write_text("a")


EXPECTED_WITH_LOWERS = """\
C /bin
C /bin/suid
C /etc
C /etc/keep
C /etc/motd
A /etc/new
A /etc/new-link
A /etc/new-sym
D /etc/hosts
A /home
A /home/a
C /usr
C /usr/share
D /usr/share/doc
C /var
C /var/cache
D /var/cache/one
C /var/cache/two
"""


def _sorted(text: str) -> str:
    lines = text.strip().splitlines()
    return "\n".join(sorted(lines, key=lambda l: l[2:])) + "\n"


@pytest.fixture
def changed_upper(base_image, tmp_path):
    """The base image mounted by overlayfs-py with an upper, changed through the mount."""
    require_fuse()
    lay, built, store = base_image
    upper, work, mnt = _work(tmp_path, "c1")
    with overlayfs_py.image_mount(f"{lay.root}:base", str(mnt), str(upper), str(work),
                                  store=str(store)):
        _change(mnt)
        merged = layerkit.snapshot(mnt, nlink=False)
    return lay, built, store, upper, merged


# ------------------------------------------------------------------------------ history

def test_history_top_first_with_sizes(base_image):
    lay, built, store = base_image
    r = cli("image", "history", f"{lay.root}:base", "--json")        # no store: reads tars
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["history"]
    assert [h["created_by"] for h in rows] == [h["created_by"] for h in reversed(HISTORY)]
    assert [h["empty_layer"] for h in rows] == [True, False, True, False]
    assert [h["digest"] for h in rows] == [None, built.layers[1], None, built.layers[0]]
    base_size = sum(len(e.data) for e in BASE if e.info.isreg())
    assert [h["size"] for h in rows] == [0, len("layer two\n") + 1000, 0, base_size]
    assert rows[1]["comment"] == "second"
    assert not (store / "store.json").exists()          # history does not make a store
    assert cli("image", "unpack", f"{lay.root}:base", "--store", store).returncode == 0
    r2 = cli("image", "history", f"{lay.root}:base", "--json", "--store", store)
    assert json.loads(r2.stdout)["history"] == rows     # the same from the store
    text = cli("image", "history", f"{lay.root}:base").stdout.splitlines()
    assert text[0].split() == ["LAYER", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert text[1].startswith("<none>") and "CMD" in text[1] and " 0B " in text[1]
    assert text[2].startswith(built.layers[1].split(":")[1][:12]) and "1.01kB" in text[2]


# ------------------------------------------------------------------------------ diff

def test_diff_of_a_real_upper(changed_upper):
    lay, built, store, upper, _ = changed_upper
    r = cli("diff", upper, "--image", f"{lay.root}:base", "--store", store)
    assert r.returncode == 0, r.stderr
    assert _sorted(r.stdout) == _sorted(EXPECTED_WITH_LOWERS)
    r = cli("diff", upper, "--image", f"{lay.root}:base", "--store", store, "--content",
            "--json")
    changes = {c["path"]: c for c in json.loads(r.stdout)}
    assert "/etc/keep" not in changes                       # a copy-up that changed nothing
    assert changes["/etc/motd"]["kind"] == "C"
    assert changes["/bin/suid"]["kind"] == "C"              # mode changed
    assert changes["/var/cache"] == {"kind": "C", "path": "/var/cache", "type": "dir",
                                     "opaque": True}
    assert changes["/usr/share/doc"] == {"kind": "D", "path": "/usr/share/doc", "type": "dir"}
    # without the lowers: deletions are known, and directories above changes are C
    r = cli("diff", upper)
    lines = set(r.stdout.splitlines())
    assert {"D /etc/hosts", "D /usr/share/doc", "C /var/cache", "C /etc", "C /usr/share",
            "C /etc/motd", "A /etc/new", "A /home/a"} <= lines, r.stdout


def test_diff_same_for_kernel_and_overlayfs_py_uppers(changed_upper, tmp_path):
    require_kernel_overlay()
    lay, built, store, upper, _ = changed_upper
    lowers = json.loads(cli("image", "unpack", f"{lay.root}:base", "--store", store,
                            "--json").stdout)["lowerdir"]
    kupper, kwork, kmnt = _work(tmp_path, "k")
    with layerkit.kernel_overlay(lowers, kupper, kwork, mnt=kmnt):
        _change(kmnt)
    for flags in ([], ["--content"]):
        ours = cli("diff", upper, *[a for l in lowers for a in ("--lower", l)], *flags)
        kernel = cli("diff", kupper, *[a for l in lowers for a in ("--lower", l)], *flags)
        assert ours.returncode == kernel.returncode == 0, (ours.stderr, kernel.stderr)
        assert ours.stdout == kernel.stdout, (flags, ours.stdout, kernel.stdout)
    assert cli("diff", kupper).stdout == cli("diff", upper).stdout


def test_diff_reads_every_whiteout_format(tmp_path):
    if not ROOT:
        pytest.skip("needs root for trusted.* xattrs and 0/0 devices... (user.* works too)")
    upper = tmp_path / "upper"
    (upper / "a").mkdir(parents=True)
    os.mknod(upper / "a/kernel", stat.S_IFCHR, 0)              # kernel whiteout
    (upper / "a/.wh.oci").write_text("")                       # OCI / fuse-overlayfs
    (upper / "x").mkdir()
    os.setxattr(upper / "x", "trusted.overlay.opaque", b"x")   # xattr whiteouts (6.7)
    (upper / "x/xw").write_text("")
    os.setxattr(upper / "x/xw", "trusted.overlay.whiteout", b"")
    (upper / "x/plain").write_text("")                         # no xattr: a file
    (upper / "o").mkdir()
    (upper / "o/.wh..wh..opq").write_text("")                  # OCI opaque
    (upper / "u").mkdir()
    os.setxattr(upper / "u", "user.overlay.opaque", b"y")      # userxattr opaque
    r = cli("diff", upper, "--json")
    got = {(c["kind"], c["path"], c.get("opaque", False)) for c in json.loads(r.stdout)}
    assert got == {("C", "/a", False), ("D", "/a/kernel", False), ("D", "/a/oci", False),
                   ("C", "/x", False), ("D", "/x/xw", False), ("A", "/x/plain", False),
                   ("C", "/o", True), ("C", "/u", True)}, got
    one_line_error(cli("diff", upper, "--content"), "needs the lower layers")
    one_line_error(cli("diff", tmp_path / "missing"), "missing")


# ------------------------------------------------------------------------------ commit

def _layer_tar(layout: Path, index_tag: str) -> tuple:
    index = json.loads((layout / "index.json").read_text())
    desc = [m for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == index_tag]
    assert len(desc) == 1, index
    blob = lambda d: (layout / "blobs/sha256" / d.split(":")[1]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(desc[0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    data = blob(manifest["layers"][-1]["digest"])
    if manifest["layers"][-1]["mediaType"].endswith("+gzip"):
        data = gzip.decompress(data)
    elif manifest["layers"][-1]["mediaType"].endswith("+zstd"):
        data = imagekit._zstd.decompress(data)
    return manifest, config, data


def test_commit_writes_an_oci_layer(changed_upper, tmp_path):
    lay, built, store, upper, merged = changed_upper
    out = tmp_path / "out"
    r = cli("commit", upper, "--to", f"{out}:v2", "--from", f"{lay.root}:base", "--store",
            store, "--json", "-m", "a change", "--author", "me")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    manifest, config, tar = _layer_tar(out, "v2")
    assert res["manifest"]["digest"] == imagekit.sha(
        (out / "blobs/sha256" / res["manifest"]["digest"].split(":")[1]).read_bytes())
    assert [l["digest"] for l in manifest["layers"][:-1]] == built.layers
    assert manifest["layers"][-1]["digest"] == res["layer"]["digest"]
    assert config["rootfs"]["diff_ids"] == built.diff_ids + [imagekit.sha(tar)]
    assert res["diff_id"] == imagekit.sha(tar)
    assert config["history"][:-1] == HISTORY
    assert config["history"][-1]["comment"] == "a change"
    assert config["history"][-1]["author"] == config["author"] == "me"
    assert config["config"]["Cmd"] == ["/bin/sh"]           # the base's settings are kept
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    names = [m.name for m in members]
    assert names == sorted(set(names), key=names.index)      # no duplicates
    by = {m.name: m for m in members}
    assert by["etc/.wh.hosts"].isreg() and by["etc/.wh.hosts"].size == 0
    assert by["usr/share/.wh.doc"].isreg()
    inside = [n for n in names if n.startswith("var/cache/")]
    assert inside[0] == "var/cache/.wh..wh..opq", inside       # first thing inside
    assert names.index("var/cache") < names.index("var/cache/.wh..wh..opq")
    link = by["etc/new-link"] if by["etc/new-link"].islnk() else by["etc/new"]
    assert link.islnk() and link.linkname in ("etc/new", "etc/new-link")
    assert by["etc/new-sym"].issym() and by["etc/new-sym"].linkname == "new"
    assert stat.S_IMODE(by["bin/suid"].mode) == 0o755
    assert "etc/keep" in by                                    # copied up: committed
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert not [m.name for m in members if any(k.startswith("SCHILY.xattr.trusted.overlay")
                                               or k.startswith("SCHILY.xattr.user.overlay")
                                               for k in m.pax_headers)]
    # the new image, mounted read-only by us, shows what the container saw
    mnt = tmp_path / "check"
    mnt.mkdir()
    with overlayfs_py.image_mount(f"{out}:v2", str(mnt), store=str(store)):
        again = layerkit.snapshot(mnt, nlink=False)
    assert layerkit.diff_snapshots(merged, again, ("container", "committed")) == []
    r = cli("image", "history", f"{out}:v2", "--json", "--store", store)
    top = json.loads(r.stdout)["history"][0]
    assert top["created_by"] == "overlayfs-py commit" and top["digest"] == res["layer"]["digest"]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_commit_compressions_round_trip(changed_upper, tmp_path, compression):
    lay, built, store, upper, merged = changed_upper
    out = tmp_path / "out"
    r = cli("commit", upper, "--to", out, "--from", f"{lay.root}:base", "--store", store,
            "--compression", compression, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tag"] == "latest"
    assert res["layer"]["mediaType"] == imagekit.MEDIA[compression]
    mnt = tmp_path / "check"
    mnt.mkdir()
    with overlayfs_py.image_mount(f"{out}:latest", str(mnt), store=str(store)):
        again = layerkit.snapshot(mnt, nlink=False)
    assert layerkit.diff_snapshots(merged, again, ("container", "committed")) == []


def test_commit_is_deterministic(changed_upper, tmp_path):
    lay, built, store, upper, _ = changed_upper
    results = []
    for i, env in enumerate(({}, {}, {"SOURCE_DATE_EPOCH": "1600000000"},
                             {"SOURCE_DATE_EPOCH": "1600000000"})):
        r = cli("commit", upper, "--to", tmp_path / f"out{i}", "--from", f"{lay.root}:base",
                "--store", store, "--json", env=env)
        assert r.returncode == 0, r.stderr
        results.append(json.loads(r.stdout))
    assert results[0]["layer"] == results[1]["layer"]          # same upper, same layer
    assert results[2]["manifest"] == results[3]["manifest"]    # with the epoch: all of it
    assert results[2]["layer"] != results[0]["layer"]          # mtimes were clamped
    _, config, tar = _layer_tar(tmp_path / "out2", "latest")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        assert max(m.mtime for m in t.getmembers()) <= 1_600_000_000
    assert config["created"] == config["history"][-1]["created"] == "2020-09-13T12:26:40Z"
    one_line_error(cli("commit", upper, "--to", tmp_path / "bad", env={
        "SOURCE_DATE_EPOCH": "soon"}), "SOURCE_DATE_EPOCH")


def test_commit_metacopy_takes_the_data_from_the_image(base_image, tmp_path):
    require_fuse()
    lay, built, store = base_image
    upper, work, mnt = _work(tmp_path, "meta")
    with overlayfs_py.image_mount(f"{lay.root}:base", str(mnt), str(upper), str(work),
                                  store=str(store), options=("metacopy=on",)):
        os.chmod(mnt / "bin/tool", 0o700)
    assert "trusted.overlay.metacopy" in os.listxattr(upper / "bin/tool") or \
        "user.overlay.metacopy" in os.listxattr(upper / "bin/tool")
    out = tmp_path / "out"
    r = cli("commit", upper, "--to", out, "--from", f"{lay.root}:base", "--store", store)
    assert r.returncode == 0, r.stderr
    _, _, tar = _layer_tar(out, "latest")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        m = t.getmember("bin/tool")
        assert stat.S_IMODE(m.mode) == 0o700
        assert t.extractfile(m).read() == b"\x7fELF" + b"t" * 3000
        assert m.pax_headers.get("SCHILY.xattr.security.capability") is not None or not ROOT
    one_line_error(cli("commit", upper, "--to", tmp_path / "out2"), "metacopy")


def test_commit_without_a_base_and_errors(tmp_path):
    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    (up / "d/f").write_text("x")
    out = tmp_path / "out"
    r = cli("commit", up, "--to", f"{out}:solo", "--json")
    assert r.returncode == 0, r.stderr
    manifest, config, tar = _layer_tar(out, "solo")
    assert len(manifest["layers"]) == 1 and config["rootfs"]["diff_ids"] == [imagekit.sha(tar)]
    assert config["os"] == "linux"
    # a second tag in the same layout keeps the first
    assert cli("commit", up, "--to", f"{out}:two").returncode == 0
    tags = [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in json.loads((out / "index.json").read_text())["manifests"]]
    assert sorted(tags) == ["solo", "two"]
    one_line_error(cli("commit", up, "--to", out, "--from", f"{out}:nope"),
                   "no image tagged 'nope'")
    one_line_error(cli("commit", tmp_path / "nope", "--to", out), "nope")
    assert not [p for p in out.iterdir() if p.name.startswith(".overlayfs-py-tmp")]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, (1 << 20) - 1, 1 << 20, (3 << 20) + 7])
def test_commit_file_data_is_exactly_the_stat_size(tmp_path, size):
    """A file's data goes into the tar whole, padded to the block; a file that turns out
    longer or shorter than its stat said (changed while committed) is refused, not cut or
    padded (the writer reads one byte more than it expects, to see the end)."""
    import importlib
    commit_mod = importlib.import_module("overlayfs_py.image.commit")
    errors = importlib.import_module("overlayfs_py.image.errors")
    data = os.urandom(size + 1)
    path = tmp_path / "f"
    cases = [(size, size, True), (size, size + 1, False)]
    if size:                    # an empty file (by its stat) is written without a read
        cases.append((size + 1, size, False))
    for actual, said, ok in cases:
        path.write_bytes(data[:actual])
        out = io.BytesIO()
        tw = commit_mod.TarWriter(out)
        fd = os.open(path, os.O_RDONLY)
        try:
            if ok:
                tw.add(b"H" * 512, fd, said, "f")
                tw.close()
                body = out.getvalue()
                assert body[:512] == b"H" * 512
                assert body[512:512 + size] == data[:size]
                assert body[512 + size:] == bytes(-size % 512 + 1024)
                assert tw.bytes == size
            else:
                with pytest.raises(errors.ImageError,
                                   match="grew" if actual > said else "shrank"):
                    tw.add(b"H" * 512, fd, said, "f")
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ real tools

def _tool(cmd: str) -> str:
    return imagekit.need_tool(cmd)


@pytest.fixture
def committed(changed_upper, tmp_path):
    lay, built, store, upper, merged = changed_upper
    out = tmp_path / "committed"
    r = cli("commit", upper, "--to", f"{out}:v2", "--from", f"{lay.root}:base", "--store",
            store, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout), store, merged


def test_umoci_unpacks_what_we_committed_as_we_mount_it(committed, tmp_path):
    umoci = _tool("umoci")
    out, res, store, merged = committed
    bundle = tmp_path / "bundle"
    r = subprocess.run([umoci, "unpack", "--image", f"{out}:v2", str(bundle)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    theirs = layerkit.snapshot(bundle / "rootfs", nlink=False)
    assert layerkit.diff_snapshots(merged, theirs, ("overlayfs-py", "umoci")) == []


def test_skopeo_copies_and_inspects_what_we_committed(committed, tmp_path):
    skopeo = _tool("skopeo")
    out, res, store, merged = committed
    r = subprocess.run([skopeo, "inspect", f"oci:{out}:v2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    manifest = json.loads((out / "blobs/sha256" /
                           res["manifest"]["digest"].split(":")[1]).read_text())
    assert info["Layers"] == [l["digest"] for l in manifest["layers"]]
    assert info["Digest"] == res["manifest"]["digest"]
    archive = tmp_path / "docker.tar"
    r = subprocess.run([skopeo, "copy", f"oci:{out}:v2",
                        f"docker-archive:{archive}:localhost/committed:v2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    r = subprocess.run([skopeo, "copy", f"docker-archive:{archive}", f"oci:{back}:again"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([skopeo, "inspect", f"docker-archive:{archive}"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "blobs/sha256" /
                         res["config"]["digest"].split(":")[1]).read_text())
    assert json.loads(r.stdout)["Layers"] == config["rootfs"]["diff_ids"]
    for src in (f"{archive}:localhost/committed:v2", f"{back}:again"):
        mnt = tmp_path / "m"
        mnt.mkdir(exist_ok=True)
        with overlayfs_py.image_mount(src, str(mnt), store=str(store)):
            view = layerkit.snapshot(mnt, nlink=False)
        assert layerkit.diff_snapshots(merged, view, ("container", src)) == []
