"""redirect_dir, differential against the kernel overlay mounted with redirect_dir=on.

Each scenario runs the same renames (and work inside the renamed directories) on both
mounts; after every step the merged views and the upper directories must be the same
(overlay.redirect values included; origin handles aside), and again after a remount. Then
both ways across: our upper mounted by the kernel, the kernel's upper mounted by us (with
redirect_dir=follow, and its default, off), must show what both showed.
"""
from __future__ import annotations

import contextlib
import os

import pytest

import layerkit
import writekit as wk
from layerkit import DIR, File
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

ON = ("redirect_dir=on",)
KERNEL_ON = ("redirect_dir=on", "index=off", "metacopy=off", "xino=off")

LOWER = {
    "d/a": "a\n", "d/sub/s": "s\n", "d/sub/deep/x": "x\n",
    "x/": DIR, "x/keep": "k\n",
    "empty/": DIR,
    "p/q/f": "q\n",
    "file": "file\n",
}
LOWER2 = {"d/b": "b from the bottom layer\n", "d/sub/t": "t\n", "m/n": "n\n"}


def _mv(a, b):
    os.rename(a, b)


def _touch(p):
    with open(p, "w") as f:
        f.write("new\n")


SCENARIOS = {
    "rename and back": [(_mv, "d", "e"), (_mv, "e", "d")],
    "into another dir": [(_mv, "d", "x/d")],
    "into a new dir": [(os.mkdir, "nd"), (_mv, "d", "nd/d")],
    "over an empty lower dir": [(_mv, "d", "empty")],
    "over an emptied merged dir": [(os.unlink, "p/q/f"), (_mv, "d", "p/q")],
    "already redirected, same dir": [(_mv, "d", "e"), (_mv, "e", "f")],
    "already redirected, elsewhere": [(_mv, "d", "e"), (_mv, "e", "x/e2")],
    "absolute, then again": [(_mv, "d", "x/d"), (_mv, "x/d", "x/d2"), (_mv, "x/d2", "d3")],
    "nested dir out of a redirected one": [(_mv, "d", "e"), (_mv, "e/sub", "top")],
    "nested dir renamed in place": [(_mv, "d", "e"), (_mv, "e/sub", "e/sub2")],
    "inside a redirected dir": [(_mv, "d", "e"), (_touch, "e/new"), (os.unlink, "e/a"),
                                (os.mkdir, "e/nd"), (os.rmdir, "e/nd"), (os.mkdir, "e/nd2"),
                                (os.unlink, "e/sub/deep/x"), (os.rmdir, "e/sub/deep"),
                                (_touch, "e/sub/new2"), (os.unlink, "e/b")],
    "exchange": [(lambda a, b: wk.renameat2(a, b, wk.RENAME_EXCHANGE), "d", "p")],
    "rmdir of a redirected dir": [(_mv, "p/q", "q2"), (os.unlink, "q2/f"), (os.rmdir, "q2")],
    "swap names": [(_mv, "d", "tmp"), (_mv, "x", "d"), (_mv, "tmp", "x")],
    "file rename (no redirect)": [(_mv, "file", "file2"), (_mv, "file2", "x/file3")],
}


def _apply(p, steps):
    for fn, *rels in steps:
        r = p.both(fn, *rels, what=getattr(fn, "__name__", "op"))
        assert r[0] == "ok", f"{fn} {rels}: {r}"
        p.both(lambda path: sorted(os.listdir(path)), "", what="listdir /")
        p.check()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_redirect_dir_on_like_the_kernel(pair, tmp_path, name):
    p = pair(LOWER, LOWER2, ours=ON, kernel=KERNEL_ON)
    _apply(p, SCENARIOS[name])
    view = p.check()
    p.remount()
    assert p.check() == view
    p.unmount()
    _across(p, tmp_path, view)


def _across(p, tmp_path, view):
    """Our upper under the kernel, the kernel's upper under us: the same view."""
    for n, (lowers, upper, ours) in enumerate(((p.klowers, p.oupper, False),
                                               (p.stack.lowers, p.kupper, True))):
        for opts in ((("redirect_dir=follow",), ()) if ours else (("redirect_dir=on",),
                                                                  ("redirect_dir=follow",))):
            work = tmp_path / f"across-work-{n}-{len(opts) and opts[0]}"
            mnt = tmp_path / f"across-mnt-{n}-{len(opts) and opts[0]}"
            work.mkdir()
            mnt.mkdir()
            with contextlib.ExitStack() as ex:
                if ours:
                    ex.enter_context(layerkit.fuse_mount(None, lowers, upper, work, mnt, opts))
                else:
                    ex.enter_context(layerkit.kernel_overlay(lowers, upper, work, mnt=mnt,
                                                             options=opts))
                got = wk.merged_snapshot(mnt)
            who = "ours on the kernel's upper" if ours else "the kernel on our upper"
            diff = wk.diff_snapshots(view, got, "before", f"{who} {opts}")
            assert not diff, "\n  ".join(diff)


