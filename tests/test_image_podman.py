"""The container-image story end to end with podman: build an image, save it, mount it with
overlayfs-py, change it, commit it, and run the result in podman.

podman runs here with its own storage and the kernel overlay driver (no mount program: it is
the reference, independent of our daemon). Its image is built from the cached debootstrap
base (tests/podman/podkit.py) with deletions, a directory removed and made again (opaque), a
hard link, a setuid file and a file capability. The checks:
- ``podman save`` as oci-archive and docker-archive, each mounted by ``image mount``, shows
  the tree ``podman image mount`` shows, path by path (type, mode, owner, size, content hash,
  link target, device numbers, xattrs, hard-link groups); the second archive unpacks nothing;
- changes made through our mount, committed, are seen by ``podman run`` of the new image
  (pulled from the layout, and loaded from an OCI archive of it), deletions included, and
  ``podman image mount`` of it equals our mount of it.

Skipped with the reason without root, /dev/fuse or podman (apt-get installs it when it can).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "podman"))

import layerkit  # noqa: E402
import podkit  # noqa: E402
from test_image_store import cli  # noqa: E402

import overlayfs_py  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.mount, pytest.mark.timeout(900)]

BASE = "localhost/deb-minbase"
IMAGE = "localhost/ovl-image-rt:1"
CAP_HEX = "0100000200200000000000000000000000000000"      # cap_net_bind_service=ep
SETXATTR = {"x86_64": 188, "aarch64": 5}                   # the syscall, for perl

CONTAINERFILE = """\
FROM {base}
RUN set -e; \\
    rm -rf /usr/share/doc/* /etc/motd /usr/share/man; \\
    rm -rf /var/cache/debconf && mkdir /var/cache/debconf && \\
        echo fresh > /var/cache/debconf/config.dat; \\
    mkdir -p /srv/app && echo data > /srv/app/file && ln /srv/app/file /srv/app/link; \\
    cp /bin/true /usr/local/bin/suid && chmod 4755 /usr/local/bin/suid; \\
    cp /bin/true /usr/local/bin/cap && \\
    perl -e '$v = pack("H*", "{cap}"); $p = "/usr/local/bin/cap"; \\
             $n = "security.capability"; \\
             syscall({nr}, $p, $n, $v, length($v), 0) == 0 or die "setxattr: $!"'
CMD ["/bin/sh"]
"""


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not layerkit.fuse_available():
        pytest.skip("needs /dev/fuse and fusermount3")
    nr = SETXATTR.get(platform.machine())
    if nr is None:
        pytest.skip(f"no setxattr syscall number known for {platform.machine()}")
    try:
        podkit.ensure_tools()
        rootfs = podkit.ensure_rootfs()
    except podkit.Unavailable as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("podman-images")
    p = podkit.Podman(root / "podman", podkit.MountProgram(None, None, "overlay", ()))
    problems = []
    try:
        p("import", "-q", str(rootfs.tar), BASE)
        ctx = root / "ctx"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(CONTAINERFILE.format(base=BASE, cap=CAP_HEX, nr=nr))
        p("build", "-q", "--network", "none", "-t", IMAGE, "-f", str(ctx / "Containerfile"),
          str(ctx), timeout=600)
        yield p, root
    finally:
        problems = p.cleanup()
    if problems:
        pytest.fail("podman cleanup found leaks:\n" + "\n".join(problems), pytrace=False)


def podman_view(p, image: str):
    """The image's tree as podman itself mounts it (kernel overlay). The root directory's
    mode is left out: when the top layer's tar has no "./" entry it is each engine's own
    default (containers/storage makes layer roots 0555, docker and we 0755)."""
    path = p.out("image", "mount", image).strip()
    try:
        return without_root_mode(layerkit.snapshot(path, nlink=False))
    finally:
        p("image", "unmount", image)


def without_root_mode(snap):
    snap["."].pop("mode", None)
    return snap


def our_view(source: str, mnt: Path, store: Path):
    mnt.mkdir(exist_ok=True)
    with overlayfs_py.image_mount(source, str(mnt), store=str(store)):
        return without_root_mode(layerkit.snapshot(mnt, nlink=False))


def test_podman_round_trip(pod):
    p, root = pod
    store = root / "store"
    oci = root / "rt-oci.tar"
    docker = root / "rt-docker.tar"
    p("save", "--format", "oci-archive", "-o", str(oci), IMAGE)
    p("save", "--format", "docker-archive", "-o", str(docker), IMAGE)
    reference = podman_view(p, IMAGE)
    assert reference["usr/local/bin/cap"]["xattrs"] == {"security.capability": CAP_HEX}, \
        reference["usr/local/bin/cap"]
    assert reference["srv/app/file"]["links"] == ("srv/app/link",)
    assert not any(k.startswith("usr/share/man") for k in reference)

    # the saved image, from either archive, is the tree podman shows
    first = json.loads(cli("image", "unpack", oci, "--store", store, "--json").stdout)
    assert all(l["unpacked_now"] for l in first["layers"])
    top = Path(first["layers"][-1]["path"])                  # podman wrote an opaque dir
    assert os.getxattr(top / "var/cache/debconf", "trusted.overlay.opaque") == b"y"
    second = json.loads(cli("image", "unpack", docker, "--store", store, "--json").stdout)
    assert [l["diff_id"] for l in second["layers"]] == [l["diff_id"] for l in first["layers"]]
    assert not any(l["unpacked_now"] for l in second["layers"]), "shared layers unpacked twice"
    for src in (str(oci), str(docker)):
        ours = our_view(src, root / "mnt", store)
        assert layerkit.diff_snapshots(reference, ours, ("podman", src)) == []
    assert stat_mode(reference, "usr/local/bin/suid") & 0o4000

    # a container: changes through our mount, committed, run by podman
    upper, work, mnt = root / "upper", root / "work", root / "mnt"
    upper.mkdir()
    work.mkdir()
    with overlayfs_py.image_mount(str(oci), str(mnt), str(upper), str(work), store=str(store)):
        (mnt / "etc/added").write_text("added by overlayfs-py\n")
        (mnt / "etc/issue").write_text("changed issue\n")
        os.unlink(mnt / "etc/issue.net")
        subprocess.run(["rm", "-rf", str(mnt / "usr/share/zoneinfo")], check=True)
        os.chmod(mnt / "usr/local/bin/suid", 0o755)
        os.link(mnt / "etc/added", mnt / "etc/added-link")
        container = without_root_mode(layerkit.snapshot(mnt, nlink=False))
    diff = cli("diff", upper, "--image", str(oci), "--store", store).stdout.splitlines()
    assert {"A /etc/added", "C /etc/issue", "D /etc/issue.net", "D /usr/share/zoneinfo",
            "C /usr/local/bin/suid"} <= set(diff), diff
    layout = root / "committed"
    r = cli("commit", upper, "--to", f"{layout}:rt2", "--from", str(oci), "--store", store,
            "--json")
    assert r.returncode == 0, r.stderr

    pulled = p.out("pull", "-q", f"oci:{layout}:rt2").split()[-1]
    config = json.loads(r.stdout)["config"]["digest"]
    assert config.endswith(pulled), (config, pulled)          # podman's image id
    out = p.sh(pulled, "cat /etc/added; cat /etc/issue; "
               "test ! -e /etc/issue.net && echo no-issue.net; "
               "test ! -e /usr/share/zoneinfo && echo no-zoneinfo; "
               "stat -c %a /usr/local/bin/suid; "
               "[ $(stat -c %i /etc/added) = $(stat -c %i /etc/added-link) ] && echo linked; "
               "cat /var/cache/debconf/config.dat; ls /var/cache/debconf")
    assert out.split("\n")[:8] == ["added by overlayfs-py", "changed issue", "no-issue.net",
                                   "no-zoneinfo", "755", "linked", "fresh", "config.dat"], out
    assert layerkit.diff_snapshots(podman_view(p, pulled), container,
                                   ("podman", "our container")) == []

    # podman load of an OCI archive of the layout
    archive = root / "committed.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(layout), "."], check=True)
    loaded = p.out("load", "-q", "-i", str(archive))
    assert "rt2" in loaded or "sha256:" in loaded, loaded
    ours = our_view(f"{archive}:rt2", root / "mnt3", store)
    assert layerkit.diff_snapshots(container, ours, ("container", "archive")) == []


def stat_mode(snap, path: str) -> int:
    return int(snap[path]["mode"], 8)
