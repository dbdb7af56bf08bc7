"""The mount's configuration: one frozen dataclass, built by parse_argv().

Everything the daemon needs to know is in Config; nothing else reads argv.

Command line (same as fuse-overlayfs, plus the mount(8)/mount.fuse3 form):

    overlayfs-py [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W][,opts] MOUNTPOINT
    overlayfs-py SOURCE MOUNTPOINT -o rw,lowerdir=...,upperdir=...,workdir=...

Escapes inside option values: ``\\,`` is a literal comma, ``\\:`` a literal colon
(so a layer path may contain both), ``\\\\`` a literal backslash. Any other
backslash is kept as is.

Every path is resolved at parse time to an absolute real path (relative paths
against the current directory, symlinks followed), because the daemon chdirs
to "/" and container engines pass symlinks to their layer directories.
"""
from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

# One triple per range, in fuse-overlayfs order: (id in the layers, id shown in the mount, length);
# e.g. uidmapping=0:1000:1 shows files owned by uid 0 in the layers as owned by uid 1000.
IdMap = Tuple[Tuple[int, int, int], ...]

MAX_LOWERS = 500            # the kernel's OVL_MAX_STACK
PROG = "overlayfs-py"

USAGE = f"""\
usage: {PROG} [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=UPPER,workdir=WORK][,OPTIONS] MOUNTPOINT
       {PROG} SOURCE MOUNTPOINT -o OPTIONS      (mount(8) / mount.fuse3 form; SOURCE = default fsname)

  -o OPTIONS       comma-separated mount options (may be given several times)
  -f               stay in the foreground
  -d, --debug      log every request to stderr (implies -f)
  -s               accepted for compatibility (always single-threaded)
  -V, --version    print the version and exit
  -h, --help       print this help and exit

Layer options:
  lowerdir=A:B:C   read-only layers, leftmost on top (\\: and \\, escape ':' and ',')
  upperdir=DIR     writable layer; without it the mount is read-only
  workdir=DIR      empty scratch dir on the same filesystem as upperdir
Overlay options:
  volatile         never fsync the upper layer (same as fsync=0)
  fsync=0|1        forward fsync to the upper layer (default 1)
  userxattr        use user.overlay.* instead of trusted.overlay.* xattrs
  uidmapping=LAYER:MOUNT:LEN[:LAYER:MOUNT:LEN...], gidmapping=...
                   id mapping, as fuse-overlayfs (layer id LAYER+i appears as MOUNT+i)
  metacopy=on|off, xino=off|auto
  index=on|off     on: hard links of a lower file stay one file after copy-up
                   (the kernel's inodes index in workdir/index; default off)
  redirect_dir=on|follow|nofollow|off
                   renaming a lower or merged directory records an overlay.redirect
                   (on), or EXDEV; redirects are followed with on and follow; off is
                   follow or nofollow as the kernel's redirect_always_follow says
Caching options:
  timeout=SECONDS  kernel entry/attribute cache timeout (default 86400)
  writeback=0|1    FUSE writeback cache (default 1, unless passthrough is on)
  keep_cache=0|1   keep page cache of unchanged files across opens (default 1)
  exact_ctime=0|1  with the writeback cache, have the kernel drop a changed file's inode
                   so that stat shows the upper file's ctime (default 0; see README)
  max_nodes=N      past N nodes, have the kernel forget unused files, bounding the
                   daemon's memory (default 0 = never; see README for the trade-offs)
  spin_us=N        after a reply, poll for the next request for up to N microseconds
                   before sleeping (default 50; 0 = never; off on a single CPU)
  passthrough=auto|on|off
                   FUSE passthrough: the kernel does file I/O on upper files directly
                   (default auto: where the kernel allows it; on: or fail the mount)
FUSE / mount options:
  allow_other, allow_root, default_permissions, fsname=NAME, subtype=NAME,
  rw, ro, dev, nodev, suid, nosuid, exec, noexec, sync, async, dirsync
  relatime (default), strictatime, noatime (and atime, norelatime, nostrictatime):
                   when a read updates a file's atime, as on the kernel overlay
  (diratime, nodiratime, lazytime, context=... are accepted and ignored)

Container images (each with --help):
  {PROG} image mount SOURCE[:TAG] MOUNTPOINT [--upper DIR --work DIR] [-o OPTIONS]
  {PROG} image unpack|history SOURCE[:TAG]
  {PROG} diff UPPER [--image SOURCE[:TAG]]
  {PROG} commit UPPER --to LAYOUT[:TAG] [--from SOURCE[:TAG]]
"""


