"""Container images: `overlayfs-py image unpack` of a large real layer into a fresh store, against
`tar -x` and `umoci unpack` of the same layer; `overlayfs-py commit` of a 10k-file upper,
against `tar -c` of it. The plain column is the reference tool, the overlayfs-py column our
command (whole commands, Python start-up included); kernel and fuse-overlayfs are n/a.

The layer (full mode) is the debootstrap bookworm minbase of the podman tests (built once and
cached by tests/podman/podkit.py, ~200 MB in ~7k entries); without it, and in quick mode,
a tar of the fixture image tree. It is an uncompressed OCI layer, so the rows compare
unpacking, not decompression. Our unpack verifies the layer's digest and ends with a syncfs
before the rename that makes it visible; tar -x and umoci do not sync.

No unpacked tree is removed before the end of the run, and the first cell waits until a
minute has passed since the trees of the earlier workloads were removed (``_settle``): on
ext4 without a journal (this VM's root file system) the inode allocator passes over every
inode deleted in the last 60 s (5 min while its inode table block is still dirty), and
reads its on-disk inode to tell, so creating a tree right after removing one costs several
times more system time, for tar as for us (tar -x of the debootstrap layer: 0.45-0.6 s
after a quiet minute, 3.5-10 s right after removing the previous run's tree)."""
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

from ..common import REPO, Metric, NotApplicable, count_entries, human_bytes, kfmt
from . import workload

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _layer_label(s) -> str:
    return "debootstrap base" if s.mode == "full" else f"{kfmt(s.tree_files)}-file tree"


def _commit_files(s) -> int:
    return {"quick": 1_000, "full": 10_000}[s.mode]


