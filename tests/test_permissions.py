"""Permissions as other users: mounted by root with ``allow_other`` and
``default_permissions``, used by unprivileged uids (forked children that drop to them).

Every test runs one scenario twice -- on our mount and on the kernel overlay over an
identical copy of the layers -- records what each step did (the errno, and the mode, owner,
group and xattrs it left), and requires the two records to be equal; a few assertions on
the kernel's record pin down what the scenario is about, so that a scenario that tests
nothing fails too. (tests/test_write_ops.py checks some of the same rules against fixed
expectations on our mount alone.)
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

import writekit as wk
from layerkit import DIR, Dir, File

pytestmark = pytest.mark.mount

U1, U2, U3 = 2001, 2002, 2003          # unprivileged test users (no /etc/passwd entry needed)
G1, G2, G3 = 3001, 3002, 3003

# struct vfs_cap_data, revision 2, effective, permitted = CAP_NET_RAW
CAP_NET_RAW = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
_NOID = 0xFFFFFFFF


def acl(*entries) -> bytes:
    """A system.posix_acl_* value: entries of (tag, perm bits, id or None)."""
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", t, p, _NOID if i is None else i) for t, p, i in entries)


def as_user(uid, gid, fn, groups=()):
    return wk.run_as(uid, gid, fn, groups=groups)


def _err(fn, *a) -> str:
    try:
        fn(*a)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def meta(p) -> object:
    """(mode, uid, gid) of p, or the errno name."""
    try:
        st = os.lstat(p)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return (oct(st.st_mode), st.st_uid, st.st_gid)


def xattr(p, name) -> object:
    try:
        return os.getxattr(p, name, follow_symlinks=False).hex()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def append(p, data=b"+"):
    def fn():
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return fn


def read(p):
    def fn():
        with open(p, "rb") as f:
            f.read()
    return fn


def create(p, mode=0o644):
    def fn():
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    return fn


@pytest.fixture
def both(make_layers, mounted, kernel_mount):
    """both(specs, scenario) -> (ours, kernel): ``scenario(mnt, upper)`` run on our mount
    and on the kernel overlay, each over a fresh stack built from ``specs``."""
    def run(specs, scenario):
        results = {}
        for impl in ("ours", "kernel"):
            stack = make_layers(*specs, upper=True)
            if impl == "ours":
                m = mounted(stack, options=("allow_other", "default_permissions")).path
                upper = stack.upper
            else:
                m = kernel_mount(stack)
                upper = Path(m).parent / "upper"
            wk.make_traversable(m)
            results[impl] = scenario(Path(m), Path(upper))
        ours, kernel = results["ours"], results["kernel"]
        diffs = [f"{k}: ours={ours.get(k)!r} kernel={kernel.get(k)!r}"
                 for k in sorted(set(ours) | set(kernel)) if ours.get(k) != kernel.get(k)]
        assert not diffs, "differs from the kernel overlay:\n  " + "\n  ".join(diffs)
        return ours, kernel
    return run


# ---------------------------------------------------------------------------------------------

def test_mode_bits(both):
    spec = {
        "f/own600": File("o\n", mode=0o600, uid=U1, gid=G2),
        "f/grp640": File("g\n", mode=0o640, uid=0, gid=G1),
        "f/grp604": File("g\n", mode=0o604, uid=0, gid=G1),   # group denies, other allows
        "f/oth606": File("x\n", mode=0o606),
        "f/root600": File("r\n", mode=0o600),
        "f/exec711": File("#!/bin/sh\n", mode=0o711),
        "dw": Dir(mode=0o777), "dw/x": "x\n",
        "dr": Dir(mode=0o755), "dr/x": "x\n",
        "dx": Dir(mode=0o711), "dx/x": "x\n",
        "dn": Dir(mode=0o700), "dn/x": "x\n",
        "dg": Dir(mode=0o770, gid=G1), "dg/x": File("x\n", mode=0o660, gid=G1),
    }

    def scenario(m, upper):
        out = {}
        for who, uid, gid, groups in (("u1", U1, G2, [G1]), ("u2", U2, G2, [])):
            for f in ("own600", "grp640", "grp604", "oth606", "root600", "exec711"):
                p = m / "f" / f
                out[f"{who} read {f}"] = as_user(uid, gid, read(p), groups)
                out[f"{who} write {f}"] = as_user(uid, gid, append(p), groups)
                out[f"{who} exec {f}"] = as_user(
                    uid, gid, lambda p=p: None if os.access(p, os.X_OK) else
                    (_ for _ in ()).throw(PermissionError(errno.EACCES, "x")), groups)
            for d in ("dw", "dr", "dx", "dn", "dg"):
                p = m / d
                out[f"{who} list {d}"] = as_user(uid, gid, lambda p=p: os.listdir(p), groups)
                out[f"{who} stat {d}/x"] = as_user(uid, gid, lambda p=p: os.stat(p / "x"),
                                                    groups)
                out[f"{who} create {d}"] = as_user(uid, gid, create(p / f"new-{who}"), groups)
                out[f"{who} unlink {d}/x"] = as_user(uid, gid, lambda p=p: os.unlink(p / "x"),
                                                      groups)
        for f in ("own600", "grp640", "oth606"):
            out[f"content {f}"] = (m / "f" / f).read_bytes()
        return out

    ours, kernel = both([spec], scenario)
    assert kernel["u1 read grp640"] == "ok" and kernel["u2 read grp640"] == "EACCES"
    assert kernel["u1 read grp604"] == "EACCES" and kernel["u2 read grp604"] == "ok"
    assert kernel["u1 create dr"] == "EACCES" and kernel["u1 create dw"] == "ok"
    assert kernel["u1 list dx"] == "EACCES" and kernel["u1 stat dx/x"] == "ok"


def test_sticky_bit(both):
    spec = {
        "tmp": Dir(mode=0o1777),
        "tmp/u1file": File("1\n", uid=U1, gid=G1, mode=0o666),
        "tmp/u2file": File("2\n", uid=U2, gid=G2),
        "tmp/rootfile": File("r\n", mode=0o666),
        "own": Dir(mode=0o1777, uid=U1, gid=G1),           # sticky dir owned by u1
        "own/u2file": File("2\n", uid=U2, gid=G2),
    }

    def scenario(m, upper):
        out = {}
        out["u1 creates"] = as_user(U1, G1, create(m / "tmp/u1new"))
        out["u2 unlinks u1file"] = as_user(U2, G2, lambda: os.unlink(m / "tmp/u1file"))
        out["u2 unlinks u1new"] = as_user(U2, G2, lambda: os.unlink(m / "tmp/u1new"))
        out["u2 renames u1file"] = as_user(U2, G2, lambda: os.rename(m / "tmp/u1file",
                                                                      m / "tmp/mine"))
        out["u2 replaces u1file"] = as_user(U2, G2, lambda: os.rename(m / "tmp/u2file",
                                                                       m / "tmp/u1file"))
        out["u2 unlinks rootfile"] = as_user(U2, G2, lambda: os.unlink(m / "tmp/rootfile"))
        out["u2 writes u1file"] = as_user(U2, G2, append(m / "tmp/u1file"))
        out["u1 unlinks u1file"] = as_user(U1, G1, lambda: os.unlink(m / "tmp/u1file"))
        out["u1 unlinks u1new"] = as_user(U1, G1, lambda: os.unlink(m / "tmp/u1new"))
        out["dir owner unlinks u2file"] = as_user(U1, G1, lambda: os.unlink(m / "own/u2file"))
        out["root unlinks rootfile"] = _err(os.unlink, m / "tmp/rootfile")
        out["names"] = sorted(os.listdir(m / "tmp")) + sorted(os.listdir(m / "own"))
        return out

    ours, kernel = both([spec], scenario)
    assert kernel["u2 unlinks u1file"] == "EPERM" and kernel["u2 unlinks u1new"] == "EPERM"
    assert kernel["u1 unlinks u1file"] == "ok" and kernel["dir owner unlinks u2file"] == "ok"


def test_setuid_setgid_cleared_on_write_and_chown(both):
    spec = {
        "lo/suid": File("s\n", mode=0o4777),
        "lo/sgid": File("s\n", mode=0o2777),
        "lo/both_u1": File("s\n", mode=0o6775, uid=U1, gid=G1),
        "lo/chgrp_u1": File("s\n", mode=0o6755, uid=U1, gid=G1),
        "lo/root_writes": File("s\n", mode=0o4777),
        "lo/trunc": File("s\n", mode=0o6777),
    }

    def scenario(m, upper):
        out = {}
        # the same files once more in the upper layer (created through the mount)
        for name in ("suid", "sgid", "both_u1", "chgrp_u1", "root_writes", "trunc"):
            src = m / "lo" / name
            dst = m / f"up_{name}"
            dst.write_bytes(src.read_bytes())
            st = os.stat(src)
            os.chown(dst, st.st_uid, st.st_gid)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
        for pre in ("lo/", "up_"):
            out[pre + "u2 writes suid"] = as_user(U2, G2, append(m / f"{pre}suid"))
            out[pre + "u2 writes sgid"] = as_user(U2, G2, append(m / f"{pre}sgid"))
            out[pre + "u1 writes own"] = as_user(U1, G1, append(m / f"{pre}both_u1"), [G2])
            out[pre + "u1 chgrp own"] = as_user(
                U1, G1, lambda: os.chown(m / f"{pre}chgrp_u1", -1, G2), [G2])
            out[pre + "u2 chgrp not own"] = as_user(
                U2, G2, lambda: os.chown(m / f"{pre}suid", -1, G2))
            out[pre + "root writes"] = _err(append(m / f"{pre}root_writes"))
            out[pre + "u2 truncates"] = as_user(U2, G2, lambda: os.truncate(m / f"{pre}trunc", 1))
            for name in ("suid", "sgid", "both_u1", "chgrp_u1", "root_writes", "trunc"):
                out[f"{pre}{name} after"] = meta(m / f"{pre}{name}")
        return out

    ours, kernel = both([spec], scenario)
    for pre in ("lo/", "up_"):
        assert kernel[f"{pre}suid after"][0] == oct(stat.S_IFREG | 0o777)
        assert kernel[f"{pre}both_u1 after"][0] == oct(stat.S_IFREG | 0o775)
        assert kernel[f"{pre}chgrp_u1 after"] == (oct(stat.S_IFREG | 0o755), U1, G2)
        assert kernel[f"{pre}u2 chgrp not own"] == "EPERM"


def test_setgid_directory_group_inheritance(both):
    spec = {
        "sg": Dir(mode=0o2777, gid=G1),
        "sg/old/f": "f\n",
        "sg/sub": Dir(mode=0o2777, gid=G1),
    }

    def scenario(m, upper):
        out = {}
        os.unlink(m / "sg/old/f")
        os.rmdir(m / "sg/old")                        # a whiteout: mkdir over it below
        out["u1 create"] = as_user(U1, G2, create(m / "sg/file", 0o664))
        out["u1 mkdir"] = as_user(U1, G2, lambda: os.mkdir(m / "sg/dir", 0o775))
        out["u1 mkdir over whiteout"] = as_user(U1, G2, lambda: os.mkdir(m / "sg/old", 0o775))
        out["u1 mkdir in merged sub"] = as_user(U1, G2, lambda: os.mkdir(m / "sg/sub/d", 0o775))
        # a non-member asking for setgid on a file in a setgid dir does not get it
        out["u2 create sgid file"] = as_user(U2, G2, create(m / "sg/u2sgid", 0o2775))
        out["u1 member create sgid"] = as_user(U1, G2, create(m / "sg/u1sgid", 0o2775), [G1])
        out["u1 symlink"] = as_user(U1, G2, lambda: os.symlink("file", m / "sg/link"))
        for n in ("file", "dir", "old", "sub/d", "u2sgid", "u1sgid", "link"):
            out[f"{n} meta"] = meta(m / "sg" / n)
            out[f"{n} upper meta"] = meta(upper / "sg" / n)
        return out

    ours, kernel = both([spec], scenario)
    um = os.umask(0)
    os.umask(um)
    assert kernel["file meta"] == (oct(stat.S_IFREG | (0o664 & ~um)), U1, G1)
    assert kernel["dir meta"] == (oct(stat.S_IFDIR | 0o2000 | (0o775 & ~um)), U1, G1)
    assert kernel["old meta"] == kernel["dir meta"]
    assert kernel["u2sgid meta"][0] == oct(stat.S_IFREG | (0o775 & ~um))


def test_posix_acls(both):
    access = acl((ACL_USER_OBJ, 7, None), (ACL_USER, 7, U2), (ACL_GROUP_OBJ, 5, None),
                 (ACL_MASK, 7, None), (ACL_OTHER, 5, None))
    default = acl((ACL_USER_OBJ, 7, None), (ACL_USER, 6, U3), (ACL_GROUP_OBJ, 5, None),
                  (ACL_GROUP, 7, G3), (ACL_MASK, 7, None), (ACL_OTHER, 0, None))
    fileacl = acl((ACL_USER_OBJ, 6, None), (ACL_USER, 6, U2), (ACL_GROUP_OBJ, 0, None),
                  (ACL_MASK, 6, None), (ACL_OTHER, 0, None))
    spec = {
        "a": Dir(mode=0o775, xattrs={"system.posix_acl_access": access,
                                     "system.posix_acl_default": default}),
        "a/f": File("f\n", mode=0o660, xattrs={"system.posix_acl_access": fileacl}),
        "b": Dir(mode=0o755),
        "b/mine": File("m\n", mode=0o600, uid=U1, gid=G1),
        "c": Dir(mode=0o700, uid=U1, gid=G1),
    }

    def scenario(m, upper):
        out = {}
        out["u2 reads a/f"] = as_user(U2, G2, read(m / "a/f"))
        out["u2 writes a/f"] = as_user(U2, G2, append(m / "a/f"))
        out["u3 reads a/f"] = as_user(U3, G3, read(m / "a/f"))
        out["u2 creates in a"] = as_user(U2, G2, create(m / "a/u2"))
        out["u3 creates in a"] = as_user(U3, G3, create(m / "a/u3"))
        out["u1 creates in a"] = as_user(U1, G1, create(m / "a/u1"))
        os.close(os.open(m / "a/root", os.O_WRONLY | os.O_CREAT, 0o666))
        os.mkdir(m / "a/sub", 0o777)
        for n in ("u1", "root", "sub"):
            out[f"a/{n} access acl"] = xattr(m / "a" / n, "system.posix_acl_access")
            out[f"a/{n} meta"] = meta(m / "a" / n)
        out["a/sub default acl"] = xattr(m / "a/sub", "system.posix_acl_default")
        out["u3 writes a/root (default acl)"] = as_user(U3, G3, append(m / "a/root"))
        out["u2 writes a/root"] = as_user(U2, G2, append(m / "a/root"))
        # the owner grants access with an ACL through the mount
        grant = acl((ACL_USER_OBJ, 6, None), (ACL_USER, 4, U2), (ACL_GROUP_OBJ, 0, None),
                    (ACL_MASK, 4, None), (ACL_OTHER, 0, None))
        out["u2 reads b/mine before"] = as_user(U2, G2, read(m / "b/mine"))
        out["u1 sets acl"] = as_user(
            U1, G1, lambda: os.setxattr(m / "b/mine", "system.posix_acl_access", grant))
        out["u3 sets acl on u1 file"] = as_user(
            U3, G3, lambda: os.setxattr(m / "b/mine", "system.posix_acl_access", grant))
        out["u2 reads b/mine after"] = as_user(U2, G2, read(m / "b/mine"))
        out["u2 writes b/mine after"] = as_user(U2, G2, append(m / "b/mine"))
        out["b/mine meta"] = meta(m / "b/mine")
        out["u1 chmod 640"] = as_user(U1, G1, lambda: os.chmod(m / "b/mine", 0o640))
        out["b/mine acl after chmod"] = xattr(m / "b/mine", "system.posix_acl_access")
        out["u1 default acl on own dir"] = as_user(
            U1, G1, lambda: os.setxattr(m / "c", "system.posix_acl_default", default))
        out["u1 creates in c"] = as_user(U1, G1, create(m / "c/new", 0o666))
        out["c/new acl"] = xattr(m / "c/new", "system.posix_acl_access")
        out["c/new meta"] = meta(m / "c/new")
        out["upper a/f acl"] = xattr(upper / "a/f", "system.posix_acl_access")
        return out

    ours, kernel = both([spec], scenario)
    assert kernel["u2 reads a/f"] == "ok" and kernel["u3 reads a/f"] == "EACCES"
    assert kernel["u3 writes a/root (default acl)"] == "ok"
    assert kernel["u2 reads b/mine before"] == "EACCES" and kernel["u2 reads b/mine after"] == "ok"
    assert kernel["u3 sets acl on u1 file"] == "EPERM"
    assert kernel["c/new acl"] not in ("ENODATA", "EOPNOTSUPP")


def test_trusted_xattrs_refused_to_non_root(both):
    spec = {"f": File("f\n", mode=0o666, uid=U1, gid=G1,
                      xattrs={"trusted.keep": b"secret", "user.ok": b"1"})}

    def scenario(m, upper):
        out = {}
        p = m / "f"
        out["u1 set trusted"] = as_user(U1, G1, lambda: os.setxattr(p, "trusted.x", b"1"))
        out["u1 get trusted"] = as_user(U1, G1, lambda: os.getxattr(p, "trusted.keep"))
        out["u1 remove trusted"] = as_user(U1, G1, lambda: os.removexattr(p, "trusted.keep"))

        def lists_trusted():
            if any(n.startswith("trusted.") for n in os.listxattr(p)):
                raise PermissionError(errno.EEXIST, "trusted.* listed")
        out["u1 lists trusted (EEXIST: yes)"] = as_user(U1, G1, lists_trusted)
        out["u1 set user"] = as_user(U1, G1, lambda: os.setxattr(p, "user.mine", b"2"))
        out["root get trusted"] = xattr(p, "trusted.keep")
        out["root lists"] = sorted(os.listxattr(p))
        out["upper trusted.x"] = xattr(upper / "f", "trusted.x")
        return out

    ours, kernel = both([spec], scenario)
    assert kernel["u1 set trusted"] == "EPERM"
    assert kernel["u1 lists trusted (EEXIST: yes)"] == "ok"
    assert kernel["u1 set user"] == "ok"


def test_security_capability_dropped_on_write(both):
    spec = {
        "bin/any": File(b"\x7fELF", mode=0o777, xattrs={"security.capability": CAP_NET_RAW}),
        "bin/own": File(b"\x7fELF", mode=0o755, uid=U1, gid=G1,
                        xattrs={"security.capability": CAP_NET_RAW}),
        "bin/trunc": File(b"\x7fELF", mode=0o777, xattrs={"security.capability": CAP_NET_RAW}),
        "bin/keep": File(b"\x7fELF", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
    }

    def scenario(m, upper):
        out = {}
        out["u2 writes any"] = as_user(U2, G2, append(m / "bin/any"))
        out["u1 writes own"] = as_user(U1, G1, append(m / "bin/own"))
        out["u2 truncates"] = as_user(U2, G2, lambda: os.truncate(m / "bin/trunc", 2))
        out["u2 reads keep"] = as_user(U2, G2, read(m / "bin/keep"))
        out["u1 sets capability"] = as_user(
            U1, G1, lambda: os.setxattr(m / "bin/own", "security.capability", CAP_NET_RAW))
        for n in ("any", "own", "trunc", "keep"):
            out[f"{n} cap"] = xattr(m / "bin" / n, "security.capability")
            out[f"{n} meta"] = meta(m / "bin" / n)
        return out

    ours, kernel = both([spec], scenario)
    for n in ("any", "own", "trunc"):
        assert kernel[f"{n} cap"] == "ENODATA"
    assert kernel["keep cap"] == CAP_NET_RAW.hex()


def test_unreadable_lower_file_is_not_copied_up(both):
    spec = {
        "pub": Dir(mode=0o777),
        "pub/secret": File("secret\n", mode=0o600),
        "pub/ro": File("ro\n", mode=0o644),
    }

    def scenario(m, upper):
        out = {}
        p = m / "pub/secret"
        ops = {
            "read": read(p),
            "write": append(p),
            "truncate": lambda: os.truncate(p, 0),
            "chmod": lambda: os.chmod(p, 0o666),
            "chown": lambda: os.chown(p, U1, G1),
            "touch": lambda: os.utime(p, None),
            "utime": lambda: os.utime(p, (1, 1)),
            "setxattr": lambda: os.setxattr(p, "user.x", b"1"),
            "link": lambda: os.link(p, m / "pub/hl"),
            "write ro": append(m / "pub/ro"),
        }
        for name, fn in ops.items():
            out[f"u1 {name}"] = as_user(U1, G1, fn)
        out["copied up"] = sorted(os.listdir(upper / "pub")) if (upper / "pub").exists() else []
        # a rename needs only the directory's permission: both overlays copy the file up,
        # and it stays unreadable to the user
        out["u1 rename"] = as_user(U1, G1, lambda: os.rename(p, m / "pub/moved"))
        out["u1 reads moved"] = as_user(U1, G1, read(m / "pub/moved"))
        out["moved meta"] = meta(m / "pub/moved")
        out["moved content"] = (m / "pub/moved").read_bytes()
        return out

    ours, kernel = both([spec], scenario)
    assert kernel["copied up"] == []
    assert kernel["u1 read"] == "EACCES" and kernel["u1 write"] == "EACCES"
