"""index=on: lower hard links stay one file after copy-up, in the kernel's on-disk format.

- the format: the index entry the kernel makes is named by the hex of the handle our
  index.py computes for the lower file; the upper root's origin and the index dir's
  ``overlay.upper`` are the handles we compute;
- differential: the same changes through both mounts (the kernel with index=on) give the
  same merged view (st_nlink and hard-link groups of every name included), the same upper
  layer and the same index: entries, their ``overlay.nlink``, and the upper names linked
  to each;
- both ways across on the very same directories: our upper and index mounted by the
  kernel with index=on, and the kernel's by us, show what the other showed;
- mount-time checks as the kernel's: an upper used over other lower layers, or an index
  dir of another upper, fails the mount with index=on (and not with index=off).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

import layerkit
import writekit as wk
from layerkit import Hardlink
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

ON = ("index=on",)
KERNEL_ON = ("redirect_dir=off", "index=on", "metacopy=off", "xino=off")
ORIGIN = "trusted.overlay.origin"
NLINK = "trusted.overlay.nlink"

LOWER = {
    "h/a": "hard\n",
    "h/b": Hardlink("h/a"),
    "x/c": Hardlink("h/a"),
    "solo": "solo\n",
    "two/p": "pair\n",
    "two/q": Hardlink("two/p"),
}


def need_both():
    if wk.kernel_mode():
        pytest.skip("OVL_TEST_PROG=kernel: nothing to compare against")
    if not (wk.fuse_available() and wk.kernel_overlay_available()):
        pytest.skip("needs /dev/fuse, fusermount3 and the kernel overlay driver as root")


def index_state(upper, work):
    """{entry: (nlink xattr, sorted upper names that are links of it)}; '#' temporaries
    (the kernel's shared whiteout) left out. Entry names differ between two stacks (their
    lowers are other inodes), so the caller compares the values."""
    idx = os.path.join(work, "index")
    out = {}
    for name in sorted(os.listdir(idx)):
        if name.startswith("#"):
            continue
        p = os.path.join(idx, name)
        st = os.lstat(p)
        names = []
        for root, dirs, files in os.walk(upper):
            for f in files:
                q = os.path.join(root, f)
                s = os.lstat(q)
                if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                    names.append(os.path.relpath(q, upper))
        try:
            nl = os.getxattr(p, NLINK, follow_symlinks=False).decode()
        except OSError:
            nl = None
        out[name] = (nl, st.st_nlink, tuple(sorted(names)))
    return out


def same_index(p):
    k = sorted(index_state(p.kupper, p.kwork).values(), key=repr)
    o = sorted(index_state(p.oupper, p.stack.work).values(), key=repr)
    assert k == o, f"index differs: kernel {k}, ours {o}"


def ino_groups(root, names):
    st = {n: os.lstat(os.path.join(root, n)) for n in names}
    return {n: (s.st_ino, s.st_nlink, s.st_size) for n, s in st.items()}


def _append(path, data=b"more\n"):
    with open(path, "ab") as f:
        f.write(data)


def _names_agree(root, names):
    """Every name of one file: one st_ino, one st_nlink, the same contents."""
    st = [os.lstat(os.path.join(root, n)) for n in names]
    assert len({s.st_ino for s in st}) == 1, names
    assert len({s.st_nlink for s in st}) == 1, names
    data = set()
    for n in names:
        with open(os.path.join(root, n), "rb") as f:
            data.add(f.read())
    assert len(data) == 1, names
    return st[0].st_nlink


STEPS = [
    ("append via h/a", lambda p: p.both(_append, "h/a")),
    ("every name", lambda p: p.both(lambda *ps: _names_agree(os.path.dirname(
        os.path.dirname(ps[0])), ["h/a", "h/b", "x/c"]), "h/a")),
    ("unlink h/b", lambda p: p.both(os.unlink, "h/b")),
    ("rename x/c", lambda p: p.both(os.rename, "x/c", "x/c2")),
    ("link h/a", lambda p: p.both(os.link, "h/a", "solo2")),
    ("unlink two/q (never copied up)", lambda p: p.both(os.unlink, "two/q")),
    ("rename over x/c2", lambda p: p.both(os.rename, "solo", "x/c2")),
]


def test_hardlinks_like_the_kernel(pair):
    p = pair(LOWER, ours=ON, kernel=KERNEL_ON)
    for what, step in STEPS:
        r = step(p)
        assert r[0] == "ok", f"{what}: {r}"
        p.check()
        same_index(p)
    for names in (["h/a", "solo2"], ["two/p"]):
        p.both(lambda *ps: [os.lstat(x).st_nlink for x in ps], *names)
    p.remount()
    p.check()
    same_index(p)
    # the last names go: the index entry with them, as the kernel removes it
    for n in ("h/a", "solo2"):
        assert p.both(os.unlink, n)[0] == "ok"
    p.check()
    same_index(p)
    left = [n for n in os.listdir(os.path.join(p.stack.work, "index")) if n[0] != "#"]
    assert len(left) == 1             # two/p's (two/q was copied up to be unlinked)


def test_index_names_are_the_kernels(tmp_path):
    """The kernel's index entry, origins and index-dir mark are the handles we compute."""
    from overlayfs_py import index as ix
    from overlayfs_py.layers import Layer
    need_both()
    s = wk.Stack(tmp_path, [LOWER])
    with contextlib.ExitStack() as ex:
        m = s.mount_kernel(ex, options=KERNEL_ON)
        _append(os.path.join(m, "h/a"))
    layers = [Layer(0, str(s.upper), True), Layer(1, str(s.lowers[0]), False)]
    try:
        probe = ix.Index(-1, layers, False)
        low_a = probe.fh(1, layers[1].root_fd, b"h/a")
        entries = [n for n in os.listdir(s.work / "index") if not n.startswith("#")]
        assert entries == [ix.index_name(low_a).decode()]
        assert os.getxattr(s.upper / "h/a", ORIGIN) == low_a
        assert os.getxattr(s.upper, ORIGIN) == probe.fh(1, layers[1].root_fd)
        assert os.getxattr(s.work / "index", "trusted.overlay.upper") == \
            probe.fh(0, layers[0].root_fd, upper=True)
        assert os.getxattr(s.upper / "h/a", NLINK) == b"U+1"      # 3 names, 2 links
    finally:
        for lay in layers:
            lay.close()


