"""Images into the store: references, sources (OCI layout, OCI archive, Docker archive), layer
unpacking in the kernel's format, verification, atomicity and sharing.

Images are written by tests/imagekit.py with plain tarfile/hashlib/json, independently of the
code under test; the commands run as a user would run them (``python -m overlayfs_py``), and
each test checks the tree that lands in the store with lstat/getxattr.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import imagekit  # noqa: E402
from imagekit import B, C, D, F, H, L, Layout, O, P, W, make_tar  # noqa: E402

from overlayfs_py.image import reference  # noqa: E402
from overlayfs_py.image.errors import ImageError, NotFound  # noqa: E402

ROOT = os.geteuid() == 0
CAP = bytes.fromhex("0100000200200000000000000000000000000000")   # cap_net_bind_service


def cli(*args, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("OVERLAYFS_PY_STORE", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "overlayfs_py", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=e, **kw)


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("overlayfs-py: "), lines
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def layer_root(store: Path, diff_id: str, oci: bool = False) -> Path:
    return store / ("layers-oci" if oci else "layers") / "sha256" / diff_id.split(":")[1] / "root"


def assert_store_clean(store: Path) -> None:
    """Nothing half-made: tmp/ is empty once no process is adding."""
    assert list((store / "tmp").iterdir()) == [], list((store / "tmp").iterdir())


def stored_layers(store: Path):
    d = store / "layers" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


BASE = [
    D("etc", mode=0o755, mtime=1_600_000_000),
    F("etc/motd", "hello\n", mode=0o644),
    F("etc/shadow", "root:*:1::::::\n", mode=0o640, gid=42),
    F("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
    D("var"), D("var/cache"), F("var/cache/old", "old"),
    D("tmp", mode=0o1777),
    F("bin/busybox", b"\x7fELF" + b"x" * 5000, mode=0o4755,
      xattrs={"security.capability": CAP}),
    H("bin/sh", "bin/busybox"),
    L("bin/ls", "busybox"),
    L("abs", "/etc/motd"),
    F("home/user/notes", "mine", mode=0o600, uid=1000, gid=1000,
      xattrs={"user.comment": b"kept", "trusted.note": b"t"}),
    C("dev/null", 1, 3, mode=0o666),
    B("dev/loop0", 7, 0, mode=0o660, gid=6),
    P("run/initctl", mode=0o600),
    F("usr/bin/sgid", "g", mode=0o2755, gid=50),
]

TOP = [
    W("etc/passwd"),
    O("var/cache"),
    F("var/cache/new", "new"),
    F("etc/motd", "bye\n"),
    W("home/user"),
]


def make_image(root: Path, compression="gzip", tag="v1"):
    lay = Layout(root)
    built = lay.write_image([make_tar(BASE), make_tar(TOP)], tag=tag, compression=compression)
    return lay, built


# ------------------------------------------------------------------------------ references

def test_reference_parsing(tmp_path):
    a = tmp_path / "lay:out"
    a.mkdir()
    (a / "oci-layout").write_text("{}")
    t = tmp_path / "img.tar"
    t.write_bytes(b"")
    ex = os.path.lexists
    assert reference.parse(str(a), exists=ex) == reference.SourceRef("oci", str(a))
    r = reference.parse(f"{a}:v1", exists=ex)
    assert (r.kind, r.path, r.tag) == ("oci", str(a), "v1")
    dg = "sha256:" + "ab" * 32
    r = reference.parse(f"{a}@{dg}", exists=ex)
    assert (r.path, r.tag, r.digest) == (str(a), None, dg)
    r = reference.parse(f"oci-archive:{t}:localhost/app:1", exists=ex)
    assert (r.kind, r.path, r.tag) == ("oci-archive", str(t), "localhost/app:1")
    r = reference.parse("docker.io/library/debian:bookworm", exists=ex)
    assert (r.kind, r.path) == ("store", "docker.io/library/debian:bookworm")
    with pytest.raises(ImageError, match="invalid digest"):
        reference.parse(f"{a}@sha256:1234", exists=ex)
    with pytest.raises(NotFound):
        reference.parse(f"oci:{tmp_path}/missing:tag", exists=ex)
    with pytest.raises(ImageError, match="not an OCI image layout"):
        reference.parse(str(tmp_path), exists=ex)


# ------------------------------------------------------------------------------ unpacking

@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_unpack_kernel_format(tmp_path, compression):
    lay, built = make_image(tmp_path / "layout", compression)
    store = tmp_path / "store"
    r = cli("image", "unpack", f"{lay.root}:v1", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [l["diff_id"] for l in out["layers"]] == built.diff_ids
    base = layer_root(store, built.diff_ids[0])
    top = layer_root(store, built.diff_ids[1])
    assert out["lowerdir"] == [str(top), str(base)]
    ns = "trusted" if ROOT else "user"

    st = os.lstat(base / "bin/busybox")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_nlink == 2
    assert os.lstat(base / "bin/sh").st_ino == st.st_ino
    assert (base / "bin/busybox").read_bytes() == b"\x7fELF" + b"x" * 5000
    assert os.readlink(base / "bin/ls") == "busybox"
    assert os.readlink(base / "abs") == "/etc/motd"
    assert stat.S_IMODE(os.lstat(base / "tmp").st_mode) == 0o1777
    assert os.lstat(base / "etc").st_mtime == 1_600_000_000
    assert os.lstat(base / "etc/motd").st_mtime == imagekit.MTIME
    assert stat.S_ISFIFO(os.lstat(base / "run/initctl").st_mode)
    assert os.getxattr(base / "home/user/notes", "user.comment") == b"kept"
    if ROOT:
        assert os.getxattr(base / "bin/busybox", "security.capability") == CAP
        assert os.getxattr(base / "home/user/notes", "trusted.note") == b"t"
        n = os.lstat(base / "home/user/notes")
        assert (n.st_uid, n.st_gid) == (1000, 1000)
        assert os.lstat(base / "etc/shadow").st_gid == 42
        assert stat.S_IMODE(os.lstat(base / "usr/bin/sgid").st_mode) == 0o2755
        d = os.lstat(base / "dev/null")
        assert stat.S_ISCHR(d.st_mode) and os.major(d.st_rdev) == 1 and os.minor(d.st_rdev) == 3
        d = os.lstat(base / "dev/loop0")
        assert stat.S_ISBLK(d.st_mode) and (os.major(d.st_rdev), os.minor(d.st_rdev)) == (7, 0)
        assert d.st_gid == 6 and stat.S_IMODE(d.st_mode) == 0o660

    # the top layer: kernel whiteouts and opaque xattr, no OCI markers left
    for gone in ("etc/passwd", "home/user"):
        st = os.lstat(top / gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, gone
    assert os.getxattr(top / "var/cache", f"{ns}.overlay.opaque") == b"y"
    names = [p.name for p in top.rglob("*")]
    assert not [n for n in names if n.startswith(".wh.")], names
    assert (top / "etc/motd").read_text() == "bye\n"
    assert_store_clean(store)
    info = json.loads((base.parent / "layer.json").read_text())
    assert info["diff_id"] == built.diff_ids[0]
    assert built.layers[0] in info["blobs"]
    assert info["size"] == sum(len(e.data) for e in BASE if e.info.isreg())


def test_unpack_keep_oci_markers(tmp_path):
    lay, built = make_image(tmp_path / "layout")
    store = tmp_path / "store"
    r = cli("image", "unpack", f"{lay.root}:v1", "--store", store, "--oci-markers", "-q")
    assert r.returncode == 0, r.stderr
    top = layer_root(store, built.diff_ids[1], oci=True)
    assert (top / "etc/.wh.passwd").is_file()
    assert (top / "var/cache/.wh..wh..opq").is_file()
    assert not (top / "etc/passwd").exists()
    assert "user.overlay.opaque" not in os.listxattr(top / "var/cache")
    assert not (store / "layers" / "sha256" / built.diff_ids[1].split(":")[1]).exists()
    assert r.stdout.startswith("lowerdir=") and str(top) in r.stdout


def test_last_entry_wins(tmp_path):
    entries = [
        F("a", "file first"), D("a"), F("a/inside", "x"),          # file, then a dir
        D("b"), F("b/x", "1"), F("b", "now a file"),                # dir, then a file
        F("c", "one"), F("c", "two"),                               # file twice
        F("d", "file"), L("d", "target"),                           # file, then symlink
        W("e"), F("e", "back"),                                     # whiteout, then file
        D("f", mode=0o700), F("f/keep", "k"), D("f", mode=0o751),   # dir over dir merges
    ]
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar(entries)], compression="none")
    store = tmp_path / "store"
    r = cli("image", "unpack", str(lay.root), "--store", store)
    assert r.returncode == 0, r.stderr
    root = layer_root(store, built.diff_ids[0])
    assert (root / "a").is_dir() and (root / "a/inside").read_text() == "x"
    assert (root / "b").read_text() == "now a file"
    assert (root / "c").read_text() == "two"
    assert os.readlink(root / "d") == "target"
    assert (root / "e").read_text() == "back"
    assert (root / "f/keep").read_text() == "k"
    assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o751


# ------------------------------------------------------------------------------ sources

def test_same_image_from_every_kind_of_source_is_unpacked_once(tmp_path):
    base, top = make_tar(BASE), make_tar(TOP)
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([base, top], tag="v1", compression="zstd")
    oci_tar = tmp_path / "image-oci.tar"
    imagekit.tar_directory(lay.root, oci_tar)
    docker_tar = tmp_path / "image-docker.tar"
    imagekit.write_docker_archive(docker_tar, [(["localhost/app:v1"], [base, top])])
    store = tmp_path / "store"
    seen = []
    for src in (f"{lay.root}:v1", f"{oci_tar}:v1", f"{docker_tar}:v1",
                f"docker-archive:{docker_tar}:localhost/app:v1", str(docker_tar)):
        r = cli("image", "unpack", src, "--store", store, "--json")
        assert r.returncode == 0, (src, r.stderr)
        out = json.loads(r.stdout)
        assert [l["diff_id"] for l in out["layers"]] == built.diff_ids
        seen.append([l["unpacked_now"] for l in out["layers"]])
    assert seen[0] == [True, True]
    assert all(s == [False, False] for s in seen[1:]), seen
    assert stored_layers(store) == sorted(d.split(":")[1] for d in built.diff_ids)


def test_shared_base_is_unpacked_once(tmp_path):
    base = make_tar(BASE)
    lay = Layout(tmp_path / "layout")
    lay.write_image([base, make_tar([F("app/one", "1")])], tag="one")
    two = lay.write_image([base, make_tar([F("app/two", "2")])], tag="two")
    store = tmp_path / "store"
    assert cli("image", "unpack", f"{lay.root}:one", "--store", store).returncode == 0
    base_dir = layer_root(store, two.diff_ids[0])
    before = os.lstat(base_dir).st_ino
    r = cli("image", "unpack", f"{lay.root}:two", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [l["unpacked_now"] for l in out["layers"]] == [False, True]
    assert os.lstat(base_dir).st_ino == before
    assert len(stored_layers(store)) == 3


def test_multi_platform_index(tmp_path):
    lay = Layout(tmp_path / "layout")
    amd = lay.write_image([make_tar([F("arch", "amd64")])], tag=None, add=False)
    arm = lay.write_image([make_tar([F("arch", "arm64")])], tag=None, add=False,
                          architecture="arm64")
    lay.write_index([(amd, {"os": "linux", "architecture": "amd64"}),
                     (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})], "multi")
    store = tmp_path / "store"
    r = cli("image", "unpack", f"{lay.root}:multi", "--store", store, "--json",
            "--platform", "linux/arm64")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["manifest"] == arm.manifest
    r = cli("image", "unpack", f"{lay.root}:multi", "--store", store, "--json",
            "--platform", "linux/amd64")
    assert json.loads(r.stdout)["manifest"] == amd.manifest
    if os.uname().machine == "x86_64":
        r = cli("image", "unpack", f"{lay.root}:multi", "--store", store, "--json")
        assert json.loads(r.stdout)["manifest"] == amd.manifest
    one_line_error(cli("image", "unpack", f"{lay.root}:multi", "--store", store,
                       "--platform", "linux/s390x"), "no image for platform linux/s390x")


def test_selection_errors(tmp_path):
    lay = Layout(tmp_path / "layout")
    one = lay.write_image([make_tar([F("x", "1")])], tag="one")
    lay.write_image([make_tar([F("x", "2")])], tag="two")
    store = tmp_path / "store"
    one_line_error(cli("image", "unpack", f"{lay.root}:three", "--store", store),
                   "no image tagged 'three'")
    one_line_error(cli("image", "unpack", str(lay.root), "--store", store),
                   "holds 2 images")
    r = cli("image", "unpack", f"{lay.root}@{one.manifest}", "--store", store, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["manifest"] == one.manifest
    one_line_error(cli("image", "unpack", f"{lay.root}@sha256:" + "0" * 64, "--store", store),
                   "no manifest sha256:000")
    one_line_error(cli("image", "unpack", str(tmp_path / "nowhere"), "--store", store),
                   "no image")


def test_missing_and_unknown_documents(tmp_path):
    store = tmp_path / "store"
    lay = Layout(tmp_path / "a")
    built = lay.write_image([make_tar([F("x", "1")])], tag="t")
    (lay.root / "blobs/sha256" / built.config.split(":")[1]).unlink()
    one_line_error(cli("image", "unpack", f"{lay.root}:t", "--store", store),
                   f"blob {built.config} is missing")
    lay = Layout(tmp_path / "b")
    built = lay.write_image([make_tar([F("x", "1")])], tag="t")
    (lay.root / "blobs/sha256" / built.layers[0].split(":")[1]).unlink()
    one_line_error(cli("image", "unpack", f"{lay.root}:t", "--store", store),
                   "its blob is missing")
    lay = Layout(tmp_path / "c")
    lay.write_image([make_tar([F("x", "1")])], tag="t",
                    media_types=["application/vnd.example.layer.v1+rar"])
    one_line_error(cli("image", "unpack", f"{lay.root}:t", "--store", store),
                   "unsupported layer media type")
    lay = Layout(tmp_path / "d")
    built = lay.write_image([make_tar([F("x", "1")])], tag="t")
    (lay.root / "blobs/sha256" / built.manifest.split(":")[1]).unlink()
    one_line_error(cli("image", "unpack", f"{lay.root}:t", "--store", store),
                   f"blob {built.manifest} is missing")
    assert stored_layers(store) == []


# ------------------------------------------------------------------------------ verification

def _tamper(lay: Layout, digest: str, data: bytes) -> None:
    (lay.root / "blobs/sha256" / digest.split(":")[1]).write_bytes(data)


@pytest.mark.parametrize("other, needle", [
    (make_tar([F("evil", "1")]), "blob: digest mismatch: expected"),        # same size
    (make_tar([F("good", "1"), F("more", os.urandom(20000))]), "more data than"),
    (make_tar([F("good", "1")])[:-1024], "bytes where its descriptor promises"),
])
def test_blob_digest_mismatch_stores_nothing(tmp_path, other, needle):
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar([F("good", "1")])], tag="t", compression="none")
    _tamper(lay, built.layers[0], other)
    store = tmp_path / "store"
    r = cli("image", "unpack", f"{lay.root}:t", "--store", store)
    one_line_error(r, needle)
    assert "layer 1/1" in r.stderr
    assert stored_layers(store) == []
    assert_store_clean(store)


def test_diff_id_mismatch_stores_nothing(tmp_path):
    lay = Layout(tmp_path / "layout")
    tar = make_tar([F("good", "1")])
    built = lay.write_image([tar], tag="t", diff_ids=["sha256:" + "1" * 64])
    store = tmp_path / "store"
    r = cli("image", "unpack", f"{lay.root}:t", "--store", store)
    one_line_error(r, "diff_id mismatch")
    assert imagekit.sha(tar) in r.stderr
    assert stored_layers(store) == []
    assert_store_clean(store)
    del built


def test_corrupt_manifest_and_config(tmp_path):
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar([F("good", "1")])], tag="t")
    _tamper(lay, built.config, built.config_bytes.replace(b"amd64", b"arm64"))
    one_line_error(cli("image", "unpack", f"{lay.root}:t", "--store", tmp_path / "s"),
                   "config: digest mismatch")


# ------------------------------------------------------------------------------ atomicity

def _fifo_image(tmp_path):
    """An image whose layer blob is a FIFO the test feeds: the unpack blocks half way."""
    entries = [F(f"data/{i:03d}", os.urandom(64 << 10)) for i in range(40)]
    tar = make_tar(entries)
    blob = imagekit.compress(tar, "none")
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([tar], tag="t", compression="none")
    path = lay.root / "blobs/sha256" / built.layers[0].split(":")[1]
    path.unlink()
    os.mkfifo(path)
    return lay, built, path, blob


def _feed_half(path: Path, blob: bytes, done: threading.Event):
    def run():
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, blob[:len(blob) // 2])
            done.wait(120)
        finally:
            os.close(fd)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for_partial_layer(store: Path, proc) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for d in (store / "tmp").glob("layer-*"):
            data = d / "root" / "data"
            if data.is_dir() and len(list(data.iterdir())) > 5:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the unpack did not start")


def _where(pid: int) -> str:
    """Where a process that does not exit waits: each thread's kernel wait channel and
    system call (for the failure message)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        parts = []
        for field in ("comm", "wchan", "syscall"):
            try:
                with open(f"/proc/{pid}/task/{tid}/{field}") as f:
                    parts.append(f.read().strip()[:60])
            except OSError as e:
                parts.append(f"({e.strerror})")
        out.append(f"thread {tid}: " + " | ".join(parts))
    return "; ".join(out)


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_interrupted_unpack_leaves_nothing_complete(tmp_path, how):
    lay, built, fifo, blob = _fifo_image(tmp_path)
    store = tmp_path / "store"
    done = threading.Event()
    feeder = _feed_half(fifo, blob, done)
    # SIGINT as at a terminal: a shell without job control starts background commands with
    # SIGINT ignored, Python then installs no KeyboardInterrupt handler, and a `make test &`
    # hung here in the read of the blob
    proc = subprocess.Popen([sys.executable, "-m", "overlayfs_py", "image", "unpack",
                             f"{lay.root}:t", "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_partial_layer(store, proc)
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        try:
            out, errs = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 60 s after the signal; {_where(proc.pid)}")
    finally:
        done.set()
        feeder.join(10)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()          # reaps it and closes the pipes (else: ResourceWarnings
                                    # that fail whichever test runs the garbage collector)
    assert stored_layers(store) == []
    if how == "interrupt":
        assert proc.returncode == 130, errs
        assert errs.strip() == "overlayfs-py: interrupted", errs
        assert_store_clean(store)
    else:
        assert proc.returncode == -signal.SIGKILL
        assert list((store / "tmp").iterdir()), "a killed unpack leaves its temporary"
    # the next run clears the leftovers and completes
    fifo.unlink()
    (fifo.parent / fifo.name).write_bytes(blob)
    r = cli("image", "unpack", f"{lay.root}:t", "--store", store)
    assert r.returncode == 0, r.stderr
    assert stored_layers(store) == [built.diff_ids[0].split(":")[1]]
    assert_store_clean(store)
    assert len(list((layer_root(store, built.diff_ids[0]) / "data").iterdir())) == 40


# ------------------------------------------------------------------------------ the store

def test_store_location_from_the_environment(tmp_path):
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar([F("x", "1")])], tag="t")
    store = tmp_path / "env-store"
    r = cli("image", "unpack", f"{lay.root}:t", env={"OVERLAYFS_PY_STORE": str(store)})
    assert r.returncode == 0, r.stderr
    assert layer_root(store, built.diff_ids[0]).is_dir()
    meta = json.loads((store / "store.json").read_text())
    assert meta == {"version": 1, "overlay_xattrs": "trusted" if ROOT else "user"}