class ConfigError(Exception):
    """Bad input from the user. The CLI prints str(e) on one line and exits 1."""


class InfoRequest(Exception):
    """--version or --help: the CLI prints .text on stdout and exits 0."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


@dataclass(frozen=True)
class Config:
    lowers: Tuple[str, ...]              # absolute real paths, top layer first
    mountpoint: str                      # absolute path
    upper: Optional[str] = None          # None -> read-only mount
    work: Optional[str] = None
    foreground: bool = False
    debug: bool = False
    fsync: bool = True                   # False with fsync=0 or volatile
    volatile: bool = False
    read_only: bool = False              # 'ro' given, or no upperdir
    uidmap: IdMap = ()
    gidmap: IdMap = ()
    allow_other: bool = False
    default_permissions: bool = True
    fsname: str = "overlayfs-py"
    metacopy: bool = False
    index: bool = False                  # inodes index (index=on; needs an upper layer)
    userxattr: bool = False              # use user.overlay.* instead of trusted.overlay.*
    timeout: float = 86400.0             # entry/attr cache timeout, seconds
    max_nodes: int = 0                   # node table size that starts trimming; 0 = off
    spin_us: int = 50                    # busy-poll for the next request; 0 = off
    writeback: bool = True               # FUSE writeback cache (if no passthrough)
    writeback_explicit: bool = False     # writeback= was given
    passthrough: str = "auto"            # FUSE passthrough: auto, on or off
    keep_cache: bool = True              # keep page cache across opens of unchanged files
    extra_fuse_options: Tuple[str, ...] = field(default_factory=tuple)  # dev,suid,noatime...
    xino: str = "off"                    # 'off' or 'auto' (accepted; st_ino policy hint)
    redirect_dir: str = "follow"         # 'on', 'follow' or 'nofollow' ('off' resolved)
    atime: str = "relatime"              # 'relatime', 'strictatime' or 'noatime'
    exact_ctime: bool = False            # entry invalidations after changes (README)
    source: Optional[str] = None         # SOURCE of the mount(8) form (only used as fsname)
    explicit: FrozenSet[str] = frozenset()  # 'redirect_dir' (on|follow), 'metacopy' (on) given

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.read_only

    @property
    def redirect_create(self) -> bool:
        """Renaming a lower or merged directory records an overlay.redirect (else EXDEV)."""
        return self.redirect_dir == "on"

    @property
    def redirect_follow(self) -> bool:
        return self.redirect_dir in ("on", "follow")


REDIRECT_ALWAYS_FOLLOW = "/sys/module/overlay/parameters/redirect_always_follow"


def resolve_redirect_dir(value: str) -> str:
    """``off`` means what it means for the kernel overlay here: ``follow`` when the overlay
    module's redirect_always_follow is set (its Kconfig default, and where the module
    cannot be asked), else ``nofollow``."""
    if value != "off":
        return value
    try:
        with open(REDIRECT_ALWAYS_FOLLOW) as f:
            return "follow" if f.read().strip() in ("Y", "y", "1") else "nofollow"
    except OSError:
        return "follow"


# --------------------------------------------------------------------------------------------
# Splitting with escapes


def split_escaped(s: str, sep: str) -> List[str]:
    """Split `s` on every `sep` not preceded by a backslash, and unescape the pieces.

    ``\\:``, ``\\,`` and ``\\\\`` become ``:``, ``,`` and ``\\`` (as does ``\\<sep>``);
    any other backslash is kept literally.
    """
    parts: List[str] = []
    cur: List[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and (s[i + 1] == sep or s[i + 1] in ",:\\"):
            cur.append(s[i + 1])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape_path(s: str) -> str:
    """Undo \\: \\, \\\\ escapes in a single path value."""
    return split_escaped(s, "\0")[0] if "\\" in s else s


def fuse_escape(value: str) -> str:
    """Escape a value for one pyfuse3/libfuse '-o key=value' string (libfuse splits on ',')."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


