"""Rootless podman on overlayfs-py, against root podman on the kernel overlay.

A throwaway user (tests/nonroot.py) with subordinate uid/gid ranges runs podman with our
program as the overlay driver's ``mount_program`` (podman runs it as uid 0 of the user's
namespace, with ``-o lowerdir=...,upperdir=...,workdir=...``), configured as the README's
"Without root" section says (tests/podman/userpod.py): with ``mountopt = "userxattr"``,
and with no extra mount option at all, where the daemon chooses ``user.overlay.*`` xattrs
by itself (issue 10). Root podman with the kernel overlay driver (no mount program) does
the same work, and the results are compared path by path (type, mode with setuid/setgid
bits, owner, size, sha256, symlink target, device numbers, xattrs, hard link groups, file
mtimes that came from the image; tests/podman/tarindex.py): a ``podman build`` of a
Containerfile that deletes, replaces a directory, purges a package, adds hard links, a
fifo and setuid files; and a ``podman run`` that changes a container, then ``podman
commit``. Both must give 0 differences.

The base image is the root podman tests' debootstrap rootfs (tests/podman/podkit.py,
cached once per machine) without its device nodes: a rootless store cannot hold them
(no mknod outside the initial user namespace), so both stores import the same tree.

Not compared, because containers/storage itself does not carry them into a rootless image:
with a mount program it computes layers by comparing the mounted trees (its "naive diff"),
which records no directory whose only change is its mtime (moby#9874) and no hard link
between a new name and an unchanged lower file. So directory mtimes are left out, and the
Containerfile links only new files.

Skipped without root, /dev/fuse, podman/runc/uidmap (apt-get installs them when it can).
Runs under the podman lock ($OVL_PODMAN_LOCK, default /run/lock/overlayfs-py-podman.lock):
one podman build at a time on a small machine. OVL_TEST_PROG=fuse-overlayfs runs the
rootless side on fuse-overlayfs instead.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "podman"))

import nonroot  # noqa: E402
import podkit  # noqa: E402
import tarindex  # noqa: E402
import userpod  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BASE = "localhost/deb-minbase"
LOCK = os.environ.get("OVL_PODMAN_LOCK", "/run/lock/overlayfs-py-podman.lock")
SCRIPTS = Path(__file__).resolve().parent / "podman"
TOOLS = {**podkit.TOOLS, "newuidmap": "uidmap", "newgidmap": "uidmap"}
TIMES: Dict[str, float] = {}
KERNEL: Dict[str, tarindex.Index] = {}      # root + kernel results, made once per scenario

# How the user's storage.conf passes the xattr form: the README's setup (mountopt =
# "userxattr"), and no option at all, where the daemon sees by itself that it cannot
# write trusted.* xattrs (issue 10).
MOUNTOPTS = [
    pytest.param("userxattr", id="mountopt-userxattr"),
    pytest.param("", id="no-options"),
]


class Side:
    """One podman (root + kernel overlay, or the user + our program) and its files."""

    def __init__(self, name: str, pod, files: Path, mkdir):
        self.name, self.pod, self.files, self._mkdir = name, pod, files, mkdir

    def dir(self, name: str) -> Path:
        return self._mkdir(self.files / name)

    def timed(self, what: str, *args: str, **kw) -> str:
        t0 = time.monotonic()
        out = self.pod.out(*args, **kw)
        TIMES[f"{what} ({self.name})"] = time.monotonic() - t0
        return out

    def export(self, image: str, dest: Path) -> tarindex.Index:
        """The image's flattened tree, as ``podman export`` of a container of it writes it."""
        cid = self.pod.out("create", image, "true").strip()
        try:
            self.pod("export", "-o", str(dest), cid)
        finally:
            self.pod("rm", cid, check=False)
        index = tarindex.index(dest)
        dest.unlink()
        return index


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the rootless podman test makes a user: needs root")
    try:
        prog = podkit.mount_program()
        if prog.path is None:
            pytest.skip("rootless podman needs a mount program (OVL_TEST_PROG=kernel)")
        if not os.path.exists("/dev/fuse"):
            pytest.skip("no /dev/fuse")
        podkit.ensure_tools(TOOLS)
        rootfs = podkit.ensure_rootfs()
    except podkit.Unavailable as e:
        pytest.skip(str(e))
    why = nonroot.unavailable()
    if why:
        pytest.skip(why)
    problems: List[str] = []
    with contextlib.ExitStack() as stack:
        Path(LOCK).parent.mkdir(parents=True, exist_ok=True)
        lock = stack.enter_context(open(LOCK, "a"))
        fcntl.flock(lock, fcntl.LOCK_EX)
        # the user's lock (tests/nonroot.py) after the podman lock, in that order wherever
        # both are taken
        user = stack.enter_context(nonroot.nonroot_user())
        root_tmp = tmp_path_factory.mktemp("rootless")
        upod = userpod.UserPodman(user, prog.path, user.home / "xdg-run")
        # registered before anything can fail, so the store goes before the user does
        stack.callback(lambda: problems.extend(upod.cleanup()))
        kpod = podkit.Podman(root_tmp / "kernel", podkit.MountProgram(None, None, "overlay", ()))
        stack.callback(lambda: problems.extend(kpod.cleanup()))
        t0 = time.monotonic()
        since = time.time()
        base = upod.home / "base.tar"
        skipped = userpod.filter_tar(rootfs.tar, base)
        os.chown(base, upod.uid, upod.gid)
        print(f"\n[rootless] user {user.name}, mount program {prog.path}; base image without "
              f"its {skipped} device nodes ({time.monotonic() - t0:.1f} s)")
        kernel = Side("root, kernel overlay", kpod, root_tmp / "kernel-files",
                      lambda p: (p.mkdir(parents=True, exist_ok=True), p)[1])
        ours = Side(f"rootless, {os.path.basename(prog.path)}", upod, upod.home / "files",
                    upod.mkdir)
        for side in (kernel, ours):
            side.timed("import", "import", "-q", str(base), BASE)
        base.unlink()
        yield kernel, ours, prog, since
        print("\n[rootless] " + ", ".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))
    if problems:
        pytest.fail("cleanup found leaks:\n" + "\n".join(problems), pytrace=False)


