"""Unit tests for overlayfs_py.config: argv / -o parsing and validation (no mount)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from overlayfs_py import config as C
from overlayfs_py.config import Config, ConfigError, InfoRequest, parse_argv, parse_options


@pytest.fixture
def d(tmp_path):
    """A set of ready directories: a, b, c (lowers), u (upper), w (work), m (mountpoint)."""
    class Dirs:
        pass
    dirs = Dirs()
    for name in ("a", "b", "c", "u", "w", "m"):
        p = tmp_path / name
        p.mkdir()
        setattr(dirs, name, str(p))
    dirs.root = str(tmp_path)
    return dirs


def err(argv, *, check=True) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_argv(argv, check=check)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ------------------------------------------------------------------------------------------
# splitting and escapes


def test_split_escaped_basic():
    assert C.split_escaped("a:b:c", ":") == ["a", "b", "c"]
    assert C.split_escaped(r"a\:b:c", ":") == ["a:b", "c"]
    assert C.split_escaped(r"a\,b:c", ":") == ["a,b", "c"]
    assert C.split_escaped(r"a\\:b", ":") == ["a\\", "b"]
    assert C.split_escaped(r"a\xb", ":") == [r"a\xb"]          # other backslashes kept
    assert C.split_escaped("a:", ":") == ["a", ""]
    assert C.split_escaped("x\\", ":") == ["x\\"]              # trailing backslash kept


def test_split_options_empty_items_and_escapes():
    assert C.split_options("a,,b,") == ["a", "b"]
    assert C.split_options(",") == []
    assert C.split_options(r"lowerdir=x\,y:z,rw") == [r"lowerdir=x\,y:z", "rw"]
    assert C.split_options(r"lowerdir=x\:y") == [r"lowerdir=x\:y"]
    assert C.split_options('context="system_u:object_r:c:s0:c1,c2",rw') == [
        'context="system_u:object_r:c:s0:c1,c2"', "rw"]


def test_split_options_unterminated_quote():
    with pytest.raises(ConfigError, match="unterminated quote"):
        C.split_options('context="abc,rw')


def test_parse_options_values_and_override():
    assert parse_options("lowerdir=a:b,upperdir=u,workdir=w,,volatile,") == {
        "lowerdir": "a:b", "upperdir": "u", "workdir": "w", "volatile": None}
    o = parse_options("fsync=1,rw,fsync=0")
    assert o == {"rw": None, "fsync": "0"} and list(o) == ["rw", "fsync"]
    assert parse_options("fsname=a=b") == {"fsname": "a=b"}       # split on the first '='
    with pytest.raises(ConfigError, match="malformed mount option '=x'"):
        parse_options("=x")


def test_parse_lowerdir():
    assert C.parse_lowerdir("a") == ["a"]
    assert C.parse_lowerdir(r"a\:1:b\,2:c") == ["a:1", "b,2", "c"]
    for bad in ("", ":", "a:", ":a", "a::b", None):
        with pytest.raises(ConfigError):
            C.parse_lowerdir(bad)


@pytest.mark.parametrize("text,expected", [
    ("0:100000:65536", ((0, 100000, 65536),)),
    (":0:100000:65536", ((0, 100000, 65536),)),
    ("0:1000:1:1:100000:65536", ((0, 1000, 1), (1, 100000, 65536))),
    (":0:1000:1:1:100000:65536", ((0, 1000, 1), (1, 100000, 65536))),
    ("0:0:4294967296", ((0, 0, 4294967296),)),
])
def test_parse_idmap_ok(text, expected):
    assert C.parse_idmap("uidmapping", text) == expected


@pytest.mark.parametrize("text,why", [
    ("", "empty"),
    (":", "triples"),
    ("0:1000", "triples"),
    ("0:1000:1:2", "triples"),
    ("0::1", "triples"),
    ("a:b:c", "'a' is not a non-negative integer"),
    ("-1:0:1", "'-1' is not"),
    ("\u00b2:0:1", "is not a non-negative integer"),
    ("0:100000:0", "length 0"),
    ("0:4294967295:2", "32-bit"),
    ("0:1000:10:5:2000:10", "overlapping layer-id"),
    ("0:1000:10:100:1005:10", "overlapping mount-id"),
    ("0:1000:1::", "triples"),
])
def test_parse_idmap_bad(text, why):
    with pytest.raises(ConfigError) as ei:
        C.parse_idmap("gidmapping", text)
    assert why in str(ei.value) and "gidmapping" in str(ei.value)


# ------------------------------------------------------------------------------------------
# container-engine command lines


def test_engine_empty_item_volatile(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},,volatile", d.m])
    assert cfg.lowers == (d.a,) and cfg.upper == d.u and cfg.work == d.w
    assert cfg.mountpoint == d.m
    assert cfg.volatile and not cfg.fsync
    assert not cfg.read_only and cfg.writable
    assert not cfg.foreground and not cfg.debug


def test_engine_trailing_comma_three_lowers(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a}:{d.b}:{d.c},upperdir={d.u},workdir={d.w},", d.m])
    assert cfg.lowers == (d.a, d.b, d.c)            # leftmost = top, order kept
    assert cfg.fsync and not cfg.volatile


def test_engine_lower_only_is_read_only(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a}:{d.b}", d.m])
    assert cfg.upper is None and cfg.work is None
    assert cfg.read_only and not cfg.writable
    assert "ro" in cfg.extra_fuse_options


def test_engine_single_lower_only(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a}", d.m])
    assert cfg.lowers == (d.a,) and cfg.read_only


def test_engine_fsync0_volatile(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},fsync=0,volatile", d.m])
    assert not cfg.fsync and cfg.volatile


def test_fsync0_alone(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},fsync=0", d.m])
    assert not cfg.fsync and not cfg.volatile
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},fsync=1", d.m])
    assert cfg.fsync


def test_engine_idmappings(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},"
                      "uidmapping=0:100000:65536,gidmapping=0:100000:65536", d.m])
    assert cfg.uidmap == ((0, 100000, 65536),) and cfg.gidmap == ((0, 100000, 65536),)


def test_engine_idmappings_leading_colon_multi(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},"
                      "uidmapping=:0:1000:1:1:100000:65536,gidmapping=:0:1000:1:1:100000:65536",
                      d.m])
    assert cfg.uidmap == ((0, 1000, 1), (1, 100000, 65536))
    assert cfg.gidmap == cfg.uidmap


def test_version():
    with pytest.raises(InfoRequest) as ei:
        parse_argv(["--version"])
    assert ei.value.text.startswith("overlayfs-py ")
    assert len(ei.value.text.split()) == 2
    with pytest.raises(InfoRequest):
        parse_argv(["-o", "lowerdir=/nonexistent", "/x", "-V"])


def test_help():
    for flag in ("-h", "--help"):
        with pytest.raises(InfoRequest) as ei:
            parse_argv([flag])
        assert "usage:" in ei.value.text and "lowerdir" in ei.value.text


def test_symlinked_lowers_and_relative_paths(d, tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    (links / "L1").symlink_to(d.a)
    (links / "L2").symlink_to(d.b)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = parse_argv(["-o", "lowerdir=../links/L1:../links/L2,upperdir=../u,workdir=../w", "../m"])
    assert cfg.lowers == (os.path.realpath(d.a), os.path.realpath(d.b))
    assert cfg.upper == os.path.realpath(d.u) and cfg.work == os.path.realpath(d.w)
    assert cfg.mountpoint == os.path.realpath(d.m)
    for p in (*cfg.lowers, cfg.upper, cfg.work, cfg.mountpoint):
        assert os.path.isabs(p)


# ------------------------------------------------------------------------------------------
# escapes in paths


def test_escaped_colon_in_lower(tmp_path, d):
    odd = tmp_path / "lay:er"
    odd.mkdir()
    cfg = parse_argv(["-o", f"lowerdir={tmp_path}/lay\\:er:{d.b}", d.m])
    assert cfg.lowers == (str(odd), d.b)


def test_escaped_comma_in_lower_and_upper(tmp_path, d):
    odd = tmp_path / "x,y"
    odd.mkdir()
    up = tmp_path / "up,per"
    up.mkdir()
    cfg = parse_argv(["-o", f"lowerdir={d.a}:{tmp_path}/x\\,y,upperdir={tmp_path}/up\\,per,"
                      f"workdir={d.w},volatile", d.m])
    assert cfg.lowers == (d.a, str(odd))
    assert cfg.upper == str(up)
    assert cfg.volatile


def test_escaped_colon_in_upperdir(tmp_path, d):
    up = tmp_path / "u:2"
    up.mkdir()
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={tmp_path}/u\\:2,workdir={d.w}", d.m])
    assert cfg.upper == str(up)


def test_escaped_backslash(tmp_path, d):
    odd = tmp_path / "back\\"
    odd.mkdir()
    cfg = parse_argv(["-o", f"lowerdir={tmp_path}/back\\\\:{d.a}", d.m])
    assert cfg.lowers == (str(odd), d.a)


# ------------------------------------------------------------------------------------------
# argv forms


def test_mount8_form(d):
    cfg = parse_argv(["overlay", d.m, "-o", f"rw,lowerdir={d.a}:{d.b},upperdir={d.u},"
                      f"workdir={d.w},dev,suid"])
    assert cfg.source == "overlay" and cfg.mountpoint == d.m
    assert cfg.lowers == (d.a, d.b)
    assert cfg.fsname == "overlay"                  # SOURCE becomes the default fsname
    assert not cfg.read_only
    assert {"rw", "dev", "suid"} <= set(cfg.extra_fuse_options)


def test_mount8_form_explicit_fsname_wins(d):
    cfg = parse_argv(["src", d.m, "-o", f"fsname=mine,lowerdir={d.a}"])
    assert cfg.fsname == "mine"
    assert parse_argv(["-o", f"lowerdir={d.a}", d.m]).fsname == "overlayfs-py"


def test_options_after_single_positional(d):
    cfg = parse_argv([d.m, "-o", f"lowerdir={d.a}", "-f"])
    assert cfg.mountpoint == d.m and cfg.foreground and cfg.source is None


def test_multiple_o_merged(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a}", "-o", f"upperdir={d.u},workdir={d.w}",
                      f"-onoatime,lowerdir={d.b}", d.m])
    assert cfg.lowers == (d.b,)                     # a later lowerdir= overrides
    assert cfg.upper == d.u and "noatime" in cfg.extra_fuse_options


def test_long_options_form(d):
    cfg = parse_argv([f"--options=lowerdir={d.a}", "--foreground", d.m])
    assert cfg.lowers == (d.a,) and cfg.foreground


def test_double_dash(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a}", "--", d.m])
    assert cfg.mountpoint == d.m


@pytest.mark.parametrize("flags,fg,dbg", [
    ([], False, False), (["-f"], True, False), (["-d"], True, True),
    (["--debug"], True, True), (["-fd"], True, True), (["-s", "-f"], True, False),
])
def test_foreground_debug(d, flags, fg, dbg):
    cfg = parse_argv([*flags, "-o", f"lowerdir={d.a}", d.m])
    assert (cfg.foreground, cfg.debug) == (fg, dbg)


# ------------------------------------------------------------------------------------------
# flags


def base(d):
    return f"lowerdir={d.a},upperdir={d.u},workdir={d.w}"


@pytest.mark.parametrize("flag", ["rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
                                  "atime", "noatime", "sync", "async", "dirsync"])
def test_fuse_flags_forwarded(d, flag):
    cfg = parse_argv(["-o", f"{base(d)},{flag}", d.m])
    assert flag in cfg.extra_fuse_options


@pytest.mark.parametrize("flag", ["relatime", "strictatime", "nodiratime", "diratime", "lazytime",
                                  "defaults", "auto", "noauto", "_netdev", "nofail", "x-systemd.foo=1",
                                  "context=system_u:object_r:tmp_t:s0",
                                  'context="system_u:object_r:container_file_t:s0:c1,c2"'])
def test_ignored_flags(d, flag):
    cfg = parse_argv(["-o", f"{base(d)},{flag}", d.m])
    assert cfg.extra_fuse_options == ()


def test_flag_groups_last_wins(d):
    cfg = parse_argv(["-o", f"{base(d)},dev,suid,nodev,noatime,atime", d.m])
    assert cfg.extra_fuse_options == ("nodev", "suid", "atime")


def test_ro_with_upper(d):
    cfg = parse_argv(["-o", f"{base(d)},ro", d.m])
    assert cfg.read_only and cfg.upper == d.u and not cfg.writable
    assert "ro" in cfg.extra_fuse_options and "rw" not in cfg.extra_fuse_options
    cfg = parse_argv(["-o", f"{base(d)},ro,rw", d.m])
    assert not cfg.read_only and "rw" in cfg.extra_fuse_options


def test_rw_without_upper_stays_read_only(d):
    cfg = parse_argv(["-o", f"lowerdir={d.a},rw", d.m])
    assert cfg.read_only and "ro" in cfg.extra_fuse_options and "rw" not in cfg.extra_fuse_options


def test_overlay_and_cache_options(d):
    cfg = parse_argv(["-o", f"{base(d)},metacopy=on,redirect_dir=off,index=off,xino=auto,"
                      "timeout=2.5,writeback=0,keep_cache=0,allow_other,default_permissions,"
                      "fsname=myfs,subtype=ovl,max_nodes=5000,spin_us=0", d.m])
    assert cfg.metacopy and cfg.xino == "auto" and cfg.explicit == {"metacopy"}
    assert cfg.timeout == 2.5 and not cfg.writeback and not cfg.keep_cache
    assert cfg.max_nodes == 5000 and cfg.spin_us == 0
    assert cfg.allow_other and cfg.default_permissions and cfg.fsname == "myfs"
    assert "subtype=ovl" in cfg.extra_fuse_options


def test_defaults(d):
    cfg = parse_argv(["-o", base(d), d.m])
    dflt = Config(lowers=(), mountpoint="")
    for f in ("fsync", "volatile", "userxattr", "metacopy", "timeout", "writeback", "keep_cache",
              "max_nodes", "spin_us", "allow_other", "default_permissions", "fsname", "xino", "uidmap", "gidmap"):
        assert getattr(cfg, f) == getattr(dflt, f), f
    assert cfg.extra_fuse_options == ()


def test_misc_values(d):
    cfg = parse_argv(["-o", f"{base(d)},metacopy=off,redirect_dir=nofollow,xino=off,timeout=0,"
                      "writeback=1,keep_cache=1,fsname=a\\,b,allow_root", d.m])
    assert not cfg.metacopy and cfg.xino == "off" and cfg.timeout == 0.0
    assert cfg.writeback and cfg.keep_cache and cfg.fsname == "a,b"
    assert "allow_root" in cfg.extra_fuse_options and not cfg.allow_other


def test_subtype_escaped_for_libfuse(d):
    cfg = parse_argv(["-o", f"{base(d)},subtype=a\\,b", d.m])
    assert cfg.extra_fuse_options == ("subtype=a\\,b",)
    assert C.fuse_escape("x,y\\z") == "x\\,y\\\\z"


def test_check_false_skips_filesystem(tmp_path):
    cfg = parse_argv(["-o", "lowerdir=/no/such:/nor/this,upperdir=/x/u,workdir=/x/w", "/no/mnt"],
                     check=False)
    assert cfg.lowers == ("/no/such", "/nor/this") and cfg.upper == "/x/u"


def test_500_lowers_ok_501_rejected(tmp_path, d):
    root = tmp_path / "many"
    root.mkdir()
    names = []
    for i in range(500):
        (root / str(i)).mkdir()
        names.append(str(root / str(i)))
    cfg = parse_argv(["-o", "lowerdir=" + ":".join(names), d.m])
    assert len(cfg.lowers) == 500
    msg = err(["-o", "lowerdir=" + ":".join(names + [d.a]), d.m])
    assert "too many lower layers (501" in msg and "500" in msg


# ------------------------------------------------------------------------------------------
# malformed input


@pytest.mark.parametrize("opts,needle", [
    ("lowerdir=", "lowerdir= is empty"),
    ("lowerdir=:", "empty layer"),
    ("lowerdir={a}:", "empty layer"),
    ("lowerdir=:{a}", "empty layer"),
    ("lowerdir={a}::{b}", "empty layer"),
    ("lowerdir", "lowerdir= is empty"),
    ("lowerdir={a},fsync=2", "bad value for mount option fsync: '2'"),
    ("lowerdir={a},fsync", "bad value for mount option fsync"),
    ("lowerdir={a},writeback=x", "writeback"),
    ("lowerdir={a},keep_cache=", "keep_cache"),
    ("lowerdir={a},timeout=abc", "timeout"),
    ("lowerdir={a},timeout=-1", "timeout"),
    ("lowerdir={a},max_nodes=-5", "max_nodes"),
    ("lowerdir={a},max_nodes=lots", "max_nodes"),
    ("lowerdir={a},max_nodes", "max_nodes"),
    ("lowerdir={a},spin_us=-1", "spin_us"),
    ("lowerdir={a},spin_us=50us", "spin_us"),
    ("lowerdir={a},timeout=inf", "timeout"),
    ("lowerdir={a},uidmapping=0:1000", "bad uidmapping"),
    ("lowerdir={a},gidmapping=x:1:1", "bad gidmapping"),
    ("lowerdir={a},uidmapping=", "uidmapping= is empty"),
    ("lowerdir={a},redirect_dir=yes", "bad value for mount option redirect_dir: 'yes'"),
    ("lowerdir={a},userxattr,redirect_dir=on", "conflicting options: userxattr,redirect_dir=on"),
    ("lowerdir={a},userxattr,redirect_dir=follow", "conflicting options: userxattr"),
    ("lowerdir={a},index=yes", "bad value for mount option index: 'yes'"),
    ("lowerdir={a},index", "bad value for mount option index"),
    ("lowerdir={a},userxattr,metacopy=on", "conflicting options: userxattr,metacopy=on"),
    ("lowerdir={a},xino=on", "xino=on is not supported"),
    ("lowerdir={a},metacopy=maybe", "metacopy"),
    ("lowerdir={a},foo", "unknown mount option 'foo'"),
    ("lowerdir={a},foo=bar", "unknown mount option 'foo=bar'"),
    ("lowerdir={a},max_read=4096", "unknown mount option 'max_read=4096'"),
    ("lowerdir={a},volatile=1", "'volatile' takes no value"),
    ("lowerdir={a},noatime=1", "'noatime' takes no value"),
    ("lowerdir={a},upperdir=,workdir={w}", "upperdir= needs a value"),
    ("lowerdir={a},fsname=", "fsname= needs a value"),
    ("lowerdir={a},=x", "malformed mount option '=x'"),
    ("lowerdir={a},allow_other,allow_root", "mutually exclusive"),
    ("upperdir={u},workdir={w}", "no lowerdir given"),
    ("rw", "no lowerdir given"),
])
def test_malformed_options(d, opts, needle):
    msg = err(["-o", opts.format(a=d.a, b=d.b, u=d.u, w=d.w), d.m])
    assert needle in msg


def test_unknown_option_message_exact(d):
    assert err(["-o", f"lowerdir={d.a},foo", d.m]) == "unknown mount option 'foo'"


@pytest.mark.parametrize("argv,needle", [
    (["-o", "lowerdir=/x"], "missing mountpoint"),
    ([], "missing mountpoint"),
    (["-o", "lowerdir=/x", "a", "b", "c"], "too many arguments"),
    (["-x", "-o", "lowerdir=/x", "m"], "unknown command-line option '-x'"),
    (["--frobnicate", "m"], "unknown command-line option '--frobnicate'"),
    (["m", "-o"], "option -o needs an argument"),
    (["-o", "lowerdir=/x", ""], "the mountpoint argument is empty"),
])
def test_bad_argv(argv, needle):
    assert needle in err(argv, check=False)


# ------------------------------------------------------------------------------------------
# validation against the filesystem


def test_missing_lower_named(d):
    msg = err(["-o", f"lowerdir={d.a}:{d.root}/nope:{d.b}", d.m])
    assert msg == f"lower layer '{d.root}/nope' does not exist"


def test_lower_not_a_directory(d):
    f = Path(d.root, "file")
    f.write_text("x")
    msg = err(["-o", f"lowerdir={d.a}:{f}", d.m])
    assert msg == f"lower layer '{f}' is not a directory"


def test_dangling_symlink_lower(d):
    link = Path(d.root, "dangling")
    link.symlink_to(Path(d.root, "gone"))
    assert "does not exist" in err(["-o", f"lowerdir={link}", d.m])


def test_lower_shown_as_given(d, monkeypatch):
    monkeypatch.chdir(d.root)
    assert err(["-o", "lowerdir=a:missing", d.m]) == "lower layer 'missing' does not exist"


def test_upper_missing(d):
    msg = err(["-o", f"lowerdir={d.a},upperdir={d.root}/nu,workdir={d.w}", d.m])
    assert msg == f"upperdir '{d.root}/nu' does not exist"


def test_upper_not_dir(d):
    f = Path(d.root, "ufile")
    f.write_text("")
    assert "upperdir" in err(["-o", f"lowerdir={d.a},upperdir={f},workdir={d.w}", d.m])
    assert "is not a directory" in err(["-o", f"lowerdir={d.a},upperdir={f},workdir={d.w}", d.m])


def test_work_missing_and_not_dir(d):
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.root}/nw", d.m]) == \
        f"workdir '{d.root}/nw' does not exist"
    f = Path(d.root, "wfile")
    f.write_text("")
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={f}", d.m]) == \
        f"workdir '{f}' is not a directory"


def _make_unwritable(path: str):
    """Return an undo callable, or skip when the directory cannot be made unwritable."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    pytest.skip("as root, unwritable dirs need a read-only bind mount (covered in test_cli)")