_QUOTED_KEYS = ("context=", "fscontext=", "defcontext=", "rootcontext=")


def split_options(s: str) -> List[str]:
    """Split one -o string into items on unescaped commas.

    Empty items (``a,,b`` or a trailing comma) are dropped. ``\\,`` stays escaped
    inside the item (as ``\\,`` is turned into ``,`` here, but ``\\:``/``\\\\`` are
    kept for the value parser). SELinux ``context="a,b"`` values may contain
    commas inside double quotes, as podman writes them.
    """
    items: List[str] = []
    cur: List[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n:
            nxt = s[i + 1]
            if nxt == ",":
                # keep it escaped: the value parser turns "\," into ","
                cur.append("\\,")
            else:
                cur.append(c + nxt)
            i += 2
            continue
        if c == '"' and "".join(cur) in _QUOTED_KEYS:
            end = s.find('"', i + 1)
            if end < 0:
                raise ConfigError(f"unterminated quote in mount option '{''.join(cur)}{s[i:]}'")
            cur.append(s[i:end + 1])
            i = end + 1
            continue
        if c == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [it for it in items if it != ""]


def parse_options(s: str) -> Dict[str, Optional[str]]:
    """Parse one -o string into an ordered {key: value-or-None} dict.

    Values are returned still escaped (``\\:`` etc.), so lowerdir can be split on
    unescaped colons afterwards; later keys override earlier ones.
    """
    out: Dict[str, Optional[str]] = {}
    for item in split_options(s):
        key, eq, value = item.partition("=")
        if key == "":
            raise ConfigError(f"malformed mount option '{item}'")
        # A repeated key overrides: move it to the end so order reflects the last use.
        out.pop(key, None)
        out[key] = value if eq else None
    return out


# --------------------------------------------------------------------------------------------
# Value parsers


def _bool01(key: str, value: Optional[str]) -> bool:
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"bad value for mount option {key}: {_show(value)} (expected 0 or 1)")


def _show(value: Optional[str]) -> str:
    return "(none)" if value is None else f"'{value}'"


def parse_lowerdir(value: Optional[str]) -> List[str]:
    """lowerdir value -> list of (unescaped, unresolved) paths, top first."""
    if value is None or value == "":
        raise ConfigError("lowerdir= is empty: give at least one lower layer")
    parts = split_escaped(value, ":")
    for p in parts:
        if p == "":
            raise ConfigError(f"empty layer in lowerdir='{value}' "
                              "(use \\: for a ':' inside a path; data-only layers '::' are not supported)")
    return parts


def parse_idmap(key: str, value: Optional[str]) -> IdMap:
    """'0:100000:65536[:LAYER:MOUNT:LEN...]' (optional leading ':') -> ((0, 100000, 65536), ...)."""
    if not value:
        raise ConfigError(f"{key}= is empty (expected LAYER:MOUNT:LENGTH)")
    text = value[1:] if value.startswith(":") else value
    fields = text.split(":")
    if len(fields) % 3 != 0 or any(f == "" for f in fields):
        raise ConfigError(f"bad {key} '{value}': expected LAYER:MOUNT:LENGTH triples")
    nums = []
    for f in fields:
        if not (f.isascii() and f.isdigit()):
            raise ConfigError(f"bad {key} '{value}': '{f}' is not a non-negative integer")
        nums.append(int(f))
    triples = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    limit = 1 << 32
    for inside, outside, length in triples:
        if length == 0:
            raise ConfigError(f"bad {key} '{value}': a range has length 0")
        if inside + length > limit or outside + length > limit:
            raise ConfigError(f"bad {key} '{value}': range exceeds 32-bit ids")
    for side, name in ((0, "layer-id"), (1, "mount-id")):
        spans = sorted((t[side], t[side] + t[2]) for t in triples)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ConfigError(f"bad {key} '{value}': overlapping {name} ranges")
    return triples