def _view(root):
    return wk.merged_snapshot(root)


def test_both_ways_on_the_same_directories(tmp_path):
    """Ours with index=on, then the kernel with index=on on our upper and index, then ours
    again on what the kernel left: each shows what the other showed."""
    need_both()
    s = wk.Stack(tmp_path, [LOWER])
    with contextlib.ExitStack() as ex:
        m = wk.mp(s.mount_ours(ex, ON))
        _append(os.path.join(m, "h/a"))
        os.unlink(os.path.join(m, "h/b"))
        ours = _view(m)
        assert _names_agree(m, ["h/a", "x/c"]) == 2
    with contextlib.ExitStack() as ex:
        m = s.mount_kernel(ex, options=KERNEL_ON)
        diff = wk.diff_snapshots(ours, _view(m), "ours", "kernel")
        assert not diff, "\n".join(diff)
        _append(os.path.join(m, "x/c"), b"kernel\n")
        os.link(os.path.join(m, "two/q"), os.path.join(m, "two/r"))
        os.rename(os.path.join(m, "h/a"), os.path.join(m, "a2"))
        kern = _view(m)
    with contextlib.ExitStack() as ex:
        m = wk.mp(s.mount_ours(ex, ON))
        diff = wk.diff_snapshots(kern, _view(m), "kernel", "ours")
        assert not diff, "\n".join(diff)
        assert _names_agree(m, ["a2", "x/c"]) == 2
        assert _names_agree(m, ["two/p", "two/q", "two/r"]) == 3
        os.unlink(os.path.join(m, "two/p"))
        ours = _view(m)
    with contextlib.ExitStack() as ex:
        m = s.mount_kernel(ex, options=KERNEL_ON)
        diff = wk.diff_snapshots(ours, _view(m), "ours", "kernel")
        assert not diff, "\n".join(diff)


def _mount_fails(fn):
    try:
        with contextlib.ExitStack() as ex:
            fn(ex)
    except (RuntimeError, subprocess.CalledProcessError, OSError, AssertionError) as e:
        return str(e) or type(e).__name__
    return None