def _fstype(path: Path) -> str:
    return path.read_text().strip()


def _compare(kernel: tarindex.Index, ours: tarindex.Index, since: float) -> List[str]:
    return tarindex.compare(kernel, ours, since=since, dir_mtimes=False,
                            names=("root+kernel", "rootless+ours"))


CONTAINERFILE = f"""\
FROM {BASE}
RUN awk '$2 == "/" {{print $3}}' /proc/mounts > /ctl/fstype \\
    && rm -rf /usr/share/doc && mkdir -p /usr/share/doc/x && echo x > /usr/share/doc/x/file
RUN apt-get purge -y -q tzdata > /dev/null \\
    && rm /var/log/dpkg.log /var/log/apt/history.log /var/log/apt/term.log \\
          /var/log/apt/eipp.log.xz /var/cache/apt/pkgcache.bin /var/cache/apt/srcpkgcache.bin
RUN rm /etc/issue /etc/motd && rm -r /usr/share/perl5/Debconf/Element \\
    && mv /etc/issue.net /root/issue.net && mv /usr/share/common-licenses /opt/licenses \\
    && echo data > /srv/a && ln /srv/a /srv/b && mkdir /srv/d && ln /srv/a /srv/d/c \\
    && mkfifo -m 640 /srv/fifo && cp /usr/bin/id /usr/local/bin/suid-id \\
    && chmod 4755 /usr/local/bin/suid-id && chmod u+s /usr/bin/tac && chmod g+s /srv/d \\
    && chown 1000:1000 /srv/a && chown -h 2000:3000 /etc/profile /srv/d \\
    && ln -s ../etc/os-release /srv/osr && touch -d '2001-02-03 04:05:06' /etc/shells \\
    && setfattr -n user.test -v hello /srv/a /etc/debian_version
COPY hello.txt /srv/hello.txt
RUN rm /srv/b && echo more >> /srv/hello.txt && chmod 2750 /srv/d
"""


def _build(side: Side) -> tarindex.Index:
    ctx, ctl = side.dir("ctx"), side.dir("ctl-build")
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "hello.txt").write_text("hello\n")
    for f in ctx.iterdir():
        f.chmod(0o644)
    with contextlib.suppress(FileNotFoundError):
        (ctl / "fstype").unlink()
    side.timed("build", "build", "-q", "--no-cache", "--network", "none", "-v", f"{ctl}:/ctl",
               "-v", "/usr/bin/setfattr:/usr/local/bin/setfattr:ro",
               "-t", "localhost/built", str(ctx), timeout=600)
    return side.export("localhost/built", side.files / "built.tar")


def _on_both(sides, mountopt, what, make):
    """``make(side)`` rootless on ours (with ``mountopt``) and, once per module, as root on
    the kernel overlay (KERNEL caches it); each side's ``ctl-WHAT/fstype`` must name its
    driver. Returns {side: index}."""
    kernel, ours, prog, _ = sides
    ours.pod.configure(mountopt)
    idx = {ours: make(ours)}
    assert _fstype(ours.files / f"ctl-{what}/fstype") == prog.fstype
    if what not in KERNEL:
        KERNEL[what] = make(kernel)
        assert _fstype(kernel.files / f"ctl-{what}/fstype") == "overlay"
    idx[kernel] = KERNEL[what]
    return idx


