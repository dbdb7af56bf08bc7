"""Mounting as a user who is not root (issue 10): the FUSE device, fusermount3, the
choices the daemon makes at mount time (xattr form, passthrough) and id mapping as root
of a user namespace. The write paths are in test_nonroot.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerkit

pytestmark = pytest.mark.nonroot

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _stack(user, name, spec=None):
    d = user.workdir(name)
    layerkit.make_layer(d / "lower", spec or {"f": "f\n", "d/a": "a\n"})
    for sub in ("upper", "work", "mnt"):
        (d / sub).mkdir()
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(d)], check=True)
    return d


def _cmd(d, opts="", flags=""):
    o = f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work{opts}"
    return f"cd {REPO} && {PY} -m overlayfs_py {flags} -o {o} {d}/mnt"


def _one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("overlayfs-py: "), r.stderr
    return lines[0]


def test_no_access_to_dev_fuse_says_how_to_fix_it(nonroot_user):
    d = _stack(nonroot_user, "devfuse")
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o600)           # the fixture holds the lock; put back below
    try:
        r = nonroot_user.run(["sh", "-c", _cmd(d)], check=False)
    finally:
        os.chmod("/dev/fuse", mode)
    line = _one_line_error(r)
    assert "/dev/fuse" in line and "0600" in line and "chmod 0666" in line and "fuse" in line
    assert not layerkit.is_mounted(d / "mnt")
    assert os.listdir(d / "upper") == []


def test_plain_user_mounts_through_fusermount3(nonroot_user):
    """libfuse mounts through the setuid fusermount3 for a user: the mount is the user's
    (user_id= in its options), and the user unmounts it with fusermount3 -u."""
    d = _stack(nonroot_user, "fm")
    script = (f"{_cmd(d)} && grep ' {d}/mnt ' /proc/self/mountinfo && cat {d}/mnt/f; "
              f"fusermount3 -u {d}/mnt")
    r = nonroot_user.run(["sh", "-c", script])
    line = r.stdout.splitlines()[0]
    assert "fuse.overlayfs-py" in line and f"user_id={nonroot_user.uid}" in line, line
    assert r.stdout.splitlines()[1] == "f"


@pytest.mark.parametrize("userns", [False, True])
def test_xattr_form_logged_once_and_explicit_conflicts_refused(nonroot_user, userns):
    d = _stack(nonroot_user, "form")
    umount = f"umount {d}/mnt" if userns else f"fusermount3 -u {d}/mnt"
    script = (f"{_cmd(d, flags='-f -d')} 2>{d}/log & "
              f"for i in $(seq 100); do mountpoint -q {d}/mnt && break; sleep 0.1; done; "
              f"rm -r {d}/mnt/d && mkdir {d}/mnt/d; {umount}; wait")
    nonroot_user.run(["sh", "-c", script], userns=userns)
    log = (d / "log").read_text()
    assert log.count("using user.overlay.*") == 1, log[-2000:]
    assert "Traceback" not in log
    assert os.getxattr(d / "upper/d", "user.overlay.opaque") == b"y"
    for opt in (",redirect_dir=on", ",metacopy=on"):
        r = nonroot_user.run(["sh", "-c", _cmd(d, opt)], userns=userns, check=False)
        assert "conflicting options" in _one_line_error(r)
    # an explicit userxattr, and the defaults that go with it, still mount
    r = nonroot_user.run(["sh", "-c", f"{_cmd(d, ',userxattr,redirect_dir=off')} && {umount}"],
                         userns=userns, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("userns", [False, True])
def test_passthrough_auto_falls_back_and_on_fails(nonroot_user, userns):
    """FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace."""
    d = _stack(nonroot_user, "pt")
    umount = f"umount {d}/mnt" if userns else f"fusermount3 -u {d}/mnt"
    r = nonroot_user.run(["sh", "-c", _cmd(d, ",passthrough=on")], userns=userns, check=False)
    line = _one_line_error(r)
    assert "passthrough=on" in line and "CAP_SYS_ADMIN" in line, line
    script = (f"{_cmd(d, ',passthrough=auto', '-f -d')} 2>{d}/log & "
              f"for i in $(seq 100); do mountpoint -q {d}/mnt && break; sleep 0.1; done; "
              f"cat {d}/mnt/f; echo more >> {d}/mnt/f; {umount}; wait")
    r = nonroot_user.run(["sh", "-c", script], userns=userns)
    assert r.stdout == "f\n"
    assert (d / "upper/f").read_text() == "f\nmore\n"
    log = (d / "log").read_text()
    assert log.count("FUSE passthrough off") == 1, log[-2000:]


def test_owners_and_idmapping_in_a_user_namespace(nonroot_user):
    """As root of a user namespace (unshare -Ur: the user is 0 there), the user's files
    show as 0 and files of unmapped owners as the overflow id, as on the kernel overlay;
    uidmapping=/gidmapping= map layer ids to mount ids there too."""
    d = _stack(nonroot_user, "ids", {"f": "f\n"})
    (d / "lower/rootfile").write_text("r\n")        # root's: unmapped in the namespace
    os.chown(d / "lower/rootfile", 0, 0)
    show = f"stat -c '%n %u %g' {d}/mnt/f {d}/mnt/rootfile"
    kernel = nonroot_user.run_userns(["sh", "-c", (
        f"mount -t overlay overlay -o lowerdir={d}/lower,upperdir={d}/upper,"
        f"workdir={d}/work,userxattr {d}/mnt && {show}")]).stdout
    ours = nonroot_user.run_userns(["sh", "-c", f"{_cmd(d)} && {show}; umount {d}/mnt"]).stdout
    assert ours == kernel
    assert kernel.split("\n")[0].endswith(" 0 0")
    # with the subordinate ids mapped too (as podman does): layer id 0 (the user) shows
    # as 100 in the mount, and a file made there by 100 is the user's on disk
    mapped = nonroot_user.run(["sh", "-c", (
        f"{_cmd(d, ',uidmapping=0:100:1,gidmapping=0:100:1')} && {show} && "
        f"setpriv --reuid=100 --regid=100 --clear-groups touch {d}/mnt/new; "
        f"umount {d}/mnt")], subids=True)
    assert mapped.stdout.split("\n")[0].endswith(" 100 100"), mapped
    st = os.stat(d / "upper/new")
    assert (st.st_uid, st.st_gid) == (nonroot_user.uid, nonroot_user.gid)