def test_upper_not_writable_nonroot(d):
    undo = _make_unwritable(d.u)
    try:
        assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m]) == \
            f"upperdir '{d.u}' is not writable"
    finally:
        undo()


def test_upper_not_writable_simulated(d, monkeypatch):
    # Root can write anywhere on a rw fs; simulate access(W_OK) failing for the upper only.
    real_access = os.access
    monkeypatch.setattr(C.os, "access",
                        lambda p, m, **kw: False if (p == d.u and m & os.W_OK) else real_access(p, m))
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m]) == \
        f"upperdir '{d.u}' is not writable"
    # with 'ro' the upper is never written, so it need not be writable
    cfg = parse_argv(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w},ro", d.m])
    assert cfg.read_only


def test_work_not_writable_simulated(d, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(C.os, "access",
                        lambda p, m, **kw: False if (p == d.w and m & os.W_OK) else real_access(p, m))
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m]) == \
        f"workdir '{d.w}' is not writable"


def test_work_on_other_filesystem(d):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(d.u).st_dev:
        pytest.skip("no second filesystem (/dev/shm) available")
    w = tempfile.mkdtemp(dir=shm)
    try:
        msg = err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={w}", d.m])
        assert msg == f"workdir '{w}' is not on the same filesystem as upperdir '{d.u}'"
    finally:
        os.rmdir(w)


