"""Directory listings cached by the kernel (no OPENDIR; see ops.opendir and readdir.py).

The daemon answers OPENDIR with ENOSYS, so the kernel keeps each listing in its page cache
and must drop it whenever the directory changes through the mount. These tests check both
halves: a repeated listing reaches the daemon no more, and every kind of change is seen at
once -- with the cache, and with the fallback that snapshots a listing per open
(OVERLAYFS_PY_NO_DIR_CACHE=1, as with a stock pyfuse3).
"""
from __future__ import annotations

import os
import sys

import pytest

import writekit as wk
from conftest import fuse_only

pytestmark = pytest.mark.mount


def _ours_only():
    fuse_only("counts the daemon's requests")
    if wk.is_fuse_overlayfs():
        pytest.skip("counts overlayfs-py's requests")


def _requests(m, op: str) -> int:
    return m.log().count(f"-> {op}(")


def test_second_listing_sends_no_request(make_layers, mounted):
    _ours_only()
    import pyfuse3
    if getattr(pyfuse3, "OVERLAYFS_PY_PATCH", 0) < 1:
        pytest.skip("stock pyfuse3: no kernel directory cache (make setup builds ours)")
    stack = make_layers({f"d/f{i}": "x" for i in range(300)}, {"d/low": "l"}, upper=True)
    m = mounted(stack, prog=f"{sys.executable} -m overlayfs_py -d")
    d = os.path.join(wk.mp(m), "d")
    first = sorted(os.listdir(d))
    assert len(first) == 301
    after_first = _requests(m, "readdir")
    assert after_first >= 1
    for _ in range(3):
        assert sorted(os.listdir(d)) == first
    assert _requests(m, "readdir") == after_first, "a warm listing reached the daemon"
    assert _requests(m, "opendir") <= 1 and _requests(m, "releasedir") == 0
    # a change through the mount drops the kernel's copy: the next listing is read again
    open(os.path.join(d, "new"), "w").close()
    assert sorted(os.listdir(d)) == sorted(first + ["new"])
    assert _requests(m, "readdir") > after_first


@pytest.mark.parametrize("dir_cache", [True, False], ids=["kernel-cache", "per-open"])
def test_listings_follow_every_change(make_layers, mounted, dir_cache):
    _ours_only()
    env = dict(os.environ)
    if not dir_cache:
        env["OVERLAYFS_PY_NO_DIR_CACHE"] = "1"
    stack = make_layers({"a/top": "t", "a/sub/x": "x", "b/keep": "k"},
                        {"a/low": "l", "a/gone": "g", "a/sub/y": "y", "c/f": "f"}, upper=True)
    m = mounted(stack, env=env)
    mnt = wk.mp(m)

    def ls(rel):
        return sorted(os.listdir(os.path.join(mnt, rel)))

    def p(rel):
        return os.path.join(mnt, rel)

    assert ls("a") == ["gone", "low", "sub", "top"]
    assert ls("a/sub") == ["x", "y"]
    os.unlink(p("a/gone"))                                 # whiteout
    assert ls("a") == ["low", "sub", "top"]
    open(p("a/gone"), "w").close()                         # create over the whiteout
    assert ls("a") == ["gone", "low", "sub", "top"]
    os.rename(p("b/keep"), p("a/kept"))                    # across directories
    assert ls("a") == ["gone", "kept", "low", "sub", "top"] and ls("b") == []
    os.rename(p("a/low"), p("a/low2"))                     # within one (lower file)
    assert ls("a") == ["gone", "kept", "low2", "sub", "top"]
    for name in ls("a/sub"):
        os.unlink(p(f"a/sub/{name}"))
    os.rmdir(p("a/sub"))
    os.mkdir(p("a/sub"))                                   # opaque: y must not come back
    assert ls("a/sub") == []
    os.link(p("a/top"), p("a/sub/top-link"))
    os.symlink("top", p("a/sub/sl"))
    os.mkfifo(p("a/sub/fifo"))
    assert ls("a/sub") == ["fifo", "sl", "top-link"]
    wk.renameat2(p("a/kept"), p("a/top"), wk.RENAME_EXCHANGE)
    assert ls("a") == ["gone", "kept", "low2", "sub", "top"]
    with open(p("a/top")) as f:
        assert f.read() == "k"
    # a listing that is open across a change still ends, without duplicates
    fd = os.open(p("a"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        it = os.scandir(fd)
        seen = [next(it).name]
        os.unlink(p("a/low2"))
        open(p("a/zz-new"), "w").close()
        seen += [e.name for e in it]
        assert len(seen) == len(set(seen))
    finally:
        os.close(fd)
    assert ls("a") == ["gone", "kept", "sub", "top", "zz-new"]