def _parse_timeout(value: Optional[str]) -> float:
    try:
        t = float(value) if value is not None else math.nan
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t < 0:
        raise ConfigError(f"bad value for mount option timeout: {_show(value)} "
                          "(expected a number of seconds >= 0)")
    return t


# FUSE/kernel mount flags we forward to pyfuse3.init(). Each belongs to a group in which
# the last one given wins (e.g. 'dev' then 'nodev' -> 'nodev').
_FUSE_FLAGS = {
    "rw": "ro", "ro": "ro",
    "dev": "dev", "nodev": "dev",
    "suid": "suid", "nosuid": "suid",
    "exec": "exec", "noexec": "exec",
    "atime": "atime", "noatime": "atime",
    "sync": "sync", "async": "sync",
    "dirsync": "dirsync",
}
# Accepted and ignored: libfuse rejects them (relatime is FUSE's default anyway), or they
# are mount(8)/mount.fuse userspace options, or SELinux labels FUSE cannot apply.
_IGNORED_FLAGS = {
    "diratime", "nodiratime", "lazytime", "nolazytime", "defaults", "auto", "noauto", "user", "nouser", "users",
    "_netdev", "nofail", "silent", "loud",
}
_IGNORED_KEYS = {"context", "fscontext", "defcontext", "rootcontext"}

ACCEPTED_OPTIONS = tuple(sorted(
    set(_FUSE_FLAGS) | _IGNORED_FLAGS | {f"{k}=" for k in _IGNORED_KEYS} | {
        "lowerdir=", "upperdir=", "workdir=", "volatile", "fsync=", "userxattr", "metacopy=",
        "redirect_dir=", "index=", "xino=", "timeout=", "writeback=", "keep_cache=",
        "max_nodes=", "spin_us=", "passthrough=", "exact_ctime=", "relatime", "norelatime", "strictatime", "nostrictatime",
        "uidmapping=", "gidmapping=", "allow_other", "allow_root", "default_permissions",
        "fsname=", "subtype=", "x-*",
    }))


# --------------------------------------------------------------------------------------------
# argv