def test_upper_equals_work(d):
    msg = err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.u}", d.m])
    assert "upperdir and workdir are the same directory" in msg


def test_upper_equals_work_via_symlink(d):
    link = Path(d.root, "ulink")
    link.symlink_to(d.u)
    assert "same directory" in err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={link}", d.m])


def test_work_inside_upper(d):
    inner = Path(d.u, "work")
    inner.mkdir()
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={inner}", d.m]) == \
        f"workdir '{inner}' is inside upperdir '{d.u}'"


def test_upper_inside_work(d):
    inner = Path(d.w, "up")
    inner.mkdir()
    assert err(["-o", f"lowerdir={d.a},upperdir={inner},workdir={d.w}", d.m]) == \
        f"upperdir '{inner}' is inside workdir '{d.w}'"


def test_sibling_prefix_is_not_nested(tmp_path):
    # /x/up and /x/up2 share a string prefix but are not nested
    for n in ("lo", "up", "up2", "mnt"):
        (tmp_path / n).mkdir()
    cfg = parse_argv(["-o", f"lowerdir={tmp_path}/lo,upperdir={tmp_path}/up,workdir={tmp_path}/up2",
                      f"{tmp_path}/mnt"])
    assert cfg.work == f"{tmp_path}/up2"
    cfg = parse_argv(["-o", f"lowerdir={tmp_path}/up2,upperdir={tmp_path}/up,workdir={tmp_path}/lo",
                      f"{tmp_path}/mnt"])
    assert cfg.lowers == (f"{tmp_path}/up2",)