def test_image_is_recorded_and_mountable_by_name(tmp_path):
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar([F("x", "1")])], tag="t")
    store = tmp_path / "store"
    assert cli("image", "unpack", f"{lay.root}:t", "--store", store).returncode == 0
    records = [json.loads(p.read_text()) for p in (store / "images").glob("*.json")]
    assert [r["name"] for r in records] == [f"oci:{lay.root}:t"]
    assert records[0]["manifest"]["digest"] == built.manifest
    import shutil
    shutil.rmtree(lay.root)
    r = cli("image", "unpack", f"oci:{lay.root}:t", "--store", store, "--json")
    assert r.returncode == 1           # the path is gone: "oci:" insists on a path
    r = cli("image", "unpack", f"store:oci:{lay.root}:t", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["manifest"] == built.manifest


NOBODY = 65534


def _runs_as_nobody() -> bool:
    r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                        "--clear-groups", sys.executable, "-c", "import overlayfs_py.image"],
                       capture_output=True)
    return r.returncode == 0


def test_unpack_without_root_warns_and_keeps_the_kernel_format(tmp_path_factory):
    if not ROOT:
        pytest.skip("needs root to switch to an unprivileged user")
    if not _runs_as_nobody():
        pytest.skip(f"{sys.executable} cannot run as uid {NOBODY}")
    import shutil
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="ovl-image-nonroot-"))
    try:
        os.chmod(top, 0o755)
        lay, built = make_image(top / "layout")
        for p in [top / "layout", *(top / "layout").rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        home = top / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        env = {k: v for k, v in os.environ.items()
                   if k not in ("OVERLAYFS_PY_STORE", "XDG_DATA_HOME")}
        env["HOME"] = str(home)
        r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                            "--clear-groups", sys.executable, "-m", "overlayfs_py",
                            "image", "unpack", f"{lay.root}:v1", "--json"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=top)
        assert r.returncode == 0, r.stderr
        store = home / ".local/share/overlayfs-py"
        assert json.loads(r.stdout)["store"] == str(store)
        assert json.loads((store / "store.json").read_text())["overlay_xattrs"] == "user"
        warnings = [l for l in r.stderr.splitlines() if l.startswith("overlayfs-py: warning:")]
        assert len(warnings) == len(r.stderr.splitlines()), r.stderr
        text = "\n".join(warnings)
        assert "2 device nodes not created" in text and "dev/null (char 1:3)" in text, text
        assert "16 owners not kept" not in text and "owners not kept" in text, text
        assert "abs (0:0), bin/busybox (0:0), bin/ls (0:0)" in text, text   # sorted
        assert "security.capability" in text and "trusted.note" in text, text
        base = layer_root(store, built.diff_ids[0])
        topl = layer_root(store, built.diff_ids[1])
        assert not os.path.lexists(base / "dev/null")       # not turned into anything else
        assert not os.path.lexists(base / "dev/loop0")
        assert os.lstat(base / "home/user/notes").st_uid == NOBODY
        assert os.getxattr(base / "home/user/notes", "user.comment") == b"kept"
        wo = os.lstat(topl / "etc/passwd")
        assert stat.S_ISCHR(wo.st_mode) and wo.st_rdev == 0
        assert os.getxattr(topl / "var/cache", "user.overlay.opaque") == b"y"
        assert "trusted.overlay.opaque" not in os.listxattr(topl / "var/cache")
        # root can use a store made by a user (it can write user.* xattrs)
        r = cli("image", "unpack", f"{lay.root}:v1", "--store", store)
        assert r.returncode == 0, r.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_threaded_unpack_equals_sequential(tmp_path):
    """The writer threads change nothing: same tree as one thread, with every ordering
    hazard in the tar (a name written twice, hard links to files still being written, a
    directory full of pending files replaced by a file, a whiteout of a pending file)."""
    import layerkit
    from overlayfs_py.image.store import Store
    entries = []
    for i in range(300):
        entries.append(F(f"d{i % 7}/f{i}", os.urandom(i * 37 % 5000)))
        if i % 50 == 0:
            entries.append(H(f"d{i % 7}/link{i}", f"d{i % 7}/f{i}"))
        if i % 60 == 0:
            entries.append(F(f"d{i % 7}/f{i}", f"second {i}", mode=0o600))
    entries += [F("gone/a", "a"), F("gone/b", "b"), F("gone", "now a file"),
                F("big", os.urandom(3 << 20)), F("x/y", "y"), W("x/y")]
    tar = make_tar(entries)
    diff_id = imagekit.sha(tar)
    trees = []
    for threads in (0, 4):
        with Store(str(tmp_path / f"store{threads}")) as s:
            info = s.unpack_layer(__import__("io").BytesIO(tar), diff_id=diff_id,
                                  media_type=imagekit.MEDIA["none"], threads=threads)
            tree = layerkit.snapshot(info.root, times=True)
            for e in tree.values():             # directories without an entry: made "now"
                if e["type"] == "dir":
                    e.pop("mtime")
            trees.append(tree)
    assert layerkit.diff_snapshots(trees[0], trees[1], ("1 thread", "4 threads")) == []
    assert trees[0]["d0/f0"]["mode"] == oct(0o100600) and trees[0]["gone"]["type"] == "file"
    assert trees[0]["d1/link50"]["links"] == ("d1/f50",)
    assert trees[0]["d0/link0"]["links"] == ()         # f0 was replaced after the link


