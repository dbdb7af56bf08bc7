"""Hostile layers: symlinks must never lead the daemon outside the layers.

A layer from an untrusted image can hold symlinks such as ``etc -> /``, ``a -> ../../..``
or absolute links into the host. Through the mount such a symlink is only *data*: the
daemon answers readlink with the target string and the *kernel* resolves it, relative to
the reading process's root and cwd, exactly as for a symlink on any filesystem. The
daemon itself must never follow a symlink found in a layer: not when looking a name up,
not when listing or merging a directory, not when reading attributes or xattrs.

We put a sentinel directory outside every layer (its entries carry a unique token) and
point the hostile symlinks at it. The cases, with what each must show:

1. ``etc -> SENTINEL`` in a lower, a real ``etc/`` with ``passwd`` in the upper. The upper's
   directory is not merged with a lower non-directory: ``MNT/etc`` lists only ``passwd``
   (the upper's), and ``MNT/etc/leak-TOKEN`` does not exist. A daemon that resolved
   ``LOWER/etc/leak-TOKEN`` as a path would find the sentinel's file: that is the leak.
2. Same, deeper: a real ``deep/b/c/`` above, ``deep -> SENTINEL`` below; the sentinel has
   ``b/c/leak-TOKEN``. No lookup below ``deep`` reaches it.
3. ``usr -> SENTINEL`` in a layer above a lower with a real ``usr/bin/tool``: ``usr`` is a
   symlink in the merged view (a non-directory stops the search); ``MNT/usr/`` is resolved
   by the kernel to the sentinel, so listing it equals listing the sentinel on the host,
   and ``usr/bin/tool`` (only in the layer) does not exist.
4. A lower directory replaced by a symlink in an upper layer (``var -> SENTINEL`` over a
   real ``var/log/x``): same as 3.
5. ``root -> /``: lstat says symlink, readlink gives ``/``, and ``MNT/root/`` lists the
   host root (the kernel resolves it); nothing of the layers shows there.
6. ``a -> ../../..``: resolved by the kernel relative to ``MNT``: ``stat(MNT/a)`` is the
   host directory three levels above the mount, not anything in a layer.
7. ``abs -> SENTINEL/passwd``: reading ``MNT/abs`` gives the host file (kernel-resolved),
   readlink gives the exact string.
8. A symlink inside a merged directory (``m/n -> SENTINEL`` over a real ``m/n/q``).
9. Marker names used as hostile symlinks (``.wh.hidden -> SENTINEL``,
   ``opq/.wh..wh..opq -> SENTINEL``) and invalid markers ``.wh..`` / ``.wh...`` (they would
   hide ``.``/``..``): never listed, never followed, and ``.`` / ``..`` keep working. Whether
   a marker that is a symlink still counts as a whiteout is not asserted (format question,
   not a safety one).
10. Paths longer than PATH_MAX inside a layer: a daemon that builds absolute paths fails
    there; one that works relative to directory fds does not.

The strongest check runs the daemon under ``strace -f -y`` while a walk touches every
entry, and asserts that no file syscall of the daemon succeeded on a path naming the
sentinel and that no fd of the daemon ever pointed into it. (A path-based stat that
follows an intermediate symlink returns no fd, so strace shows no resolved path for it;
that is why the probes look up names that only the sentinel has -- ``leak-TOKEN`` -- and a
*successful* syscall on such a name is the evidence.)
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

import layerkit
from conftest import fuse_only, kernel_mode, require_fuse
from layerkit import DIR, File, Symlink, make_layer

TOKEN = "sentinel-7c1e93"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside every layer; every entry name carries TOKEN."""
    sent = tmp_path / f"outside-{TOKEN}"
    make_layer(sent, {"passwd": "OUTSIDE passwd\n", f"leak-{TOKEN}": "LEAK\n",
                      f"b/c/leak-{TOKEN}": "LEAK\n", f"bin/tool-{TOKEN}": "LEAK\n",
                      f"q-{TOKEN}": "LEAK\n"})
    return sent