def test_upper_inside_lower(d):
    inner = Path(d.b, "up")
    inner.mkdir()
    assert err(["-o", f"lowerdir={d.a}:{d.b},upperdir={inner},workdir={d.w}", d.m]) == \
        f"upperdir '{inner}' is inside lower layer '{d.b}'"


def test_lower_inside_upper(d):
    inner = Path(d.u, "lo")
    inner.mkdir()
    assert err(["-o", f"lowerdir={d.a}:{inner},upperdir={d.u},workdir={d.w}", d.m]) == \
        f"lower layer '{inner}' is inside upperdir '{d.u}'"


def test_upper_is_a_lower(d):
    assert "inside lower layer" in err(["-o", f"lowerdir={d.u},upperdir={d.u},workdir={d.w}", d.m])


def test_lower_inside_upper_via_symlink(d):
    inner = Path(d.u, "lo")
    inner.mkdir()
    link = Path(d.root, "innerlink")
    link.symlink_to(inner)
    assert "is inside upperdir" in err(["-o", f"lowerdir={link},upperdir={d.u},workdir={d.w}", d.m])


def test_work_inside_lower(d):
    inner = Path(d.a, "w")
    inner.mkdir()
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={inner}", d.m]) == \
        f"workdir '{inner}' is inside lower layer '{d.a}'"