@pytest.mark.parametrize("threads", ["0", "4"])
def test_a_failing_write_stores_no_layer(tmp_path, threads):
    """A file the unpacker cannot write (here: over the process's file size limit, EFBIG)
    fails the unpack with one line naming the entry, whether it was written by the main
    thread or by a worker of the pool, and leaves no layer and an empty tmp/; the pending
    writes of the other workers are dropped with it."""
    import resource
    entries = [F(f"d{i % 5}/small{i}", os.urandom(300)) for i in range(200)]
    entries.insert(100, F("d1/too-big", os.urandom(200_000)))   # a pool-sized file
    lay = Layout(tmp_path / "layout")
    lay.write_image([make_tar(entries)], tag="t", compression="gzip")
    store = tmp_path / "store"
    assert cli("image", "list", "--store", store).returncode == 0       # made, not limited

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = cli("image", "unpack", f"{lay.root}:t", "--store", store, preexec_fn=limit,
            env={"OVERLAYFS_PY_UNPACK_THREADS": threads})
    one_line_error(r, "d1/too-big")
    assert "too large" in r.stderr.lower(), r.stderr
    assert stored_layers(store) == []
    assert_store_clean(store)


def test_unpack_threads_from_the_environment(tmp_path, monkeypatch):
    """$OVERLAYFS_PY_UNPACK_THREADS sets the writer threads of a store's unpack (0: one
    thread for everything); not a number: a one-line error, nothing stored."""
    import importlib
    store_mod = importlib.import_module("overlayfs_py.image.store")
    unpack_mod = importlib.import_module("overlayfs_py.image.unpack")    # (not api.unpack)
    seen = []
    real = store_mod.unpack_tar

    def spy(*a, **kw):
        seen.append(kw["threads"])
        return real(*a, **kw)

    monkeypatch.setattr(store_mod, "unpack_tar", spy)
    tar = make_tar([F("a", "1")])
    for value, want in [("3", 3), ("0", 0), ("", unpack_mod.DEFAULT_THREADS)]:
        monkeypatch.setenv("OVERLAYFS_PY_UNPACK_THREADS", value)
        with store_mod.Store(str(tmp_path / f"s{value or 'default'}")) as s:
            s.unpack_layer(__import__("io").BytesIO(tar), diff_id=imagekit.sha(tar),
                           media_type=imagekit.MEDIA["none"])
        assert seen[-1] == want, value
    lay = Layout(tmp_path / "layout")
    lay.write_image([tar], tag="t")
    r = cli("image", "unpack", f"{lay.root}:t", "--store", tmp_path / "s-bad",
            env={"OVERLAYFS_PY_UNPACK_THREADS": "many"})
    one_line_error(r, "OVERLAYFS_PY_UNPACK_THREADS")
    assert stored_layers(tmp_path / "s-bad") == []