def hostile_stack(make_layers, sent: Path):
    S = str(sent)
    top = {
        "usr": Symlink(S),                      # case 3: symlink named like a lower dir
        "a": Symlink("../../.."),               # case 6
        "abs": Symlink(S + "/passwd"),          # case 7
        "root": Symlink("/"),                   # case 5
        "deep/b/c/": DIR,                       # case 2 (real dirs above a symlink)
        "deep/b/own": "top",
        ".wh.hidden": Symlink(S),               # case 9: markers as hostile symlinks
        "opq/.wh..wh..opq": Symlink(S),
        "opq/mine": "mine",
        ".wh..": "", ".wh...": "",              # invalid markers for '.' and '..'
        "m/top": "t",
    }
    middle = {
        "etc": Symlink(S),                      # case 1
        "deep": Symlink(S),                     # case 2
        "m/n": Symlink(S),                      # case 8
        "usr/bin/tool": "layer tool",           # case 3 (hidden by the symlink above)
    }
    bottom = {
        "etc/hostname": "layer hostname",       # cut off by the middle's symlink
        "var/log/x": "layer log",               # case 4
        "m/n/q": "layer q",                     # case 8
        "hidden": "hidden?",
        "opq/theirs": "theirs",
    }
    upper = {
        "etc/passwd": "UPPER passwd\n",         # case 1
        "var": Symlink(S),                      # case 4: lower dir replaced by a symlink
    }
    return make_layers(top, middle, bottom, upper=upper)


def _assert_view(m: Path, sent: Path) -> None:
    S = str(sent)
    # 1. etc: the upper's real dir only
    assert stat.S_ISDIR(os.lstat(m / "etc").st_mode)
    assert sorted(os.listdir(m / "etc")) == ["passwd"]
    assert (m / "etc/passwd").read_text() == "UPPER passwd\n"
    for name in (f"leak-{TOKEN}", "hostname"):
        assert not os.path.lexists(m / "etc" / name), name
    # 2. deep
    assert sorted(os.listdir(m / "deep")) == ["b"]
    assert sorted(os.listdir(m / "deep/b")) == ["c", "own"]
    assert os.listdir(m / "deep/b/c") == []
    assert not os.path.lexists(m / f"deep/leak-{TOKEN}")
    assert not os.path.lexists(m / f"deep/b/c/leak-{TOKEN}")
    # 3. usr: a symlink; following it is the kernel's business and lands on the host
    assert stat.S_ISLNK(os.lstat(m / "usr").st_mode)
    assert os.readlink(m / "usr") == S
    assert sorted(os.listdir(str(m / "usr") + "/")) == sorted(os.listdir(S))
    assert not os.path.lexists(m / "usr/bin/tool")
    assert os.path.lexists(m / f"usr/bin/tool-{TOKEN}")   # host file, via the kernel
    # 4. var
    assert stat.S_ISLNK(os.lstat(m / "var").st_mode)
    assert not os.path.lexists(m / "var/log/x")
    # 5. root -> /
    assert stat.S_ISLNK(os.lstat(m / "root").st_mode)
    assert os.readlink(m / "root") == "/"
    assert sorted(os.listdir(str(m / "root") + "/")) == sorted(os.listdir("/"))
    # 6. a -> ../../..: resolved relative to the mount point, on the host
    host = os.stat(os.path.realpath(os.path.join(m, "../../..")))
    got = os.stat(m / "a")
    assert (got.st_dev, got.st_ino) == (host.st_dev, host.st_ino)
    # 7. abs -> SENTINEL/passwd
    assert os.readlink(m / "abs") == S + "/passwd"
    assert (m / "abs").read_text() == "OUTSIDE passwd\n"
    # 8. m/n is a symlink in a merged dir; the layer's m/n/q is not reachable
    assert sorted(os.listdir(m / "m")) == ["n", "top"]
    assert stat.S_ISLNK(os.lstat(m / "m/n").st_mode)
    assert not os.path.lexists(m / "m/n/q")
    # 9. markers
    root_names = sorted(os.listdir(m))
    assert not [n for n in root_names if n.startswith(".wh.")], root_names
    assert not [n for n in os.listdir(m / "opq") if n.startswith(".wh.")]
    assert "mine" in os.listdir(m / "opq")
    for p in (".wh.hidden", "opq/.wh..wh..opq", ".wh..", ".wh..."):
        assert not os.path.lexists(m / p), p
    assert os.path.samefile(m / ".", m)
    assert os.stat(m / "..").st_ino == os.stat(m.parent).st_ino
    # nothing anywhere in the merged tree comes from the sentinel
    for dirpath, dirnames, filenames in os.walk(m):      # does not follow symlinks
        for name in dirnames + filenames:
            assert TOKEN not in name, os.path.join(dirpath, name)


