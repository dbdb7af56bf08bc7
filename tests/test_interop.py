"""Interoperability of the upper layer with the kernel overlay, and persistence.

- ours -> kernel: operations through our mount; unmount; the kernel overlay mounted on the
  same lowers + upper shows exactly the tree our mount showed.
- kernel -> ours: operations through the kernel overlay; unmount; our mount on the same
  lowers + upper shows exactly what the kernel showed.
- persistence: remounting ours shows the same tree again.

The lowers are in the kernel format where the kernel has to read them; a second variant
keeps OCI-format lowers for our mount and gives the kernel converted copies of them (the
upper is always the very same directory).
"""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import writekit as wk
from conftest import fuse_only, require_fuse, require_kernel_overlay
from layerkit import (DIR, FIFO, Dir, File, Hardlink, Symlink, OPAQUE_KERNEL, OPAQUE_OCI,
                      WHITEOUT_KERNEL, WHITEOUT_OCI)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

LOWERS_KERNEL = [
    {   # top
        "etc/motd": "top motd\n",
        "etc/gone": WHITEOUT_KERNEL,
        "var": OPAQUE_KERNEL,
        "var/new": "top var\n",
        "bin/sh": File(b"\x7fELF sh", mode=0o755),
        "x/attr": File("xa\n", mode=0o640, uid=1000, gid=1000, xattrs={"user.a": b"1"}),
    },
    {   # bottom
        "etc/motd": "bottom motd\n",
        "etc/gone": "should stay hidden\n",
        "etc/passwd": "root:x:0:0\n",
        "etc/conf.d/a": "a\n",
        "etc/conf.d/b": "b\n",
        "var/old": "hidden by opaque\n",
        "usr/lib/lib.so": b"\0lib" * 1000,
        "usr/lib/link.so": Symlink("lib.so"),
        "usr/share/doc/README": "readme\n",
        "usr/share/hard1": "hard\n",
        "usr/share/hard2": Hardlink("usr/share/hard1"),
        "dev/fifo": FIFO,
        "emptydir/": DIR,
        "modes": Dir(mode=0o1777, uid=5, gid=6),
    },
]

LOWERS_OCI = [
    {
        "etc/motd": "top motd\n",
        "etc/gone": WHITEOUT_OCI,
        "var": OPAQUE_OCI,
        "var/new": "top var\n",
        "bin/sh": File(b"\x7fELF sh", mode=0o755),
        "x/attr": File("xa\n", xattrs={"user.a": b"1"}),
    },
    LOWERS_KERNEL[1],
]