@pytest.mark.parametrize("mountopt", MOUNTOPTS)
def test_build_matches_the_kernel(sides, mountopt):
    """``podman build`` rootless on our program gives the image root podman builds on the
    kernel overlay, path by path; every RUN step's / is one of our mounts."""
    kernel, ours, _, since = sides
    idx = _on_both(sides, mountopt, "build", _build)

    # the build did what the Containerfile says (on both sides, so the comparison means
    # something)
    for side, e in idx.items():
        doc = sorted(n for n in e.entries if n.startswith("usr/share/doc/"))
        assert doc == ["usr/share/doc/x", "usr/share/doc/x/file"], (side.name, doc[:5])
        assert not [n for n in e.entries if n.startswith("usr/share/zoneinfo")]
        assert "etc/issue" not in e.entries and "root/issue.net" in e.entries
        assert e.entries["usr/local/bin/suid-id"].mode == 0o4755
        assert e.entries["usr/bin/tac"].mode == 0o4755
        assert e.entries["srv/d"].mode == 0o2750
        assert (e.entries["srv/d"].uid, e.entries["srv/d"].gid) == (2000, 3000)
        assert e.entries["srv/fifo"].type == "fifo"
        assert (e.entries["srv/a"].uid, e.entries["srv/a"].xattrs) == \
            (1000, (("user.test", "hello"),))
        assert ["srv/a", "srv/d/c"] in e.link_groups
    diffs = _compare(idx[kernel], idx[ours], since)
    print(f"[rootless] build ({mountopt or 'no options'}): {len(idx[kernel].entries)} paths, "
          f"{len(diffs)} differences")
    assert not diffs, "\n".join(diffs[:60])


RUN_SCRIPT = r"""
set -eu
awk '$2 == "/" {print $3}' /proc/mounts > /ctl/fstype
rm -rf /usr/share/doc
mkdir -p /usr/share/doc/x
echo x > /usr/share/doc/x/file
apt-get purge -y -q tzdata > /dev/null
rm /var/log/dpkg.log /var/log/apt/history.log /var/log/apt/term.log /var/log/apt/eipp.log.xz \
   /var/cache/apt/pkgcache.bin /var/cache/apt/srcpkgcache.bin
rm /etc/issue
echo extra >> /etc/motd
sed -i 's/^/# /' /etc/issue.net
chmod 600 /etc/shells
chown 1000:1000 /etc/profile
touch -d '2001-02-03 04:05:06' /etc/debian_version
mv /usr/share/perl5/Debconf/Element /opt/element
mkdir -p /srv/a/b/c
echo deep > /srv/a/b/c/file
rm -r /srv/a/b
echo data > /srv/f
ln /srv/f /srv/g
ln /srv/f /srv/a/h
mkfifo /srv/fifo
cp /usr/bin/id /usr/local/bin/suid-id
chmod 4755 /usr/local/bin/suid-id
chmod g+s /usr/bin/tac
chown 1000:2000 /srv/f
chmod 2770 /srv/a
ln -s /etc/os-release /srv/osr
setfattr -n user.run -v 1 /srv/f /etc/host.conf
echo RUN_OK
"""


def _run_commit(side: Side) -> tarindex.Index:
    scripts, ctl = side.dir("scripts"), side.dir("ctl-run")
    (scripts / "run.sh").write_text(RUN_SCRIPT)
    (scripts / "run.sh").chmod(0o644)
    with contextlib.suppress(FileNotFoundError):
        (ctl / "fstype").unlink()
    try:
        out = side.timed("run", "run", "--network", "none", "--name", "changes",
                         "-v", f"{scripts}:/t:ro", "-v", f"{ctl}:/ctl",
                         "-v", "/usr/bin/setfattr:/usr/local/bin/setfattr:ro",
                         BASE, "sh", "/t/run.sh", timeout=600)
        assert "RUN_OK" in out, (side.name, out)
        side.timed("commit", "commit", "-q", "changes", "localhost/committed")
    finally:
        side.pod("rm", "-f", "changes", check=False)
    return side.export("localhost/committed", side.files / "committed.tar")


@pytest.mark.parametrize("mountopt", MOUNTOPTS)
def test_run_and_commit_match_the_kernel(sides, mountopt):
    """Changes made by ``podman run`` in a container, then ``podman commit``: the committed
    image is the one root podman commits from the kernel overlay, path by path."""
    kernel, ours, _, since = sides
    idx = _on_both(sides, mountopt, "run", _run_commit)

    for side, e in idx.items():
        assert sorted(n for n in e.entries if n.startswith("usr/share/doc/")) == \
            ["usr/share/doc/x", "usr/share/doc/x/file"], side.name
        assert "etc/issue" not in e.entries and "opt/element" in e.entries
        assert "usr/share/perl5/Debconf/Element" not in e.entries
        assert e.entries["etc/shells"].mode == 0o600
        assert e.entries["etc/profile"].uid == 1000
        assert e.entries["usr/bin/tac"].mode == 0o2755
        assert e.entries["srv/a"].mode == 0o2770
        assert ["srv/a/h", "srv/f", "srv/g"] in e.link_groups
        assert e.entries["etc/host.conf"].xattrs == (("user.run", "1"),)
    diffs = _compare(idx[kernel], idx[ours], since)
    print(f"[rootless] run+commit ({mountopt or 'no options'}): {len(idx[kernel].entries)} "
          f"paths, {len(diffs)} differences")
    assert not diffs, "\n".join(diffs[:60])
