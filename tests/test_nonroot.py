"""The daemon run by a user who is not root (issue 10), against the kernel overlay mounted
by the same user in a user namespace with ``-o userxattr`` (the oracle).

Each run builds one stack under the throwaway user's home (tests/nonroot.py), runs
tests/nonroot_ops.py (every write path, and a 0600 lower file of another owner) on the
merged view from inside ``unshare -Urm`` -- the same credentials for every side -- and
compares the outcomes, the merged views and the upper directories. Our daemon runs as the
plain user (mounting through fusermount3) and as uid 0 of a user namespace (what rootless
podman does); neither is given ``userxattr``: the daemon must pick the user xattrs itself.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layerkit
import writekit as wk
from nonroot_ops import LOWER

pytestmark = pytest.mark.nonroot

TESTS = Path(__file__).resolve().parent
PY = sys.executable
OPS = f"{PY} {TESTS / 'nonroot_ops.py'}"


def _stack(user, name):
    """lower (the user's, plus ``secret``: root's, 0600), upper, work, mnt under the home."""
    d = user.workdir(name)
    layerkit.make_layer(d / "lower", LOWER)
    (d / "lower/secret").write_text("secret\n")
    (d / "lower/pub").write_text("pub\n")
    for sub in ("upper", "work", "mnt"):
        (d / sub).mkdir()
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(d)], check=True)
    os.chown(d / "lower/secret", 0, 0)
    os.chmod(d / "lower/secret", 0o600)
    os.chown(d / "lower/pub", 0, 0)
    (d / "lower/pubdir").mkdir()
    os.chmod(d / "lower/pubdir", 0o777)
    return d


def _ours_cmd(d, opts=""):
    o = f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work{opts}"
    return f"{PY} -m overlayfs_py -o {o} {d}/mnt"


def _json(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def run_kernel(user, d):
    script = (f"mount -t overlay overlay -o lowerdir={d}/lower,upperdir={d}/upper,"
              f"workdir={d}/work,userxattr {d}/mnt && {OPS} {d}/mnt")
    return _json(user.run_userns(["sh", "-c", script], check=False))


def run_ours_plain(user, d, opts=""):
    """Daemon as the plain user (fusermount3 mounts), the operations in a user namespace."""
    script = (f"cd {TESTS.parent} && {_ours_cmd(d, opts)} && "
              f"unshare -Urm {OPS} {d}/mnt; rc=$?; fusermount3 -u {d}/mnt; exit $rc")
    return _json(user.run(["sh", "-c", script], check=False))


def run_ours_userns(user, d, opts=""):
    """Daemon as uid 0 of a user namespace, as rootless podman runs it."""
    script = (f"cd {TESTS.parent} && {_ours_cmd(d, opts)} && {OPS} {d}/mnt; rc=$?; "
              f"umount {d}/mnt; exit $rc")
    return _json(user.run_userns(["sh", "-c", script], check=False))


# A daemon in a user namespace reports a file of an unmapped owner as the overflow uid, which
# FUSE maps to no uid at all: the VFS refuses to chmod or delete such an inode (EOVERFLOW),
# where the kernel overlay's inode keeps the real owner. Known; not the daemon's to fix.
# (link: the VFS checks that before protected_hardlinks, whose EPERM the kernel gives), and
# will not write into such a directory at all (EACCES: HAS_UNMAPPED_ID in inode_permission).
USERNS_KNOWN = {"chmod secret": "EOVERFLOW", "unlink secret": "EOVERFLOW",
                "link secret": "EOVERFLOW", "create in pubdir": "EACCES"}


def _no_links(snap):
    """Without index, the kernel overlay shows a copied-up file's hard links with different
    st_ino (the lower one for the first name): its documented non-standard behaviour. We
    show one inode; the link count is compared all the same."""
    return {rel: {k: v for k, v in e.items() if k != "links"} for rel, e in snap.items()}


def _compare(kernel, ours, dk, do, known=None):
    steps = sorted(k for k in kernel if k != "merged")
    expect = {s: (known or {}).get(s, kernel[s]) for s in steps}
    assert {s: ours[s] for s in steps} == expect
    if known:
        return               # the merged views and uppers differ by the known steps
    diffs = layerkit.diff_snapshots(_no_links(kernel["merged"]), _no_links(ours["merged"]),
                                    names=("kernel", "ours"))
    assert not diffs, diffs
    diffs, _ = wk.compare_uppers(dk / "upper", do / "upper", [dk / "lower"])
    assert not diffs, diffs
    assert os.listdir(do / "work/work") == [], "our staging area is not empty"


@pytest.mark.parametrize("where", ["plain", "userns"])
def test_write_paths_match_kernel_userxattr(nonroot_user, where):
    dk, do = _stack(nonroot_user, "k"), _stack(nonroot_user, "o")
    kernel = run_kernel(nonroot_user, dk)
    ours = (run_ours_plain if where == "plain" else run_ours_userns)(nonroot_user, do)
    # the cases the issue names, spelled out (the comparison below covers them too)
    assert kernel["rm -r d; mkdir d"] == "ok" and kernel["read secret"] == "EACCES"
    assert wk.is_opaque_dir(do / "upper/d") and wk.is_whiteout(do / "upper/f")
    assert os.getxattr(do / "upper/d", "user.overlay.opaque") == b"y"
    _compare(kernel, ours, dk, do, known=USERNS_KNOWN if where == "userns" else None)
    # nothing of the unreadable file reached the upper layer
    assert not (do / "upper/secret").exists() or wk.is_whiteout(do / "upper/secret")


def test_root_reads_back_what_the_user_wrote(nonroot_user, tmp_path):
    """A root mount with -o userxattr on the user's upper -- the kernel's and ours --
    shows what the user's mount showed."""
    d = _stack(nonroot_user, "rb")
    ours = run_ours_plain(nonroot_user, d)
    seen = {}
    for who in ("kernel", "ours"):
        upper = tmp_path / who / "upper"
        upper.parent.mkdir()
        subprocess.run(["cp", "-a", str(d / "upper"), str(upper)], check=True)
        (tmp_path / who / "work").mkdir()
        (tmp_path / who / "mnt").mkdir()
        opts = f"lowerdir={d}/lower,upperdir={upper},workdir={tmp_path / who / 'work'},userxattr"
        m = tmp_path / who / "mnt"
        if who == "kernel":
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(m)], check=True)
        else:
            subprocess.run([PY, "-m", "overlayfs_py", "-o", opts, str(m)], check=True,
                           cwd=TESTS.parent)
        try:
            seen[who] = layerkit.snapshot(m)
        finally:
            subprocess.run(["umount", str(m)], check=True)
    assert not layerkit.diff_snapshots(_no_links(seen["kernel"]), _no_links(seen["ours"]),
                                       names=("kernel", "ours"))
    assert os.listdir(tmp_path / "ours/mnt") == []
    assert "f" not in seen["ours"] and "d/a" not in seen["ours"]
    assert "d/new" in seen["ours"] and ours["rm -r d; mkdir d"] == ("ok")
