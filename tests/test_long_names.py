"""Names of 252 to 256 bytes, differential against the kernel overlay.

A name of NAME_MAX (255) bytes works for every operation, on new names and on names that
exist in a lower layer; 256 bytes gives ENAMETOOLONG, as on the kernel overlay. The
``.wh.``-prefixed form of such a name (our lookup of an OCI whiteout) is longer than
NAME_MAX: it must read as "absent", never as an error. And an operation that fails leaves
nothing changed: a rename to a 256-byte name once renamed the file in the upper layer and
then failed, losing it from the merged view.
"""
from __future__ import annotations

import os
import stat

import pytest

import writekit as wk
from layerkit import DIR, File
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

LENGTHS = [251, 252, 255, 256]


def nm(prefix, n):
    return prefix + "x" * (n - len(prefix))


def lower_spec():
    spec = {"f": "lower f\n", "d/": DIR, "d/a": "a\n", "e/": DIR}
    for n in LENGTHS[:-1]:                        # ext4 takes at most 255
        spec[nm("L", n)] = File(f"long {n}\n", xattrs={"user.k": b"v"})
        spec[nm("D", n) + "/"] = DIR
        spec[nm("D", n) + "/inner"] = "inner\n"
        spec[nm("E", n) + "/"] = DIR
        spec[nm("R", n)] = f"rename me {n}\n"
        spec[nm("T", n)] = f"rename me too {n}\n"
        spec[nm("U", n)] = f"unlink me {n}\n"
        spec[nm("V", n)] = f"rename over me {n}\n"
    return spec


def _creat(p):
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))


def _write(p):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(fd, b"more\n")
    finally:
        os.close(fd)


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _lstat(p):
    st = os.lstat(p)
    return (stat.S_IFMT(st.st_mode), st.st_size)


NEW_NAME_OPS = {
    "creat": lambda n: (_creat, nm("c", n)),
    "mkdir": lambda n: (lambda p: os.mkdir(p, 0o755), nm("m", n)),
    "mknod": lambda n: (lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
                        nm("n", n)),
    "mkfifo": lambda n: (os.mkfifo, nm("p", n)),
    "symlink": lambda n: (lambda p: os.symlink("f", p), nm("s", n)),
    "link": lambda n: (lambda a, b: os.link(a, b), "f", nm("l", n)),
    "rename-lower": lambda n: (os.rename, "d/a", nm("r", n)),
    "rename-in-dir": lambda n: (os.rename, "f", "e/" + nm("q", n)),
    "stat-missing": lambda n: (os.lstat, nm("z", n)),
    "unlink-missing": lambda n: (os.unlink, nm("z", n)),
    "mkdir-inside-missing": lambda n: (os.mkdir, nm("z", n) + "/sub"),
}

LOWER_NAME_OPS = {
    "stat": lambda n: (_lstat, nm("L", n)),
    "read": lambda n: (_read, nm("L", n)),
    "chmod": lambda n: (lambda p: os.chmod(p, 0o600), nm("L", n)),
    "append": lambda n: (_write, nm("L", n)),
    "setxattr": lambda n: (lambda p: os.setxattr(p, "user.new", b"1"), nm("L", n)),
    "getxattr": lambda n: (lambda p: os.getxattr(p, "user.k"), nm("L", n)),
    "unlink": lambda n: (os.unlink, nm("U", n)),
    "rename-away": lambda n: (os.rename, nm("R", n), "short"),
    "rename-long-to-long": lambda n: (os.rename, nm("T", n), nm("S", n)),
    "rename-over": lambda n: (os.rename, "f", nm("V", n)),
    "link-from": lambda n: (os.link, nm("L", n), nm("k", n)),
    "rmdir": lambda n: (os.rmdir, nm("E", n)),
    "create-inside": lambda n: (_creat, nm("D", n) + "/new"),
    "unlink-inside": lambda n: (os.unlink, nm("D", n) + "/inner"),
    "listdir": lambda n: (lambda p: sorted(os.listdir(p)), nm("D", n)),
}


@pytest.mark.parametrize("n", LENGTHS)
def test_new_names(pair, n):
    """Every operation that makes a name, at each length, one after the other on one pair
    of mounts (each op uses its own names), compared after each step and after a remount."""
    p = pair(lower_spec())
    for op in NEW_NAME_OPS:
        fn, *rels = NEW_NAME_OPS[op](n)
        before = wk.upper_snapshot(p.oupper)
        r = p.both(fn, *rels, what=op)
        if n <= 255 and not op.endswith("missing"):
            assert r[0] == "ok", f"{op} of a {n}-byte name: {r}"
        if n > 255:
            assert r == ("err", "ENAMETOOLONG"), f"{op} of a {n}-byte name: {r}"
        if r[0] == "err":
            assert wk.upper_snapshot(p.oupper) == before, f"{op} failed but changed the upper"
        p.check()
    p.remount()
    p.check()


@pytest.mark.parametrize("n", LENGTHS[:-1])
def test_lower_names(pair, n):
    """Every operation on names that exist in a lower layer, as above."""
    p = pair(lower_spec())
    for op in LOWER_NAME_OPS:
        fn, *rels = LOWER_NAME_OPS[op](n)
        r = p.both(fn, *rels, what=op)
        assert r[0] == "ok", f"{op} of a {n}-byte lower name: {r}"
        p.check()
    p.remount()
    p.check()


def test_failed_rename_to_256_bytes_loses_nothing(pair):
    """The report: rename to a 256-byte name failed and the file was gone."""
    p = pair({"f": "lower f\n", "d/a": "a\n"})
    with open(p.o("up"), "w") as f:
        f.write("upper\n")
    with open(p.k("up"), "w") as f:
        f.write("upper\n")
    before = wk.upper_snapshot(p.oupper)
    for src in ("f", "up", "d/a"):
        assert p.both(os.rename, src, nm("r", 256)) == ("err", "ENAMETOOLONG")
        assert p.both(os.rename, src, "d/" + nm("r", 256)) == ("err", "ENAMETOOLONG")
    assert wk.upper_snapshot(p.oupper) == before
    assert sorted(os.listdir(p.o())) == ["d", "f", "up"]
    _creat(p.o("new"))                 # the old names are still usable
    p.both(_read, "f")
    p.both(_read, "up")


def test_statfs_namemax(pair):
    p = pair({"f": "x"})
    assert os.statvfs(p.o()).f_namemax == os.statvfs(p.k()).f_namemax == 255
