"""The layer tar reader (overlayfs_py/image/tarstream.py) against Python's tarfile and GNU tar:
the same members, fields and xattrs from every header format layers use, and a refusal of
what tarfile lets pass quietly (a missing end, a bad checksum)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import imagekit  # noqa: E402
from imagekit import C, D, F, H, L, P, make_tar  # noqa: E402

from overlayfs_py.image.compression import LayerReader  # noqa: E402
from overlayfs_py.image.errors import CorruptData  # noqa: E402
from overlayfs_py.image.tarstream import members, mtime_ns  # noqa: E402

LONG = "l" * 120
DEEP = "/".join(["dir%02d" % i for i in range(30)])            # > 100 chars, splits as prefix


def _ours(data: bytes):
    r = LayerReader(io.BytesIO(data), "none", blob_digest=None, diff_id=None)
    out = []
    for m in members(r):
        content = r.read(m.size) if m.isreg() else b""
        out.append((m.name, m.type if m.type != b"\0" else b"0", m.mode, m.uid, m.gid, m.size,
                    m.mtime, m.linkname, m.devmajor, m.devminor,
                    sorted(m.xattrs), content))
    return out


def _theirs(data: bytes):
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8",
                      errors="surrogateescape") as t:
        for m in t:
            enc = lambda s: s.encode("utf-8", "surrogateescape")  # noqa: E731
            xattrs = sorted((k[13:], enc(v)) for k, v in m.pax_headers.items()
                            if k.startswith("SCHILY.xattr."))
            content = t.extractfile(m).read() if m.isreg() else b""
            type_ = m.type if m.type not in (b"\0", tarfile.AREGTYPE) else b"0"
            out.append((enc(m.name), type_, m.mode, m.uid, m.gid, m.size if m.isreg() else 0,
                        int(m.mtime), enc(m.linkname), m.devmajor if m.ischr() or m.isblk()
                        else 0, m.devminor if m.ischr() or m.isblk() else 0, xattrs, content))
    return out


def _norm(rows):
    # tarfile strips a directory's trailing slash; so do we, when splitting names
    return [(r[0].rstrip(b"/"),) + r[1:5] + ((r[5] if r[1] in (b"0", b"7") else 0),) + r[6:]
            for r in rows]


ENTRIES = [
    D("etc"), F("etc/motd", "hi", mode=0o4755, uid=1000, gid=2000),
    F(LONG, "long name"), L("sym", "t" * 150), H("hard", LONG),
    F(DEEP + "/file", "deep"), C("null", 1, 3), P("fifo"),
    F("x", b"\0" * 1000, xattrs={"security.capability": b"\x01\x00\xff\xfe",
                                   "user.text": "héllo".encode()}),
    F("bigid", "u", uid=3_000_000, gid=4_000_000),
    F("n\xe9\u00fc", "non-ascii"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_same_members_as_tarfile(fmt):
    entries = ENTRIES if fmt == tarfile.PAX_FORMAT else \
        [e for e in ENTRIES if not e.info.pax_headers]
    data = make_tar(entries, fmt=fmt)
    ours = _norm(_ours(data))
    assert len(ours) == len(entries) and ours == _norm(_theirs(data))


def test_gnu_tar_archives(tmp_path):
    src = tmp_path / "src"
    (src / DEEP).mkdir(parents=True)
    (src / DEEP / LONG).write_text("x" * 700)
    os.symlink("s" * 200, src / "longlink")
    os.link(src / DEEP / LONG, src / "hl")
    for fmt in ("gnu", "posix", "ustar"):
        if fmt == "ustar":
            continue                                # ustar cannot hold the 120-char name
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), "."],
                       check=True)
        data = out.read_bytes()
        ours = _norm(_ours(data))
        assert len(ours) >= 33 and ours == _norm(_theirs(data)), fmt


def test_pax_mtime_in_nanoseconds():
    e = F("f", "x")
    e.info.pax_headers = {"mtime": "1700000000.123456789"}
    (m,) = list(members(LayerReader(io.BytesIO(make_tar([e])), "none", blob_digest=None,
                                    diff_id=None)))
    assert mtime_ns(m) == 1_700_000_000_123_456_789


@pytest.mark.parametrize("cut, needle", [
    (lambda d: d[:512 + 100], "truncated"),
    (lambda d: d[:1024], "no end-of-archive marker"),
    (lambda d: d[:148] + b"0000000\0" + d[156:], "invalid header at offset 0"),
    (lambda d: b"", "no end-of-archive marker"),
])
def test_refuses_what_tarfile_lets_pass(cut, needle):
    data = cut(make_tar([F("a", "A" * 10)]))
    with pytest.raises(CorruptData, match=needle):
        r = LayerReader(io.BytesIO(data), "none", blob_digest=None, diff_id=None)
        for m in members(r):
            r.read(m.size)


def test_written_headers_read_back_by_tarfile_and_by_us():
    from overlayfs_py.image.tarstream import header
    cases = [
        (b"etc/motd", b"0", dict(mode=0o4755, uid=1, gid=2, size=3, mtime=1_700_000_000)),
        (b"x" * 150, b"2", dict(linkname=b"y" * 300)),                 # PAX path, linkpath
        (b"d" * 90 + b"/" + b"e" * 90, b"0", dict(size=0)),             # ustar prefix
        (b"big", b"0", dict(uid=3_000_000, gid=2 ** 33, size=5)),       # PAX numbers
        (b"n\xff\xfe", b"0", dict(xattrs=[("security.capability", b"\x01\xff"),
                                          ("user.t", b"v")])),        # bytes names/values
        (b"dev", b"3", dict(devmajor=1, devminor=3)),
        (b"dir/", b"5", dict(mode=0o1777)),
    ]
    data = b""
    for name, type_, kw in cases:
        data += header(name, type_, **kw)
        size = kw.get("size", 0)
        data += b"z" * size + bytes(-size % 512)
    data += bytes(1024)
    ours = _ours(data)
    theirs = _theirs(data)
    assert _norm(ours) == _norm(theirs)
    assert [r[0] for r in ours] == [c[0] for c in cases]
    assert ours[3][3:5] == (3_000_000, 2 ** 33)
    assert ours[4][10] == [("security.capability", b"\x01\xff"), ("user.t", b"v")]
    assert header(b"a", b"0", size=1) == header(b"a", b"0", size=1)   # deterministic


class _Trickle(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per read: the reader's pieces end at
    awkward places (inside headers and file data)."""

    def __init__(self, data: bytes, step: int):
        super().__init__()
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.step if n is None or n < 0 else min(n, self.step)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("step", [1, 511, 513, 4096, 1 << 20])
def test_reader_views_skips_and_reads_across_pieces(step):
    """view() (no copy), skip() and read() give the stream's bytes in order whatever the
    piece boundaries, tell() follows them, and tar_size counts the whole tar (the trailing
    zero blocks too)."""
    data = os.urandom(300_000)
    r = LayerReader(_Trickle(data, step), "none", blob_digest=None, diff_id=None)
    got, pos = [], 0
    for kind, n in [("read", 10), ("view", 5000), ("skip", 1234), ("view", 1), ("read", 0),
                    ("skip", 70_000), ("read", 100_000), ("view", 1 << 20)] * 3:
        if kind == "skip":
            assert r.skip(n) == min(n, len(data) - pos)
            pos += min(n, len(data) - pos)
        else:
            want = min(n, len(data) - pos)
            b = bytes(r.read(n)) if kind == "read" else b""
            if kind == "view":
                while len(b) < want:                   # a view stops at the piece's end
                    v = r.view(want - len(b))
                    assert 0 < len(v) <= want - len(b)
                    b += bytes(v)
            assert b == data[pos:pos + want], (kind, n, pos)
            pos += want
        assert r.tell() == pos
    assert pos == len(data) and len(r.view(10)) == 0 and r.read(10) == b""

    tar = make_tar([F("a", "x" * 700), D("d"), F("d/b", os.urandom(5000))])
    r = LayerReader(_Trickle(tar, step), "none", blob_digest=imagekit.sha(tar),
                    diff_id=imagekit.sha(tar))
    names = [m.name.rstrip(b"/") for m in members(r)]   # file data skipped, not read
    assert names == [b"a", b"d", b"d/b"]
    r.finish()
    assert r.tar_size == len(tar)