def _split_argv(argv: Sequence[str]):
    """argv -> (list of -o strings, flags dict, positionals). Raises InfoRequest/ConfigError."""
    opts: List[str] = []
    flags = {"foreground": False, "debug": False}
    positionals: List[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            positionals.extend(argv[i:])
            break
        if a in ("-h", "--help"):
            raise InfoRequest(USAGE)
        if a in ("-V", "--version"):
            raise InfoRequest(f"{PROG} {_version()}")
        if a in ("-d", "--debug"):
            flags["debug"] = flags["foreground"] = True
            continue
        if a in ("-f", "--foreground"):
            flags["foreground"] = True
            continue
        if a == "-s":
            continue
        if a == "-o" or a == "--options":
            if i >= len(argv):
                raise ConfigError(f"option {a} needs an argument")
            opts.append(argv[i])
            i += 1
            continue
        if a.startswith("--options="):
            opts.append(a[len("--options="):])
            continue
        if a.startswith("-o"):
            opts.append(a[2:])
            continue
        if a.startswith("-") and len(a) > 1 and not a.startswith("--") and set(a[1:]) <= set("fds"):
            # combined short flags, e.g. -fd
            for ch in a[1:]:
                if ch == "d":
                    flags["debug"] = flags["foreground"] = True
                elif ch == "f":
                    flags["foreground"] = True
            continue
        if a.startswith("-") and a != "-":
            raise ConfigError(f"unknown command-line option '{a}' (see --help)")
        positionals.append(a)
    return opts, flags, positionals


def _version() -> str:
    try:
        from overlayfs_py import __version__  # type: ignore[attr-defined]
        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        return version("overlayfs-py")
    except Exception:
        return "unknown"


def parse_argv(argv: Sequence[str], *, check: bool = True) -> Config:
    """Turn a command line (without argv[0]) into a validated Config.

    Raises ConfigError (one line, naming the problem) for bad input and InfoRequest
    for --help/--version. With check=False the filesystem is not inspected (paths are
    still made absolute/real); used by tests and tools that only need the parsing.
    """
    opt_strings, flags, positionals = _split_argv(argv)

    merged: Dict[str, Optional[str]] = {}
    for s in opt_strings:
        for k, v in parse_options(s).items():
            merged.pop(k, None)
            merged[k] = v

    if not positionals:
        raise ConfigError("missing mountpoint (see --help)")
    if len(positionals) > 2:
        raise ConfigError(f"too many arguments: {' '.join(positionals)} "
                          "(expected [SOURCE] MOUNTPOINT)")
    source = positionals[0] if len(positionals) == 2 else None
    mountpoint_arg = positionals[-1]
    if mountpoint_arg == "":
        raise ConfigError("the mountpoint argument is empty")

    kw: Dict[str, object] = {}
    fuse_flags: Dict[str, str] = {}      # group -> flag (last wins)
    extra: List[str] = []
    lowers_raw: Optional[List[str]] = None
    upper_raw: Optional[str] = None
    work_raw: Optional[str] = None
    read_only_flag = False
    atime_flags = {"noatime": False, "strictatime": False}   # as mount(8) sets MS_* flags

    def need_value(key: str, value: Optional[str]) -> str:
        if value is None or value == "":
            raise ConfigError(f"mount option {key}= needs a value")
        return value

    def no_value(key: str, value: Optional[str]) -> None:
        if value is not None:
            raise ConfigError(f"mount option '{key}' takes no value (got '{key}={value}')")

    for key, value in merged.items():
        if key == "lowerdir":
            lowers_raw = parse_lowerdir(value)
        elif key == "upperdir":
            upper_raw = unescape_path(need_value(key, value))
        elif key == "workdir":
            work_raw = unescape_path(need_value(key, value))
        elif key == "volatile":
            no_value(key, value)
            kw["volatile"] = True
        elif key == "fsync":
            kw["fsync"] = _bool01(key, value)
        elif key == "userxattr":
            no_value(key, value)
            kw["userxattr"] = True
        elif key == "metacopy":
            if value not in ("on", "off"):
                raise ConfigError(f"bad value for mount option metacopy: {_show(value)} (expected on or off)")
            kw["metacopy"] = value == "on"
        elif key == "redirect_dir":
            if value not in ("on", "follow", "nofollow", "off"):
                raise ConfigError(f"bad value for mount option redirect_dir: {_show(value)} "
                                  "(expected on, follow, nofollow or off)")
            kw["redirect_dir"] = value
        elif key == "index":
            if value not in ("on", "off"):
                raise ConfigError(f"bad value for mount option index: {_show(value)} "
                                  "(expected on or off)")
            kw["index"] = value == "on"
        elif key == "xino":
            if value not in ("off", "auto"):
                raise ConfigError(f"xino={value or ''} is not supported (only off or auto)")
            kw["xino"] = value
        elif key == "timeout":
            kw["timeout"] = _parse_timeout(value)
        elif key in ("max_nodes", "spin_us"):
            if value is None or not value.isdigit():
                raise ConfigError(f"bad value for mount option {key}: {_show(value)} "
                                  "(expected a whole number >= 0)")
            kw[key] = int(value)
        elif key == "writeback":
            kw["writeback"] = _bool01(key, value)
            kw["writeback_explicit"] = True
        elif key == "passthrough":
            if value not in ("auto", "on", "off"):
                raise ConfigError(f"bad value for mount option passthrough: {_show(value)} "
                                  "(expected auto, on or off)")
            kw["passthrough"] = value
        elif key == "keep_cache":
            kw["keep_cache"] = _bool01(key, value)
        elif key == "exact_ctime":
            kw["exact_ctime"] = _bool01(key, value)
        elif key == "uidmapping":
            kw["uidmap"] = parse_idmap(key, value)
        elif key == "gidmapping":
            kw["gidmap"] = parse_idmap(key, value)
        elif key == "allow_other":
            no_value(key, value)
            kw["allow_other"] = True
        elif key == "allow_root":
            no_value(key, value)
            fuse_flags["allow"] = "allow_root"
        elif key == "default_permissions":
            no_value(key, value)
            kw["default_permissions"] = True
        elif key == "fsname":
            kw["fsname"] = unescape_path(need_value(key, value))
        elif key == "subtype":
            fuse_flags["subtype"] = "subtype=" + fuse_escape(unescape_path(need_value(key, value)))
        elif key in ("relatime", "norelatime", "strictatime", "nostrictatime"):
            no_value(key, value)
            if key.endswith("strictatime"):
                atime_flags["strictatime"] = key == "strictatime"
        elif key in _FUSE_FLAGS:
            no_value(key, value)
            fuse_flags[_FUSE_FLAGS[key]] = key
            if key in ("ro", "rw"):
                read_only_flag = key == "ro"
            if key in ("atime", "noatime"):
                atime_flags["noatime"] = key == "noatime"
        elif key in _IGNORED_FLAGS:
            no_value(key, value)
        elif key in _IGNORED_KEYS or key.startswith("x-"):
            pass
        else:
            shown = key if value is None else f"{key}={value}"
            raise ConfigError(f"unknown mount option '{shown}'")

    if lowers_raw is None:
        raise ConfigError("no lowerdir given (use -o lowerdir=DIR[:DIR...])")
    if len(lowers_raw) > MAX_LOWERS:
        raise ConfigError(f"too many lower layers ({len(lowers_raw)}, the limit is {MAX_LOWERS})")
    if work_raw is not None and upper_raw is None:
        raise ConfigError("workdir given without upperdir")
    if upper_raw is not None and work_raw is None:
        raise ConfigError("upperdir given without workdir")

    if kw.get("volatile"):
        kw["fsync"] = False
    # the kernel's params.c: userxattr takes no redirects (an unprivileged user could set
    # them) and forces nofollow; asking for more is an error (off, which the kernel refuses
    # too, is taken as nofollow: option strings written for fuse-overlayfs carry it)
    if kw.get("userxattr"):
        if kw.get("redirect_dir", "nofollow") not in ("nofollow", "off"):
            raise ConfigError(f"conflicting options: userxattr,redirect_dir={kw['redirect_dir']}")
        if kw.get("metacopy"):
            raise ConfigError("conflicting options: userxattr,metacopy=on")
        kw["redirect_dir"] = "nofollow"
    # a mount that turns out to need the user forms (xattrform) falls back from defaults only
    kw["explicit"] = frozenset(
        (["redirect_dir"] if merged.get("redirect_dir") in ("on", "follow") else []) +
        (["metacopy"] if merged.get("metacopy") == "on" else []))
    kw["redirect_dir"] = resolve_redirect_dir(kw.get("redirect_dir", "off"))
    if source and "fsname" not in kw:
        kw["fsname"] = source            # mount(8) form: show SOURCE in /proc/mounts, as FUSE does
    if kw.get("allow_other") and fuse_flags.get("allow") == "allow_root":
        raise ConfigError("allow_other and allow_root are mutually exclusive")
    if kw.get("passthrough") == "on" and kw.get("writeback_explicit") and kw.get("writeback"):
        raise ConfigError("passthrough=on and writeback=1 exclude each other (the kernel "
                          "has no writeback cache on a passthrough connection)")

    # the kernel's do_new_mount: strictatime beats noatime, which beats relatime
    kw["atime"] = "strictatime" if atime_flags["strictatime"] else \
        "noatime" if atime_flags["noatime"] else "relatime"
    read_only = read_only_flag or upper_raw is None
    # the kernel's params.c: "index=on" is useless in a non-upper mount, and ignored; a
    # read-only one makes no index dir either (ovl_fill_super)
    if read_only:
        kw["index"] = False
    if read_only:
        fuse_flags["ro"] = "ro"
    extra.extend(fuse_flags.values())

    lowers = tuple(_resolve(p) for p in lowers_raw)
    upper = _resolve(upper_raw) if upper_raw is not None else None
    work = _resolve(work_raw) if work_raw is not None else None
    mountpoint = _resolve(mountpoint_arg)

    cfg = Config(
        lowers=lowers, mountpoint=mountpoint, upper=upper, work=work,
        foreground=flags["foreground"], debug=flags["debug"], read_only=read_only,
        extra_fuse_options=tuple(extra), source=source, **kw)  # type: ignore[arg-type]
    if check:
        validate(cfg, lowers_raw=lowers_raw, upper_raw=upper_raw, work_raw=work_raw,
                 mountpoint_raw=mountpoint_arg)
    return cfg


def _resolve(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


# --------------------------------------------------------------------------------------------
# Validation


def _check_dir(what: str, shown: str, path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} '{shown}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} '{shown}' is not usable: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} '{shown}' is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{what} '{shown}' is not readable")
    return st


def _inside(child: str, parent: str) -> bool:
    """True if real path `child` is `parent` or below it."""
    if parent == "/":
        return True
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _mount_points() -> set:
    """Every mount point listed in /proc/self/mountinfo (octal escapes decoded)."""
    out = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if len(fields) > 4:
                    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                    out.add(os.fsdecode(raw))
    except OSError:
        pass
    return out


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path) or path in _mount_points()


def validate(cfg: Config, *, lowers_raw: Optional[Iterable[str]] = None,
             upper_raw: Optional[str] = None, work_raw: Optional[str] = None,
             mountpoint_raw: Optional[str] = None) -> None:
    """Check the layers and the mountpoint on disk. Raises ConfigError."""
    shown_lowers = list(lowers_raw) if lowers_raw is not None else list(cfg.lowers)
    for shown, path in zip(shown_lowers, cfg.lowers):
        _check_dir("lower layer", shown, path)

    if cfg.upper is not None:
        assert cfg.work is not None
        u_shown = upper_raw if upper_raw is not None else cfg.upper
        w_shown = work_raw if work_raw is not None else cfg.work
        ust = _check_dir("upperdir", u_shown, cfg.upper)
        wst = _check_dir("workdir", w_shown, cfg.work)
        if not cfg.read_only and not os.access(cfg.upper, os.W_OK):
            raise ConfigError(f"upperdir '{u_shown}' is not writable")
        if not os.access(cfg.work, os.W_OK):
            raise ConfigError(f"workdir '{w_shown}' is not writable")
        if cfg.upper == cfg.work:
            raise ConfigError(f"upperdir and workdir are the same directory '{cfg.upper}'")
        if _inside(cfg.work, cfg.upper):
            raise ConfigError(f"workdir '{w_shown}' is inside upperdir '{u_shown}'")
        if _inside(cfg.upper, cfg.work):
            raise ConfigError(f"upperdir '{u_shown}' is inside workdir '{w_shown}'")
        if ust.st_dev != wst.st_dev:
            raise ConfigError(f"workdir '{w_shown}' is not on the same filesystem as upperdir '{u_shown}'")
        for shown, lower in zip(shown_lowers, cfg.lowers):
            for name, d, d_shown in (("upperdir", cfg.upper, u_shown), ("workdir", cfg.work, w_shown)):
                if _inside(d, lower):
                    raise ConfigError(f"{name} '{d_shown}' is inside lower layer '{shown}'")
                if _inside(lower, d):
                    raise ConfigError(f"lower layer '{shown}' is inside {name} '{d_shown}'")

    m_shown = mountpoint_raw if mountpoint_raw is not None else cfg.mountpoint
    try:
        st = os.stat(cfg.mountpoint)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint '{m_shown}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"mountpoint '{m_shown}' is not usable: {e.strerror}"
                          + (" (a dead FUSE mount? try fusermount3 -u)" if e.errno == 107 else "")) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint '{m_shown}' is not a directory")
    if is_mountpoint(cfg.mountpoint):
        raise ConfigError(f"mountpoint '{m_shown}' is already a mountpoint")