def _run_on_a_terminal(args):
    """Run the command with its stderr on a pseudo-terminal; what it drew there."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "overlayfs_py", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=slave,
                                stdin=subprocess.DEVNULL)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:                    # EIO: the terminal's other end is closed
                break
            if not b:
                break
            chunks.append(b)
        proc.wait(timeout=60)
        assert proc.returncode == 0, b"".join(chunks)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_progress_bars_on_a_terminal_only(tmp_path):
    lay, built = make_image(tmp_path / "layout")
    drawn = _run_on_a_terminal(["image", "unpack", f"{lay.root}:v1", "--store",
                                tmp_path / "s1"])
    assert "layer 1/2" in drawn and "layer 2/2" in drawn and "100%" in drawn, drawn
    quiet = _run_on_a_terminal(["image", "unpack", f"{lay.root}:v1", "--store",
                                tmp_path / "s2", "-q"])
    assert quiet == "", quiet
    r = cli("image", "unpack", f"{lay.root}:v1", "--store", tmp_path / "s3")
    assert r.returncode == 0 and r.stderr == ""          # not a terminal: quiet
    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    (up / "d/f").write_bytes(os.urandom(300_000))
    drawn = _run_on_a_terminal(["commit", up, "--to", tmp_path / "out", "--json"])
    assert "commit" in drawn and "B" in drawn, drawn


def test_concurrent_unpacks_of_one_image_make_one_layer(tmp_path):
    """Two processes unpacking the same image at once: both succeed, the layer is made once
    (the other waits on its lock and finds it), nothing is left in tmp/."""
    entries = [F(f"d/{i:03d}", os.urandom(16 << 10)) for i in range(100)]
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar(entries), make_tar([F("top", "t")])], tag="t")
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "overlayfs_py", "image", "unpack",
                               f"{lay.root}:t", "--store", str(store), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    fresh = [[l["unpacked_now"] for l in json.loads(o)["layers"]] for o, _ in outs]
    assert sum(f[0] for f in fresh) == 1 and sum(f[1] for f in fresh) == 1, fresh
    assert stored_layers(store) == sorted(d.split(":")[1] for d in built.diff_ids)
    assert_store_clean(store)