def _ours(t):
    if t.kind == "plain":
        return None
    if t.name != "overlayfs-py":
        raise NotApplicable("image commands are overlayfs-py's (plain = tar / umoci)")
    if t.cmd is None or "overlayfs_py" not in " ".join(t.cmd):
        raise NotApplicable("--ours-cmd is not overlayfs-py")
    return t.cmd


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _layer(b):
    """The layer tar and an OCI layout holding it as its one layer (once per run)."""
    if "image_layer" in b.state:
        return b.state["image_layer"]
    root = os.path.join(b.cache, "image-bench")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    b.at_end(lambda: shutil.rmtree(root, ignore_errors=True))
    tar = None
    if b.sizes.mode == "full":
        sys.path.insert(0, os.path.join(REPO, "tests", "podman"))
        try:
            import podkit
            tar = str(podkit.ensure_rootfs().tar)
            what = "the debootstrap bookworm minbase (tests/podman/podkit.py)"
        except Exception as e:          # no cache and no mirror: the fixture tree instead
            b.notes.append(f"image unpack: no debootstrap layer ({e}); used the image tree")
    if tar is None:
        tar = os.path.join(root, "layer.tar")
        subprocess.run(["tar", "--numeric-owner", "-cf", tar, "-C", b.fx.image, "tree"],
                       check=True)
        what = "a tar of the fixture image tree"
    diff_id = _sha256(tar)
    layout = os.path.join(root, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    blob = os.path.join(blobs, diff_id.split(":")[1])
    try:
        os.link(tar, blob)
    except OSError:
        shutil.copyfile(tar, blob)

    def put(doc) -> dict:
        data = json.dumps(doc).encode()
        import hashlib
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d.split(":")[1]), "wb") as f:
            f.write(data)
        return {"digest": d, "size": len(data)}

    size = os.path.getsize(tar)
    config = put({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    manifest = put({"schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               **config},
                    "layers": [{"mediaType": OCI_LAYER, "digest": diff_id, "size": size}]})
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
            "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}, f)
    with open(tar, "rb") as f:                       # warm: both sides read it from memory
        while f.read(1 << 20):
            pass
    b.notes.append(f"image unpack: the layer is {what}, {human_bytes(size)} uncompressed")
    b.state["image_layer"] = (tar, layout, diff_id)
    return b.state["image_layer"]


SETTLE_S = 61      # ext4's RECENTCY_MIN is 60 s once the inode tables are written (sync)


def _settle(b) -> None:
    """Once per run, before the first unpack: sync, then let a minute pass since anything
    was deleted by the earlier workloads (see the module docstring)."""
    if b.state.get("image_settled"):
        return
    os.sync()
    time.sleep(SETTLE_S)
    b.state["image_settled"] = True
    b.notes.append(f"image unpack: trees are kept until the end of the run, and the first "
                   f"cell waited {SETTLE_S} s after a sync (ext4 without a journal passes "
                   "over recently deleted inodes when allocating)")


def _keep(b, d: str) -> None:
    """Remove ``d`` at the end of the run, not now (see the module docstring)."""
    b.at_end(lambda: b.remove(d))


@workload("unpack", order=165, rows=lambda s: [
    Metric(f"image unpack, {_layer_label(s)} layer: vs tar -x", "s"),
    Metric(f"image unpack, {_layer_label(s)} layer: vs umoci unpack", "s")])
def unpack(b, t, rows):
    vs_tar, vs_umoci = rows
    ours = _ours(t)
    tar, layout, diff_id = _layer(b)
    _settle(b)
    out = {}
    if ours is None:
        d = b.scratch()
        _keep(b, d)
        dt, _ = b.timed_cmd(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                             "-xpf", tar, "-C", d])
        out[vs_tar] = dt
        b.check("image unpack: entries", t.name, count_entries(d))
        if shutil.which("umoci"):
            d = b.scratch()
            _keep(b, d)
            dt, _ = b.timed_cmd(["umoci", "unpack", "--image", f"{layout}:bench",
                                 os.path.join(d, "bundle")])
            out[vs_umoci] = dt
            b.check("image unpack: entries", t.name,
                    count_entries(os.path.join(d, "bundle", "rootfs")))
        else:
            b.notes.append("image unpack: umoci not installed (apt-get install umoci)")
        return out
    d = b.scratch()
    _keep(b, d)
    dt, _ = b.timed_cmd([*ours, "image", "unpack", f"{layout}:bench", "--store",
                         os.path.join(d, "store"), "-q"], env=t.env)
    root = os.path.join(d, "store", "layers", "sha256", diff_id.split(":")[1], "root")
    b.check("image unpack: entries", t.name, count_entries(root))
    return {vs_tar: dt, vs_umoci: dt}


def _upper(b) -> str:
    """A container's upper layer: N files of 0.5-8 KiB in 100 directories, 1% deleted
    lower names (0/0 whiteouts), once per run."""
    if "image_upper" in b.state:
        return b.state["image_upper"]
    n = _commit_files(b.sizes)
    root = os.path.join(b.cache, "image-bench-upper")
    shutil.rmtree(root, ignore_errors=True)
    b.at_end(lambda: shutil.rmtree(root, ignore_errors=True))
    rnd = random.Random(12)
    pool = rnd.randbytes(1 << 20)
    for i in range(n):
        d = os.path.join(root, f"d{i % 100:02d}")
        os.makedirs(d, exist_ok=True)
        size = rnd.randint(512, 8192)
        off = rnd.randrange(0, len(pool) - size)
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(pool[off:off + size])
        if i % 100 == 0:
            os.mknod(os.path.join(d, f"gone{i:05d}"), 0o020000, 0)
    b.state["image_upper"] = root
    return root


def _regular_files(tar_path: str) -> int:
    with tarfile.open(tar_path) as t:
        return sum(1 for m in t if m.isreg() and not os.path.basename(m.name).startswith(".wh."))


@workload("commit", order=170, rows=lambda s: [
    Metric(f"image commit, {kfmt(_commit_files(s))}-file upper: vs tar -c", "s")])
def commit(b, t, rows):
    (name,) = rows
    ours = _ours(t)
    upper = _upper(b)
    d = b.scratch()
    try:
        if ours is None:
            out = os.path.join(d, "upper.tar")
            dt, _ = b.timed_cmd(["tar", "--xattrs", "--numeric-owner", "-cf", out, "-C",
                                 upper, "."])
        else:
            layout = os.path.join(d, "layout")
            dt, so = b.timed_cmd([*ours, "commit", upper, "--to", f"{layout}:bench",
                                  "--compression", "none", "-q", "--json"], env=t.env)
            digest = json.loads(so)["layer"]["digest"]
            out = os.path.join(layout, "blobs", "sha256", digest.split(":")[1])
        b.check("image commit: files in the layer", t.name, _regular_files(out))
    finally:
        b.remove(d)
    return {name: dt}
