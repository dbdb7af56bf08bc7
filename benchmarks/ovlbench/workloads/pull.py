"""Pull a 3-layer image from a local registry into a usable tree: ``overlayfs-py image pull``
against ``skopeo copy`` into an OCI layout plus ``umoci unpack`` (in the plain column)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import gzip
import hashlib
import http.client

from ..common import Metric, NotApplicable, log
from . import workload

REGISTRY = "/usr/bin/docker-registry"
LAYOUT_VERSION = "1"            # bump to rebuild the cached layout


def _rows(s):
    mib = 32 if s.mode == "full" else 8
    return [Metric(f"pull a 3-layer image (tree, pkg, {mib} MiB file) from a local registry",
                   "s")]


@workload("pull", order=160, rows=_rows)
def pull(b, t, rows):
    (name,) = rows
    if t.kind not in ("plain", "fuse") or (t.kind == "fuse" and t.name != "overlayfs-py"):
        raise NotApplicable("a registry pull is not an overlay workload: plain = skopeo copy "
                            "+ umoci unpack, overlayfs-py = image pull")
    reg = b.state.get("pull_registry")
    if reg is None:
        err = b.state.get("pull_error")
        if err:
            raise NotApplicable(err)
        try:
            reg = LocalRegistry(b)
            b.at_end(reg.stop)
            reg.start()
        except NotApplicable as e:
            b.state["pull_error"] = str(e)
            raise
        except Exception as e:
            b.state["pull_error"] = f"registry setup failed: {e}"
            raise NotApplicable(b.state["pull_error"])
        b.state["pull_registry"] = reg
    work = b.scratch()
    try:
        if t.kind == "plain":
            layout, bundle = os.path.join(work, "layout"), os.path.join(work, "bundle")
            a, _ = b.timed_cmd(["skopeo", "--policy", reg.policy, "copy", "-q",
                                "--src-tls-verify=false", f"docker://{reg.ref}",
                                f"oci:{layout}:1"])
            c, _ = b.timed_cmd(["umoci", "unpack", "--image", f"{layout}:1", bundle])
            dt = a + c
            n = _count(os.path.join(bundle, "rootfs"))
        else:
            store = os.path.join(work, "store")
            dt, _ = b.timed_cmd([sys.executable, "-m", "overlayfs_py", "image", "pull", "-q",
                                 "--store", store, reg.ref])
            n = sum(_count(os.path.join(store, "layers", "sha256", d, "root"))
                    for d in os.listdir(os.path.join(store, "layers", "sha256")))
        b.check("pull: files and dirs unpacked", t.name, n)
    finally:
        b.remove(work)
    return {name: dt}


def _count(root: str) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """docker-registry on 127.0.0.1 with one image: the fixture tree, the package tree and
    32 MiB of big.bin (8 MiB quick), one gzip layer each (cached as an OCI layout)."""

    def __init__(self, b):
        self.b = b
        for tool, pkg in ((REGISTRY, "docker-registry"), ("skopeo", "skopeo"),
                          ("umoci", "umoci")):
            if not shutil.which(tool):
                raise NotApplicable(f"needs {tool} (apt-get install {pkg})")
        self.root = os.path.join(b.fx.root, "pull")
        self.layout = os.path.join(self.root, "layout")
        self.run = os.path.join(b.run_root, "registry")
        self.policy = os.path.join(self.root, "policy.json")
        self.proc = None
        self.ref = ""

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        with open(self.policy, "w") as f:
            f.write('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        self._layout()
        shutil.rmtree(self.run, ignore_errors=True)
        os.makedirs(self.run)
        port = _free_port()
        conf = os.path.join(self.run, "config.yml")
        with open(conf, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {self.run}/storage\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n")
        self.proc = subprocess.Popen([REGISTRY, "serve", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v2/")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise NotApplicable("docker-registry did not start")
            time.sleep(0.05)
        self.ref = f"127.0.0.1:{port}/bench/image:1"
        subprocess.run(["skopeo", "--policy", self.policy, "copy", "-q",
                        "--dest-tls-verify=false", f"oci:{self.layout}:1",
                        f"docker://{self.ref}"], check=True, capture_output=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.run, ignore_errors=True)

    def _layout(self) -> None:
        stamp = os.path.join(self.layout, ".stamp")
        want = f"{LAYOUT_VERSION} {self.b.sizes.mode}"
        if os.path.exists(stamp) and open(stamp).read() == want:
            return
        log("building the pull benchmark's image layout ...")
        shutil.rmtree(self.layout, ignore_errors=True)
        blobs = os.path.join(self.layout, "blobs", "sha256")
        os.makedirs(blobs)
        image = self.b.fx.image
        chunk = (32 if self.b.sizes.mode == "full" else 8) << 20
        big = os.path.join(self.root, "file")
        os.makedirs(big, exist_ok=True)
        with open(os.path.join(image, "big.bin"), "rb") as src, \
                open(os.path.join(big, "blob.bin"), "wb") as dst:
            dst.write(src.read(chunk))
        layers, diff_ids = [], []
        for base, name in ((image, "tree"), (image, "pkg"), (big, "blob.bin")):
            tar_path = os.path.join(self.root, "layer.tar")
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as t:
                t.add(os.path.join(base, name), arcname=name)
            h = hashlib.sha256()
            gz_path = os.path.join(self.root, "layer.tar.gz")
            with open(tar_path, "rb") as f, open(gz_path, "wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as g:
                for blk in iter(lambda: f.read(1 << 20), b""):
                    h.update(blk)
                    g.write(blk)
            diff_ids.append("sha256:" + h.hexdigest())
            layers.append(self._put_file(gz_path, blobs))
            os.unlink(tar_path)
        shutil.rmtree(big)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids},
                             "config": {}}).encode()
        cd = self._put_bytes(config, blobs)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cd, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": d, "size": s} for d, s in layers]}).encode()
        md = self._put_bytes(manifest, blobs)
        with open(os.path.join(self.layout, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        with open(os.path.join(self.layout, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "1"}}]}, f)
        with open(stamp, "w") as f:
            f.write(want)

    @staticmethod
    def _put_bytes(data: bytes, blobs: str) -> str:
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return "sha256:" + d

    @staticmethod
    def _put_file(path: str, blobs: str):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for blk in iter(lambda: f.read(1 << 20), b""):
                h.update(blk)
        size = os.path.getsize(path)
        os.replace(path, os.path.join(blobs, h.hexdigest()))
        return "sha256:" + h.hexdigest(), size
