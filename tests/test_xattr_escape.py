"""The overlay's own xattr namespace, used by a client of the mount, against the kernel.

Since Linux 6.7 the kernel overlay stores a client's ``trusted.overlay.X`` escaped, as
``trusted.overlay.overlay.X`` in the upper layer (``user.overlay.*`` with userxattr), and
shows an escaped xattr of a layer unescaped: an overlay nested on another keeps its
markers as data (rootless podman inside a container, an image store on a mount). Markers
of the mount itself stay invisible and cannot be set. Each test runs the same calls on
our mount and on the kernel overlay over copies of the same layers, in both xattr forms,
and compares the outcomes and the raw xattrs of the upper layers.
"""
from __future__ import annotations

import os

import pytest

import writekit as wk
from layerkit import Dir, File
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount]

FORMS = {"trusted": "trusted.overlay.", "user": "user.overlay."}


def raw_xattrs(path: str) -> dict:
    """Every xattr of a layer file, overlay ones included."""
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in sorted(os.listxattr(path, follow_symlinks=False))}


def overlay_raw(path: str) -> dict:
    """The escaped xattrs of a layer file, and the opaque markers (the bookkeeping ones,
    such as origin, differ by design: pairkit's compare_uppers leaves them out too)."""
    return {n: v for n, v in raw_xattrs(path).items()
            if n.startswith(tuple(p + "overlay." for p in FORMS.values()))
            or n in (p + "opaque" for p in FORMS.values())}


def listx(f):
    return sorted(os.listxattr(f))


def getx(name):
    return lambda f: os.getxattr(f, name)


def setx(name, value):
    return lambda f: os.setxattr(f, name, value)


def rmx(name):
    return lambda f: os.removexattr(f, name)


@pytest.fixture(params=sorted(FORMS))
def form(request):
    return request.param


def make_pair(pair, form):
    p = FORMS[form]
    opts = ("userxattr",) if form == "user" else ()
    # the kernel takes no redirect_dir=off with userxattr (off still follows redirects)
    kernel = tuple(o for o in wk.KERNEL_OPTS if not o.startswith("redirect_dir=")) + \
        ("redirect_dir=nofollow",) + opts if opts else wk.KERNEL_OPTS
    lower = {
        "lo": File("lower\n", xattrs={p + "overlay.nested": b"N", "user.plain": b"u"}),
        "d": Dir(),
        "d/x": "x",
        "hidden": File("h\n", xattrs={p + "overlay.overlay.twice": b"T"}),
    }
    upper = {"up": File("upper\n")}
    return pair(lower, upper=upper, ours=opts, kernel=kernel), p


def test_escaped_xattrs_read_as_the_kernel_shows_them(pair, form):
    pr, p = make_pair(pair, form)
    # an escaped xattr of a lower file is listed and read unescaped; one escaped twice
    # loses one level
    pr.both(listx, "lo", what="listxattr")
    assert pr.both(getx(p + "nested"), "lo", what="getxattr") == ("ok", b"N")
    pr.both(listx, "hidden", what="listxattr")
    assert pr.both(getx(p + "overlay.twice"), "hidden", what="getxattr") == ("ok", b"T")
    # the raw escaped name itself is escaped once more, so it is not there
    pr.both(getx(p + "overlay.nested"), "lo", what="getxattr")


def test_own_namespace_set_and_removed_escaped(pair, form):
    pr, p = make_pair(pair, form)
    for rel in ("lo", "up", "d"):
        pr.both(setx(p + "opaque", b"y"), rel, what="setxattr")
        pr.both(setx(p + "mine", b"M"), rel, what="setxattr")
        pr.both(getx(p + "mine"), rel, what="getxattr")
        pr.both(listx, rel, what="listxattr")
    pr.both(rmx(p + "nested"), "lo", what="removexattr")
    pr.both(rmx(p + "absent"), "lo", what="removexattr")
    # what a client set is data: d did not become opaque, its lower entry is still there
    pr.both(lambda f: sorted(os.listdir(f)), "d", what="listdir")
    # the escaped name of a name of 255 bytes is too long for the layer
    long = p + "z" * (255 - len(p))
    pr.both(setx(long, b"L"), "up", what="setxattr long")
    for rel in ("lo", "up", "d"):
        assert overlay_raw(os.path.join(pr.oupper, rel)) == \
            overlay_raw(os.path.join(pr.kupper, rel)), rel
    assert overlay_raw(os.path.join(pr.oupper, "lo"))[p + "overlay.mine"] == b"M"
    pr.remount()
    pr.both(listx, "lo", what="listxattr after remount")
    pr.both(lambda f: sorted(os.listdir(f)), "d", what="listdir after remount")
    pr.check()


def test_escaped_xattrs_survive_copy_up(pair, form):
    pr, p = make_pair(pair, form)
    pr.both(lambda f: os.chmod(f, 0o600), "lo", what="chmod")          # a metadata copy-up
    pr.both(lambda f: os.chmod(f, 0o600), "hidden", what="chmod")
    for rel in ("lo", "hidden"):
        assert overlay_raw(os.path.join(pr.oupper, rel)) == \
            overlay_raw(os.path.join(pr.kupper, rel)), rel
    assert overlay_raw(os.path.join(pr.oupper, "lo")).get(p + "overlay.nested") == b"N"
    pr.both(listx, "lo", what="listxattr")


def test_the_other_form_is_refused(pair):
    """Our divergence: the daemon reads markers of both forms (and fuse-overlayfs') in
    every layer, so a client may not write the other form's, which the kernel stores as
    plain xattrs."""
    pr, _ = make_pair(pair, "trusted")
    ro = wk.attempt(os.setxattr, pr.o("up"), "user.overlay.opaque", b"y")
    rk = wk.attempt(os.setxattr, pr.k("up"), "user.overlay.opaque", b"y")
    assert wk.outcome(rk) == "ok"
    assert wk.outcome(ro) == "ENOTSUP", ro     # = EOPNOTSUPP on Linux
    assert "user.overlay.opaque" not in raw_xattrs(os.path.join(pr.oupper, "up"))