def test_hostile_symlinks_stay_data(make_layers, mounted, outside):
    s = hostile_stack(make_layers, outside)
    m = mounted(s).path
    _assert_view(m, outside)


def test_hostile_stack_matches_kernel(make_layers, mounted, kernel_mount, outside):
    # The same view as the kernel overlay gives for the same stack (markers converted).
    fuse_only("compares with the kernel")
    s = hostile_stack(make_layers, outside)
    m = mounted(s).path
    k = kernel_mount(s)
    snap = lambda root: layerkit.snapshot(root, times=False)  # noqa: E731
    diffs = layerkit.diff_snapshots(snap(k), snap(m), names=("kernel", "fuse"))
    # .wh.hidden is a symlink: whether it still whites out 'hidden' is a format question
    # (the conversion made it a whiteout for the kernel); it is the one allowed difference.
    diffs = [d for d in diffs if not d.startswith("hidden:")]
    assert not diffs, "\n".join(diffs)


def test_paths_longer_than_path_max(make_layers, mounted, kernel_mount):
    # 24 nested directories of 200-byte names: ~4.8 KiB of path below the layer root.
    parts = [f"{i:02d}" + "x" * 198 for i in range(24)]
    rel = "/".join(parts)
    s = make_layers({"top": "t"}, {})
    bottom = s.lowers[1]
    fd = os.open(bottom, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for p in parts:                       # build fd-relative: the path is too long
            os.mkdir(p, dir_fd=fd)
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open("deepest", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"bottom of the well")
        os.close(wfd)
    finally:
        os.close(fd)
    assert len(os.fsencode(os.path.join(bottom, rel))) > 4096
    # (no copying tool handles such paths, so the kernel run mounts the layers as they are)
    m = kernel_mount(s, convert=False) if kernel_mode() else mounted(s).path
    fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, p in enumerate(parts):
            assert sorted(os.listdir(fd)) == sorted([p, "top"] if i == 0 else [p])
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.listdir(fd) == ["deepest"]
        rfd = os.open("deepest", os.O_RDONLY, dir_fd=fd)
        try:
            assert os.read(rfd, 100) == b"bottom of the well"
        finally:
            os.close(rfd)
        assert os.stat("deepest", dir_fd=fd).st_size == 18
    finally:
        os.close(fd)
    # fwalk works with fds all the way down as well
    depth = max(len(Path(d).parts) for d, _, _, _ in os.fwalk(m)) - len(m.parts)
    assert depth == 24


# --------------------------------------------------------------------------------------
# strace: the daemon never touches the sentinel

_PID_LINE = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_FD_DECOR = re.compile(r"\d+<([^>]*)>")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def strace_violations(log_text: str, sentinel: str, token: str):
    """Lines where the traced daemon reached the sentinel:
    - any fd argument or returned fd whose path (strace -y) lies in the sentinel, or
    - a successful call whose path argument names the sentinel (or its token).
    readlink's result buffer is not a path the daemon used, so it is not looked at."""
    bad = []
    pending = {}
    for raw in log_text.splitlines():
        m = _PID_LINE.match(raw)
        pid, rest = (m.group(1), m.group(2)) if m else ("?", raw)
        if rest.startswith(("+++", "---")):
            continue
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        r = _RESUMED.match(rest)
        if r:
            rest = pending.pop(pid, r.group(1) + "(") + r.group(2)
        name = rest.split("(", 1)[0]
        result = rest.rsplit(") = ", 1)[-1].strip() if ") = " in rest else "?"
        ok = not result.startswith("-1") and not result.startswith("?")
        for path in _FD_DECOR.findall(rest):
            if path == sentinel or path.startswith(sentinel + "/") or token in path:
                bad.append(raw)
                break
        else:
            quoted = _QUOTED.findall(rest)
            if name in ("readlink", "readlinkat"):
                quoted = quoted[:1]
            if ok and any(token in q or sentinel in q for q in quoted):
                bad.append(raw)
    return bad


def test_strace_parser_flags_leaks():
    sent = f"/tmp/x/outside-{TOKEN}"
    log = "\n".join([
        f'10 openat(5</tmp/x/layer>, "etc/leak-{TOKEN}", O_RDONLY) = -1 ENOENT (No such file)',
        f'10 readlinkat(5</tmp/x/layer>, "etc", "{sent}", 4096) = 27',
        f'10 newfstatat(5</tmp/x/layer>, "etc", {{st_mode=S_IFLNK|0777}}, AT_SYMLINK_NOFOLLOW) = 0',
    ])
    assert strace_violations(log, sent, TOKEN) == []
    leaks = [
        f'10 openat(5</tmp/x/layer>, "etc/leak-{TOKEN}", O_RDONLY) = 7<{sent}/leak-{TOKEN}>',
        f'11 newfstatat(AT_FDCWD</>, "{sent}/passwd", {{st_mode=S_IFREG}}, 0) = 0',
        f'12 getdents64(9<{sent}>, 0x55 /* 5 entries */, 32768) = 160',
        f'13 openat(5</tmp/x/layer>, "etc/x" <unfinished ...>',
        f'13 <... openat resumed>, O_RDONLY) = 8<{sent}/x>',
    ]
    got = strace_violations("\n".join(leaks), sent, TOKEN)
    assert len(got) == 4, got


def test_daemon_never_opens_the_sentinel(make_layers, outside, tmp_path):
    fuse_only("traces the FUSE daemon")
    require_fuse()
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace not installed (make setup installs it)")
    s = hostile_stack(make_layers, outside)
    log = tmp_path / "strace.log"
    wrapper = [strace, "-f", "-y", "-qq", "-s", "4096", "-o", str(log), "-e",
               "trace=%file,openat2,getdents64,fstat,fgetxattr,flistxattr,fchdir,"
               "open_by_handle_at,name_to_handle_at"]
    # Our own mount (not the fixture's) so that the daemon has exited, and strace has
    # flushed its log, before the log is read.
    with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt, wrapper=wrapper,
                             timeout=60) as fm:
        m = fm.path
        _assert_view(m, outside)
        # touch every entry in every way a reader can, including names the sentinel has
        for dirpath, dirnames, filenames in os.walk(m):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                os.listxattr(p, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    os.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        f.read()
            for probe in ("passwd", f"leak-{TOKEN}", f"q-{TOKEN}", "b", "bin"):
                os.path.lexists(os.path.join(dirpath, probe))
        for probe in (f"etc/leak-{TOKEN}", f"deep/leak-{TOKEN}", f"deep/b/c/leak-{TOKEN}",
                      f"deep/b/leak-{TOKEN}", f"m/n/q-{TOKEN}", "opq/.wh..wh..opq/passwd"):
            os.path.lexists(m / probe)
    text = log.read_text(errors="replace")
    assert "openat" in text or "open(" in text, "strace recorded nothing: wrong trace set?"
    bad = strace_violations(text, str(outside), TOKEN)
    assert not bad, "the daemon reached the sentinel:\n" + "\n".join(bad[:30])


@pytest.mark.parametrize("at_calls", [True, False], ids=["xattrat", "o_path"])
def test_xattr_helpers_never_follow_a_symlink(tmp_path, monkeypatch, at_calls):
    """layers.listxattr_at / getxattr_at (one syscall with listxattrat/getxattrat, or an
    O_PATH open where the kernel lacks them) act on a symlink itself, never on its target,
    and give the layer's errors (ENODATA, ENOENT) as they are."""
    from overlayfs_py import layers
    if at_calls and not layers._probe_at_calls():
        pytest.skip("no listxattrat/getxattrat here (Linux < 6.13 or a seccomp filter)")
    monkeypatch.setattr(layers, "_at_calls", [at_calls])
    target = tmp_path / "target"
    target.write_text("t")
    os.setxattr(target, "user.secret", b"s" * 2000)
    d = tmp_path / "layer"
    d.mkdir()
    (d / "link").symlink_to(target)
    (d / "f").write_text("f")
    os.setxattr(d / "f", "user.mine", b"m")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert layers.listxattr_at(fd, b"link") == []
        with pytest.raises(OSError) as e:
            layers.getxattr_at(fd, b"link", "user.secret")
        assert e.value.errno == errno.ENODATA
        assert layers.listxattr_at(fd, b"f") == ["user.mine"]
        assert layers.getxattr_at(fd, b"f", "user.mine") == b"m"
        with pytest.raises(OSError) as e:
            layers.listxattr_at(fd, b"absent")
        assert e.value.errno == errno.ENOENT
        names = [f"user.{i:02d}" + "n" * 40 for i in range(30)]   # a list past 1 KiB
        for n in names:
            os.setxattr(d / "f", n, b"")
        assert sorted(layers.listxattr_at(fd, b"f")) == sorted(names + ["user.mine"])
    finally:
        os.close(fd)
