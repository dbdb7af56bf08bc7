"""Path-by-path comparison of two filesystem tars (``podman export`` output, image layers).

``index(tar)`` reads a tar into one record per path: type, mode (with the setuid, setgid
and sticky bits), owner, size and sha256 of regular files, symlink target, device
numbers, extended attributes (PAX ``SCHILY.xattr.*``) and mtime; hard links take the
record of their target, and the link groups are compared as sets of names.
``compare(a, b, since=T)`` lists every difference, one line each. mtimes are compared
where either side is older than ``since`` (a file from the base image keeps its time
through a copy-up); a file both sides wrote after ``since`` only has to be newer on both.
``dir_mtimes=False`` leaves directory mtimes out.
Used by tests/test_podman.py (an export against the image tar) and
tests/test_podman_rootless.py (rootless on ours against root on the kernel overlay).
"""
from __future__ import annotations

import dataclasses
import hashlib
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
         tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk",
         tarfile.FIFOTYPE: "fifo"}


@dataclasses.dataclass(frozen=True)
class Entry:
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str
    target: str
    dev: Tuple[int, int]
    xattrs: Tuple[Tuple[str, str], ...]
    mtime: int


@dataclasses.dataclass
class Index:
    entries: Dict[str, Entry]
    link_groups: List[List[str]]     # sorted names sharing one inode (more than one)


def norm(name: str) -> str:
    """A member's name as a relative path: no leading ``./``, no leading or trailing ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def index(path: Path) -> Index:
    entries: Dict[str, Entry] = {}
    links: Dict[str, str] = {}
    with tarfile.open(path) as t:
        for m in t:
            name = norm(m.name)
            if not name or name == ".":
                continue
            if m.islnk():
                links[name] = norm(m.linkname)
                continue
            digest = ""
            if m.isreg():
                f = t.extractfile(m)
                h = hashlib.sha256()
                if f is not None:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                digest = h.hexdigest()
            xattrs = tuple(sorted((k[len("SCHILY.xattr."):], v)
                                  for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            kind = "file" if m.isreg() else TYPES.get(m.type, repr(m.type))
            entries[name] = Entry(kind, m.mode & 0o7777, m.uid,
                                  m.gid, m.size if m.isreg() else 0, digest,
                                  m.linkname if m.issym() else "",
                                  (m.devmajor, m.devminor) if m.ischr() or m.isblk() else (0, 0),
                                  xattrs, int(m.mtime))
    groups: Dict[str, set] = {}
    for name, target in links.items():
        if target in entries:
            entries[name] = entries[target]
        groups.setdefault(target, {target}).add(name)
    return Index(entries, sorted(sorted(g) for g in groups.values()))


def _fields(a: Entry, b: Entry, since: Optional[float], dir_mtimes: bool) -> List[str]:
    out = [f for f in ("type", "mode", "uid", "gid", "size", "sha256", "target", "dev",
                       "xattrs") if getattr(a, f) != getattr(b, f)]
    if a.type == b.type == "dir" and not dir_mtimes:
        return out
    if since is None or min(a.mtime, b.mtime) < since:
        if a.mtime != b.mtime:
            out.append("mtime")
    return out


def compare(a: Index, b: Index, since: Optional[float] = None, dir_mtimes: bool = True,
            names: Tuple[str, str] = ("a", "b")) -> List[str]:
    """Every difference between ``a`` and ``b``, one line each (empty: the same tree)."""
    diffs = []
    for name in sorted(set(a.entries) | set(b.entries)):
        ea, eb = a.entries.get(name), b.entries.get(name)
        if ea is None or eb is None:
            where = names[1] if ea is None else names[0]
            diffs.append(f"{name}: only in {where}: {ea or eb}")
            continue
        fields = _fields(ea, eb, since, dir_mtimes)
        if fields:
            diffs.append(f"{name}: " + "; ".join(
                f"{f} {getattr(ea, f)!r} ({names[0]}) != {getattr(eb, f)!r} ({names[1]})"
                for f in fields))
    ga, gb = set(map(tuple, a.link_groups)), set(map(tuple, b.link_groups))
    for g in sorted(ga - gb):
        diffs.append(f"hard links {list(g)}: only in {names[0]}")
    for g in sorted(gb - ga):
        diffs.append(f"hard links {list(g)}: only in {names[1]}")
    return diffs