def workload_a(root):
    """A fixed mix of every kind of change."""
    r = Path(root)
    with open(r / "etc/motd", "ab") as f:                       # copy-up + append
        f.write(b"appended\n")
    os.truncate(r / "etc/passwd", 4)                              # truncate copy-up
    os.unlink(r / "etc/conf.d/a")                                 # whiteout
    os.unlink(r / "etc/conf.d/b")
    os.rmdir(r / "etc/conf.d")                                    # whiteout of a dir
    os.mkdir(r / "etc/conf.d")                                    # opaque dir over whiteout
    (r / "etc/conf.d/c").write_bytes(b"c\n")
    os.rename(r / "usr/share/doc/README", r / "usr/share/README")  # whiteout at old name
    os.symlink("../lib/lib.so", r / "usr/share/sl")
    os.link(r / "usr/lib/lib.so", r / "usr/lib/lib2.so")           # link to a lower file
    os.mknod(r / "dev/null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(r / "dev/fifo2", 0o600)
    os.chmod(r / "bin/sh", 0o700)
    os.chown(r / "x/attr", 1234, 4321)
    os.setxattr(r / "x/attr", "user.b", b"2")
    os.removexattr(r / "x/attr", "user.a")
    os.utime(r / "usr/lib/link.so", ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)
    os.makedirs(r / "new/deep/tree")
    (r / "new/deep/tree/file").write_bytes(b"deep\n")
    os.rename(r / "new/deep", r / "new/moved")                    # pure upper dir rename
    (r / "var/newer").write_bytes(b"v\n")
    os.unlink(r / "var/new")
    os.rmdir(r / "emptydir")
    (r / "f.new").write_bytes(b"dpkg\n")                          # dpkg pattern
    os.rename(r / "f.new", r / "etc/passwd")
    os.unlink(r / "etc/passwd")
    with open(r / "usr/share/hard2", "ab") as f:                  # breaks the lower link
        f.write(b"+")
    os.chmod(r / "modes", 0o755)
    wk.renameat2(r / "bin/sh", r / "x/attr", wk.RENAME_EXCHANGE)


def workload_b(root):
    """More changes on top of workload_a's result."""
    r = Path(root)
    (r / "etc/gone").write_bytes(b"back\n")                       # create over lower whiteout
    os.unlink(r / "usr/lib/lib2.so")
    os.rename(r / "etc/motd", r / "motd")
    os.mkdir(r / "emptydir")
    os.unlink(r / "new/moved/tree/file")
    os.rmdir(r / "new/moved/tree")
    os.chmod(r / "etc/conf.d", 0o700)
    os.symlink("x", r / "etc/conf.d/sl")


def snap(root):
    return wk.merged_snapshot(root)


def assert_same(a, b, what):
    d = wk.diff_snapshots(a, b, "expected", "got")
    assert not d, f"{what}:\n  " + "\n  ".join(d)


@pytest.fixture
def base(tmp_path):
    require_fuse()
    require_kernel_overlay()
    fuse_only("mounts ours and the kernel on the same upper")
    with wk.watchdog(tmp_path, 180, "interop test"):
        yield tmp_path


def _mount_kernel_same_upper(exits, s, lowers):
    s.reset_work()
    return s.mount_kernel(exits, lowers=lowers)


@pytest.mark.parametrize("fmt", ["kernel-format", "oci-format"])
def test_ours_then_kernel_then_ours(base, fmt):
    specs = LOWERS_KERNEL if fmt == "kernel-format" else LOWERS_OCI
    s = wk.Stack(base, specs, "s")
    klowers = s.kernel_lowers() if fmt == "oci-format" else s.lowers
    with contextlib.ExitStack() as ex:
        s.mount_ours(ex)
        workload_a(s.mnt)
        seen_a = snap(s.mnt)
    with contextlib.ExitStack() as ex:                # persistence
        s.mount_ours(ex)
        assert_same(seen_a, snap(s.mnt), "remounting ours")
    with contextlib.ExitStack() as ex:
        _mount_kernel_same_upper(ex, s, klowers)
        assert_same(seen_a, snap(s.mnt), "kernel overlay on our upper")
    with contextlib.ExitStack() as ex:                # and back: ours on a kernel-used upper
        s.reset_work()
        s.mount_ours(ex)
        assert_same(seen_a, snap(s.mnt), "ours again after the kernel mounted the upper")
        workload_b(s.mnt)
        seen_b = snap(s.mnt)
    with contextlib.ExitStack() as ex:
        _mount_kernel_same_upper(ex, s, klowers)
        assert_same(seen_b, snap(s.mnt), "kernel overlay on our upper (second round)")


def test_kernel_then_ours(base):
    s = wk.Stack(base, LOWERS_KERNEL, "s")
    with contextlib.ExitStack() as ex:
        s.mount_kernel(ex)
        workload_a(s.mnt)
        seen_a = snap(s.mnt)
    with contextlib.ExitStack() as ex:
        s.reset_work()
        s.mount_ours(ex)
        assert_same(seen_a, snap(s.mnt), "ours on the kernel's upper")
    with contextlib.ExitStack() as ex:
        s.reset_work()
        s.mount_kernel(ex)
        workload_b(s.mnt)
        seen_b = snap(s.mnt)
    with contextlib.ExitStack() as ex:
        s.reset_work()
        s.mount_ours(ex)
        assert_same(seen_b, snap(s.mnt), "ours on the kernel's upper (second round)")


def test_same_workload_same_upper_as_kernel(base):
    """The upper our mount writes is the one the kernel writes (normalized: whiteout
    modes/link counts, private xattrs)."""
    s = wk.Stack(base, LOWERS_KERNEL, "ours")
    k = s.clone("kern")
    with contextlib.ExitStack() as ex:
        s.mount_ours(ex)
        k.mount_kernel(ex)
        workload_a(s.mnt)
        workload_a(k.mnt)
        assert_same(snap(k.mnt), snap(s.mnt), "merged views after the same workload")
        workload_b(s.mnt)
        workload_b(k.mnt)
        assert_same(snap(k.mnt), snap(s.mnt), "merged views after the second workload")
    d = wk.diff_snapshots(wk.upper_snapshot(k.upper), wk.upper_snapshot(s.upper),
                          "kernel", "ours")
    assert not d, "upper dirs differ:\n  " + "\n  ".join(d)


def test_shell_tools_ours_then_kernel(base):
    s = wk.Stack(base, LOWERS_KERNEL, "s")
    with contextlib.ExitStack() as ex:
        s.mount_ours(ex)
        m = s.mnt
        subprocess.run(
            "set -e; cd '%s'; mv usr/share usr/share2; cp -a etc etc.bak; rm -rf etc/conf.d;"
            " sed -i s/top/TOP/ etc/motd; ln -s motd etc/motd.link; touch -d @12345 bin/sh;"
            " mkdir -p a/b/c && echo hi > a/b/c/d && rm -r a/b" % m, shell=True, check=True)
        seen = snap(m)
    with contextlib.ExitStack() as ex:
        s.reset_work()
        s.mount_kernel(ex)
        assert_same(seen, snap(s.mnt), "kernel overlay after shell tools on ours")


# ---------------------------------------------------------------------------------------------
# random operation sequences through ours; the kernel (and a remount of ours) must agree
# ---------------------------------------------------------------------------------------------

NAMES = ["a", "b", "a/x", "a/y", "b/x", "b/x/z", "a/x/z"]
OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.sampled_from([b"", b"data"])),
    st.tuples(st.just("append"), st.sampled_from(NAMES)),
    st.tuples(st.just("mkdir"), st.sampled_from(NAMES)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("rmdir"), st.sampled_from(NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("link"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("symlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("chmod"), st.sampled_from(NAMES)),
    st.tuples(st.just("xattr"), st.sampled_from(NAMES)),
)
LOWER_CHOICES = st.sampled_from([
    {"a/x": "ax", "b/x/z": "bxz", "b/y": "by"},
    {"a": OPAQUE_KERNEL, "a/y": "ay2", "b": WHITEOUT_KERNEL},  # (whiteouts only where
    # the kernel filters them: it lists those in dirs that only one layer has)
    {"a/x/z": "axz", "a/y": DIR, "b": DIR},
    {"a": OPAQUE_OCI, "a/x": "oci", "b": WHITEOUT_OCI},
    {},
])


def apply_op(root, op):
    r = Path(root)
    kind = op[0]
    try:
        if kind == "write":
            wk.write_file(r / op[1], op[2])
        elif kind == "append":
            with open(r / op[1], "ab") as f:
                f.write(b"+")
        elif kind == "mkdir":
            os.mkdir(r / op[1])
        elif kind == "unlink":
            os.unlink(r / op[1])
        elif kind == "rmdir":
            os.rmdir(r / op[1])
        elif kind == "rename":
            os.rename(r / op[1], r / op[2])
        elif kind == "link":
            os.link(r / op[1], r / op[2])
        elif kind == "symlink":
            os.symlink("target", r / op[1])
        elif kind == "chmod":
            os.chmod(r / op[1], 0o700)
        elif kind == "xattr":
            os.setxattr(r / op[1], "user.t", b"v", follow_symlinks=False)
    except OSError:
        pass


@settings(max_examples=int(os.environ.get("OVL_INTEROP_EXAMPLES", "15")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lowers=st.lists(LOWER_CHOICES, min_size=1, max_size=3),
       ops=st.lists(OPS, min_size=1, max_size=25))
def test_random_ops_ours_then_kernel(base, lowers, ops):
    import tempfile
    d = tempfile.mkdtemp(dir=base)
    try:
        s = wk.Stack(d, lowers, "s")
        with contextlib.ExitStack() as ex:
            s.mount_ours(ex)
            for op in ops:
                apply_op(s.mnt, op)
            seen = snap(s.mnt)
        with contextlib.ExitStack() as ex:
            s.mount_ours(ex)
            assert_same(seen, snap(s.mnt), "remounting ours")
        with contextlib.ExitStack() as ex:
            _mount_kernel_same_upper(ex, s, s.kernel_lowers())
            assert_same(seen, snap(s.mnt), "kernel overlay on our upper")
    finally:
        wk._force_cleanup(d)


def test_inode_numbers_survive_remount(tmp_path):
    """The kernel keeps st_ino of an object across copy-up and across remounts (all layers
    on one fs; the copy-up records its origin). Tools with stat caches (git's index, backup
    tools, make) then see unchanged files as unchanged."""
    require_fuse()
    s = wk.Stack(tmp_path, LOWERS_KERNEL, "s")
    paths = ["etc", "etc/motd", "etc/passwd", "usr/lib/lib.so", "usr/share/doc/README",
             "new", "new/file", "bin/sh"]
    with wk.watchdog(tmp_path, 120, "inode numbers"):
        with contextlib.ExitStack() as ex:
            s.mount_tested(ex)
            m = s.mnt
            before = {p: os.lstat(m / p).st_ino for p in paths if os.path.lexists(m / p)}
            with open(m / "etc/motd", "ab") as f:               # copy-ups
                f.write(b"+")
            os.chmod(m / "bin/sh", 0o700)
            os.makedirs(m / "new")
            (m / "new/file").write_bytes(b"n")
            during = {p: os.lstat(m / p).st_ino for p in paths}
        assert {p: during[p] for p in before} == before, "st_ino changed on copy-up"
        with contextlib.ExitStack() as ex:
            s.reset_work()
            s.mount_tested(ex)
            after = {p: os.lstat(s.mnt / p).st_ino for p in paths}
        assert after == during, "st_ino changed across a remount: " + ", ".join(
            f"{p}: {during[p]} -> {after[p]}" for p in paths if during[p] != after[p])


@pytest.mark.parametrize("how", ["exchange", "rename-over-opaque-dir", "rename-over-whiteout"])
def test_dir_moved_over_hidden_lower_dir_keeps_it_hidden(tmp_path, how):
    """A lower dir a/x is deleted and recreated (opaque), then a pure upper dir is moved
    to a/x. The lower a/x/f must stay hidden, now and after a remount (the kernel marks a
    directory moved into a merged parent opaque)."""
    require_fuse()
    s = wk.Stack(tmp_path, [{"a/x/f": "lower f", "b/": DIR}], "s")
    with wk.watchdog(tmp_path, 120, "dir move"):
        with contextlib.ExitStack() as ex:
            s.mount_tested(ex)
            m = s.mnt
            os.unlink(m / "a/x/f")
            os.rmdir(m / "a/x")
            if how != "rename-over-whiteout":
                os.mkdir(m / "a/x")
            os.mkdir(m / "b/n")
            (m / "b/n/mine").write_bytes(b"m")
            if how == "exchange":
                wk.renameat2(m / "a/x", m / "b/n", wk.RENAME_EXCHANGE)
            else:
                os.rename(m / "b/n", m / "a/x")
            live = sorted(os.listdir(m / "a/x"))
        assert live == ["mine"]
        with contextlib.ExitStack() as ex:
            s.reset_work()
            s.mount_tested(ex)
            assert sorted(os.listdir(s.mnt / "a/x")) == ["mine"], \
                "the lower a/x/f came back after a remount"
        assert wk.is_opaque_dir(s.upper / "a/x")