def test_default_is_exdev_and_nofollow_ignores_redirects(pair, tmp_path):
    """Without redirect_dir=on a merged directory cannot move (EXDEV, as the kernel); with
    nofollow a redirect written before is not followed (the kernel's view too)."""
    p = pair(LOWER, ours=(), kernel=wk.KERNEL_OPTS)
    assert p.both(os.rename, "d", "e") == ("err", "EXDEV")
    p.unmount()
    # a kernel-written redirect, then both with nofollow
    kwork = tmp_path / "kw"
    kwork.mkdir()
    with layerkit.kernel_overlay(p.klowers, p.kupper, kwork, mnt=p.kmnt, options=KERNEL_ON):
        os.rename(p.k("d"), p.k("e"))
    views = {}
    for who, opts in (("kernel", ("redirect_dir=nofollow",)), ("ours", ("redirect_dir=nofollow",))):
        work = tmp_path / f"nf-{who}"
        mnt = tmp_path / f"nf-mnt-{who}"
        work.mkdir()
        mnt.mkdir()
        with contextlib.ExitStack() as ex:
            if who == "ours":
                ex.enter_context(layerkit.fuse_mount(None, p.stack.lowers, p.kupper, work, mnt,
                                                     opts))
            else:
                ex.enter_context(layerkit.kernel_overlay(p.klowers, p.kupper, work, mnt=mnt,
                                                         options=opts))
            views[who] = (wk.merged_snapshot(mnt), wk.attempt(os.stat, mnt / "e"),
                          wk.attempt(os.stat, mnt / "d"))
    assert views["ours"] == views["kernel"]
    assert views["ours"][1:] == (("err", "EPERM"), ("err", "ENOENT"))


def test_redirect_in_a_lower_layer_is_followed(make_layers, mounted, kernel_mount):
    """A redirect the kernel left in an upper that is now the middle lower layer."""
    from layerkit import WHITEOUT_KERNEL, Dir
    stack = make_layers({"moved/": Dir(xattrs={"trusted.overlay.redirect": b"orig"}),
                         "moved/new": "top\n", "orig": WHITEOUT_KERNEL},
                        {"orig/a": "a\n", "orig/sub/b": "b\n"}, upper=True)
    k = kernel_mount(stack, options=("redirect_dir=follow",))
    m = mounted(stack, options=("redirect_dir=follow",))
    want = wk.merged_snapshot(k)
    assert sorted(os.listdir(os.path.join(k, "moved"))) == ["a", "new", "sub"]
    assert wk.merged_snapshot(wk.mp(m)) == want


def test_long_absolute_redirect_falls_back_to_exdev(pair):
    """An absolute redirect longer than 256 bytes is not written: EXDEV, as the kernel."""
    deep = "/".join(["n" * 60] * 5)
    p = pair({deep + "/leaf/f": "f\n", "x/": DIR}, ours=ON, kernel=KERNEL_ON)
    assert p.both(os.rename, deep + "/leaf", "x/leaf") == ("err", "EXDEV")
    assert p.both(os.rename, deep + "/leaf", deep + "/leaf2")[0] == "ok"
    p.check()


@pytest.mark.parametrize("opts, want", [
    ("redirect_dir=on", "on"), ("redirect_dir=follow", "follow"),
    ("redirect_dir=nofollow", "nofollow"), ("userxattr", "nofollow"),
    ("userxattr,redirect_dir=off", "nofollow"), ("redirect_dir=off", None), ("", None)])
def test_redirect_dir_option(tmp_path, opts, want):
    """off (the default) is follow or nofollow as the overlay module's
    redirect_always_follow says, as for the kernel overlay."""
    from overlayfs_py.config import REDIRECT_ALWAYS_FOLLOW, parse_argv
    if want is None:
        try:
            with open(REDIRECT_ALWAYS_FOLLOW) as f:
                want = "follow" if f.read().strip() == "Y" else "nofollow"
        except OSError:
            want = "follow"
    for d in ("l", "m"):
        (tmp_path / d).mkdir()
    o = f"lowerdir={tmp_path / 'l'}" + ("," + opts if opts else "")
    assert parse_argv(["-o", o, str(tmp_path / "m")], check=False).redirect_dir == want