def test_mount_checks_like_the_kernel(tmp_path):
    """An upper used over other lowers, or an index dir of another upper, fails a mount
    with index=on on both; index=off mounts them; the first index=on mount of an upper
    made with index=off marks it, and the kernel accepts what we marked."""
    need_both()
    s = wk.Stack(tmp_path, [LOWER])
    with contextlib.ExitStack() as ex:            # index=off first: nothing marked
        m = wk.mp(s.mount_ours(ex))
        _append(os.path.join(m, "solo"))
    assert ORIGIN not in os.listxattr(s.upper)
    with contextlib.ExitStack() as ex:            # a later index=on mount marks it
        m = wk.mp(s.mount_ours(ex, ON))
        _append(os.path.join(m, "h/b"))
        assert _names_agree(m, ["h/a", "h/b", "x/c"]) == 3
    assert ORIGIN in os.listxattr(s.upper)
    with contextlib.ExitStack() as ex:
        m = s.mount_kernel(ex, options=KERNEL_ON)
        assert _names_agree(m, ["h/a", "h/b", "x/c"]) == 3

    other = layerkit.make_layer(tmp_path / "otherlower", LOWER)
    for who in ("ours", "kernel"):
        def mount_other(ex, opts, who=who):
            if who == "ours":
                ex.enter_context(layerkit.fuse_mount(None, [other], s.upper, s.work, s.mnt,
                                                     opts))
            else:
                ex.enter_context(layerkit.kernel_overlay([other], s.upper, s.work,
                                                         mnt=s.mnt, options=opts))
        err = _mount_fails(lambda ex: mount_other(ex, ON if who == "ours" else KERNEL_ON))
        assert err is not None, f"{who}: mounted an upper over other lowers with index=on"
        if who == "ours":
            assert "failed to verify upper root origin" in err, err
        kopts = ("index=off", "xino=off") if who == "kernel" else ("index=off",)
        assert _mount_fails(lambda ex: mount_other(ex, kopts)) is None

    # the index dir of another upper
    s2 = wk.Stack(tmp_path, [LOWER], name="s2")
    shutil.rmtree(s2.work)
    shutil.copytree(s.work, s2.work, symlinks=True)
    for who in ("ours", "kernel"):
        def mount2(ex, who=who):
            if who == "ours":
                s2.mount_ours(ex, ON)
            else:
                s2.mount_kernel(ex, options=KERNEL_ON)
        err = _mount_fails(mount2)
        assert err is not None, f"{who}: used the index dir of another upper"
        if who == "ours":
            assert "failed to verify index dir 'upper' xattr" in err, err


def test_several_names_in_use_at_once(pair):
    """The case FUSE cannot tell apart (one inode, the name is not sent): with index=on
    every name of the lower hard link shows a change made through another, also through
    descriptors opened before the copy-up, as on the kernel."""
    p = pair(LOWER, ours=ON, kernel=KERNEL_ON)
    names = ["h/a", "h/b", "x/c"]

    def scenario(root):
        fds = [os.open(os.path.join(root, n), os.O_RDONLY) for n in names]
        try:
            os.setxattr(os.path.join(root, "h/b"), "user.k", b"v")
            seen = [os.getxattr(os.path.join(root, n), "user.k") for n in names]
            with open(os.path.join(root, "x/c"), "ab") as f:
                f.write(b"through c\n")
            os.chmod(os.path.join(root, "h/a"), 0o600)
            data = [os.pread(fd, 100, 0) for fd in fds]
            st = [os.fstat(fd) for fd in fds]
            return (seen, data, [oct(s.st_mode) for s in st],
                    len({s.st_ino for s in st}), [s.st_nlink for s in st])
        finally:
            for fd in fds:
                os.close(fd)

    r = p.both(lambda h: scenario(os.path.dirname(os.path.dirname(h))), "h/a")
    assert r[1][3] == 1 and r[1][4] == [3, 3, 3], r
    # which name the first copy-up links may differ (the README): views must not
    p.check(uppers=False)
    p.remount()
    p.check(uppers=False)
    assert p.both(os.unlink, "h/b")[0] == "ok"
    p.check(uppers=False)
    # (the index differs in which names are linked: the kernel linked h/b, x/c and h/a
    # as each was used; we linked the name looked up first, h/a, and h/b to unlink it)