def test_workdir_without_upper(d):
    assert err(["-o", f"lowerdir={d.a},workdir={d.w}", d.m]) == "workdir given without upperdir"


def test_upper_without_workdir(d):
    assert err(["-o", f"lowerdir={d.a},upperdir={d.u}", d.m]) == "upperdir given without workdir"


def test_mountpoint_missing(d):
    assert err(["-o", f"lowerdir={d.a}", f"{d.root}/nomnt"]) == \
        f"mountpoint '{d.root}/nomnt' does not exist"


def test_mountpoint_not_dir(d):
    f = Path(d.root, "mfile")
    f.write_text("")
    assert err(["-o", f"lowerdir={d.a}", str(f)]) == f"mountpoint '{f}' is not a directory"


def test_mountpoint_already_mounted(d):
    existing = next((p for p in ("/proc", "/sys", "/dev") if os.path.ismount(p)), None)
    if existing is None:
        pytest.skip("no existing mount point to test against")
    assert err(["-o", f"lowerdir={d.a}", existing]) == f"mountpoint '{existing}' is already a mountpoint"


def test_mount_points_parser_sees_root_and_proc():
    mps = C._mount_points()
    assert "/" in mps
    assert "/proc" in mps or not os.path.ismount("/proc")


def test_mountinfo_octal_unescape(tmp_path, monkeypatch):
    fake = tmp_path / "mountinfo"
    fake.write_bytes(b"36 35 98:0 / /mnt/with\\040space rw - ext3 /dev/root rw\n"
                     b"37 35 98:0 / /mnt/tab\\011x rw - ext3 /dev/root rw\n")
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/self/mountinfo":
            return real_open(fake, *a, **kw)
        return real_open(path, *a, **kw)
    monkeypatch.setattr("builtins.open", fake_open)
    assert C._mount_points() == {"/mnt/with space", "/mnt/tab\tx"}


def test_errors_are_single_lines_with_newline_free_input(d):
    # every error above goes through err(), which asserts one line; spot-check ordering:
    # the first missing lower is named, not a later one
    msg = err(["-o", f"lowerdir={d.root}/first:{d.root}/second", d.m])
    assert "first" in msg and "second" not in msg


def test_exact_mount_fuse3_line(d):
    # What mount.fuse3 (libfuse 3.14) really runs for
    #   mount -t fuse.overlayfs-py overlay M -o lowerdir=A:B,dev,suid,noatime,nofail,x-foo=1,rw
    # as root: it drops nofail, keeps x-*, and appends dev,suid.
    cfg = parse_argv(["overlay", d.m, "-o",
                      f"lowerdir={d.a}:{d.b},dev,suid,noatime,x-foo=1,rw,dev,suid"])
    assert cfg.source == "overlay" and cfg.lowers == (d.a, d.b) and cfg.read_only
    assert set(cfg.extra_fuse_options) == {"dev", "suid", "noatime", "ro"}
    cfg = parse_argv(["overlay", d.m, "-o",
                      f"ro,lowerdir={d.a},upperdir={d.u},workdir={d.w},dev,suid"])
    assert cfg.read_only and cfg.upper == d.u


def test_index_option(d):
    """index=on|off, default off (Debian's kernel); as the kernel's params.c, index=on is
    ignored without an upper layer (and with ro: no index dir), and kept with userxattr
    (the kernel 6.18 here mounts userxattr,index=on and writes user.overlay.* handles)."""
    assert not parse_argv(["-o", base(d), d.m]).index
    assert parse_argv(["-o", f"{base(d)},index=on", d.m]).index
    assert not parse_argv(["-o", f"{base(d)},index=on,index=off", d.m]).index
    assert parse_argv(["-o", f"{base(d)},index=on,userxattr", d.m]).index
    assert not parse_argv(["-o", f"lowerdir={d.a},index=on", d.m]).index
    assert not parse_argv(["-o", f"{base(d)},index=on,ro", d.m]).index
