"""Layer bytes in and out: decompress a blob into its tar while verifying both digests, and
compress a tar into a blob while computing both.

``LayerReader`` is what ``unpack`` reads from. It pulls the blob from any ``read(n)`` stream,
hashes it (the blob's *digest*), decompresses it (gzip, zstd or none) with bounded output per
step (a compression bomb never sits in memory whole), hashes the result (the layer's
*diff_id*), and offers ``read``/``tell`` and forward-only ``seek`` so that ``tarfile`` can parse
it without ever seeking back. ``finish()`` drains the rest and raises ``DigestMismatch`` unless
both digests are the promised ones.

zstd comes from ``backports.zstd`` (the standard library's ``compression.zstd`` on Python
>= 3.14): the same API as ``zlib``/``bz2``, with ``max_length`` to bound each step's output.
"""
from __future__ import annotations

import io
import zlib
from typing import Optional

try:                                   # Python >= 3.14
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:                    # pragma: no cover - depends on the interpreter
    from backports import zstd as _zstd  # type: ignore[no-redef]

from . import digest as _digest
from .errors import CorruptData, DigestMismatch

RAW_CHUNK = 1 << 20          # bytes read from the blob per step
MAX_OUT = 4 << 20            # at most this many decompressed bytes per step

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff(head: bytes) -> str:
    """Compression of a stream from its first bytes: "gzip", "zstd" or "none"."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Gzip:
    name = "gzip"
    magic = GZIP_MAGIC
    error = zlib.error

    def __init__(self):
        self.d = zlib.decompressobj(wbits=31)      # gzip wrapper, header and CRC checked

    def step(self, data: bytes) -> bytes:
        return self.d.decompress(data or self.d.unconsumed_tail, MAX_OUT)

    def pending(self) -> bool:
        return bool(self.d.unconsumed_tail)

    @property
    def eof(self) -> bool:
        return self.d.eof

    @property
    def unused(self) -> bytes:
        return self.d.unused_data


class _Zstd:
    name = "zstd"
    magic = ZSTD_MAGIC
    error = _zstd.ZstdError

    def __init__(self):
        self.d = _zstd.ZstdDecompressor()

    def step(self, data: bytes) -> bytes:
        return self.d.decompress(data, MAX_OUT)

    def pending(self) -> bool:
        return not self.d.needs_input and not self.d.eof

    @property
    def eof(self) -> bool:
        return self.d.eof

    @property
    def unused(self) -> bytes:
        return self.d.unused_data


_DECODERS = {"gzip": _Gzip, "zstd": _Zstd}


class LayerReader(io.RawIOBase):
    """A layer blob as its uncompressed tar, verified while read (see the module docstring).

    ``compression`` is "gzip", "zstd", "none", or "auto" (sniffed from the first bytes).
    ``blob_digest``/``blob_size`` may be None (not known: only computed); ``diff_id`` may be
    None too (then only computed, e.g. for a layer being inspected).
    """

    def __init__(self, raw, compression: str, *, blob_digest: Optional[str],
                 diff_id: Optional[str], blob_size: Optional[int] = None, what: str = "layer"):
        super().__init__()
        self.what = what
        self._raw = _digest.DigestingReader(raw, blob_digest, blob_size, what=f"{what} blob")
        self.blob_digest = blob_digest
        self.diff_id = diff_id
        self._leftover = b""
        if compression == "auto":
            self._leftover = self._read_raw_at_least(4)
            compression = sniff(self._leftover)
        self.compression = compression
        self._diff = None if compression == "none" else _digest.new_hasher(diff_id or "sha256")
        self._dec = None
        self._members = 0
        self._buf = b""
        self._pos = 0
        self._offset = 0
        self._eof = False

    # -- the raw side
    def _read_raw_at_least(self, n: int) -> bytes:
        parts = []
        got = 0
        while got < n:
            b = self._raw.read(RAW_CHUNK)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def _next_raw(self) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover, b""
            return data
        return self._raw.read(RAW_CHUNK)

    # -- decompression
    def _produce(self) -> bytes:
        """The next non-empty piece of the tar stream, or b"" at its end."""
        if self.compression == "none":
            return self._next_raw()
        cls = _DECODERS[self.compression]
        try:
            while True:
                if self._dec is not None and self._dec.pending():
                    out = self._dec.step(b"")
                else:
                    data = self._next_raw()
                    if not data:
                        if self._dec is not None and not self._dec.eof:
                            raise CorruptData(f"{self.what}: truncated {cls.name} stream")
                        if self._members == 0:
                            raise CorruptData(f"{self.what}: empty {cls.name} stream")
                        return b""
                    if self._dec is None:           # a new member / frame must start here
                        if len(data) < len(cls.magic):
                            data += self._read_raw_at_least(len(cls.magic) - len(data))
                        if not data.startswith(cls.magic[:len(data)]) or \
                                len(data) < len(cls.magic):
                            what = "not a" if self._members == 0 else "trailing data after the"
                            raise CorruptData(f"{self.what}: {what} {cls.name} stream")
                        self._dec = cls()
                        self._members += 1
                    out = self._dec.step(data)
                if self._dec.eof:
                    self._leftover = self._dec.unused + self._leftover
                    self._dec = None
                if out:
                    self._diff.update(out)
                    return out
        except cls.error as e:
            raise CorruptData(f"{self.what}: corrupt {cls.name} data: {e}") from None
        except EOFError as e:
            raise CorruptData(f"{self.what}: corrupt {cls.name} data: {e}") from None

    def _fill(self) -> bool:
        if self._eof:
            return False
        self._buf = self._next_piece()
        self._pos = 0
        if not self._buf:
            self._eof = True
            return False
        return True

    def _available(self) -> int:
        """How many bytes the buffer holds past ``_pos``, after a refill if it has none left;
        0 at the end of the stream."""
        avail = len(self._buf) - self._pos
        if avail > 0:
            return avail
        return len(self._buf) if self._fill() else 0

    # -- optional read-ahead: the blob is read, hashed and decompressed in a thread (all of
    # which release the GIL) while the caller parses and writes what came before
    def start_prefetch(self, depth: int = 8) -> None:
        import queue
        import threading
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def run():
            try:
                while not self._stop.is_set():
                    piece = self._produce()
                    self._put(("data", piece))
                    if not piece:
                        return
            except BaseException as e:          # handed to the reader, raised there
                self._put(("error", e))

        self._thread = threading.Thread(target=run, name="layer-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        import queue
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next_piece(self) -> bytes:
        q = getattr(self, "_queue", None)
        if q is None:
            return self._produce()
        kind, value = q.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the read-ahead thread (if any); the stream itself is the caller's. A thread
        stuck in a read that never returns (a stalled pipe or network) is left behind (it is
        a daemon thread and stops at its next step), so Ctrl-C is never held up by it; the
        sources hand out streams without locks, so closing them does not wait for it."""
        stop = getattr(self, "_stop", None)
        if stop is not None and not stop.is_set():
            stop.set()
            self._thread.join(timeout=2.0)
        super().close()

    # -- the file-like side (what tarfile uses)
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True               # forward only; tarfile never goes back when reading in order

    def tell(self) -> int:
        return self._offset

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while True:
                b = self.read(RAW_CHUNK)
                if not b:
                    return b"".join(parts)
                parts.append(b)
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):                  # the common case: a tar header
            self._pos = end
            self._offset += n
            return self._buf[pos:end]
        out = []
        want = n
        while want > 0:
            avail = self._available()
            if not avail:
                break
            if self._pos == 0 and want >= avail:
                piece = self._buf
                self._pos = avail
            else:
                piece = self._buf[self._pos:self._pos + want]
                self._pos += len(piece)
            out.append(piece)
            want -= len(piece)
        data = out[0] if len(out) == 1 else b"".join(out) if out else b""
        self._offset += len(data)
        return data

    def view(self, n: int) -> memoryview:
        """Up to ``n`` bytes (at least one, unless at the end) as a view of the buffer they
        are in: no copy. Valid as long as the caller holds it (the buffer is immutable)."""
        avail = self._available()
        if not avail:
            return memoryview(b"")
        k = n if n < avail else avail
        pos = self._pos
        self._pos = pos + k
        self._offset += k
        return memoryview(self._buf)[pos:pos + k]

    def skip(self, n: int) -> int:
        """Pass over ``n`` bytes without copying them; returns how many there were."""
        left = n
        while left > 0:
            avail = self._available()
            if not avail:
                break
            k = left if left < avail else avail
            self._pos += k
            left -= k
        self._offset += n - left
        return n - left

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._offset
        elif whence != 0:
            raise io.UnsupportedOperation("LayerReader seeks forward only")
        if pos < self._offset:
            raise io.UnsupportedOperation(f"LayerReader cannot seek back from {self._offset} "
                                          f"to {pos}")
        if pos > self._offset:
            self.skip(pos - self._offset)
        return self._offset

    # -- the end
    def drain(self) -> None:
        self._offset += len(self._buf) - self._pos     # the rest of the current piece too
        self._pos = len(self._buf)
        while self._fill():
            self._offset += len(self._buf) - self._pos
            self._pos = len(self._buf)
        if self.compression != "none":
            rest = self._raw.read(RAW_CHUNK)
            if rest:
                raise CorruptData(f"{self.what}: trailing data after the "
                                  f"{self.compression} stream")

    @property
    def tar_size(self) -> int:
        return self._offset

    @property
    def blob_size(self) -> int:
        return self._raw.count

    def computed_diff_id(self) -> str:
        h = self._raw.hasher if self._diff is None else self._diff
        return f"{h.name}:{h.hexdigest()}"

    def finish(self) -> tuple:
        """Read to the end and check both digests; return (blob digest, diff_id)."""
        self.drain()
        self.close()
        blob = self._raw.verify()
        diff_id = self.computed_diff_id()
        if self.diff_id is not None and diff_id != self.diff_id:
            raise DigestMismatch(f"{self.what}: diff_id mismatch: the config says "
                                 f"{self.diff_id}, the uncompressed layer is {diff_id}")
        return blob, diff_id


# ---------------------------------------------------------------------------------- writing

class _Hashing:
    """A sink that hashes and counts what passes through to ``out``."""

    def __init__(self, out):
        self.out = out
        self.h = _digest.new_hasher("sha256")
        self.count = 0

    def write(self, b) -> int:
        self.h.update(b)
        self.count += len(b)
        self.out.write(b)
        return len(b)

    def digest(self) -> str:
        return f"sha256:{self.h.hexdigest()}"


class CompressingWriter(io.RawIOBase):
    """Tar bytes in, blob bytes out to ``out``: computes the diff_id (of what is written) and
    the digest (of what reaches ``out``). Deterministic for a given library version: gzip
    headers carry no name and mtime 0 (zlib's own gzip wrapper), zstd frames carry a checksum
    and no dictionary or content size."""

    GZIP_LEVEL = 6
    ZSTD_LEVEL = 3

    def __init__(self, out, compression: str):
        super().__init__()
        self.compression = compression
        self._blob = _Hashing(out)
        self._tar = _digest.new_hasher("sha256")
        self.tar_size = 0
        if compression == "gzip":
            self._c = zlib.compressobj(self.GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression == "zstd":
            self._c = _zstd.ZstdCompressor(options={
                _zstd.CompressionParameter.compression_level: self.ZSTD_LEVEL,
                _zstd.CompressionParameter.checksum_flag: 1})
        elif compression == "none":
            self._c = None
        else:
            raise ValueError(f"unknown compression {compression!r}")
        self.result = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = len(b)
        if not n:
            return 0
        self.tar_size += n
        if self._c is None:
            self._blob.write(b)               # one hash: the blob is the tar
            return n
        self._tar.update(b)
        out = self._c.compress(b)
        if out:
            self._blob.write(out)
        return n

    def finish(self) -> dict:
        """Flush; return {"digest", "size", "diff_id", "tar_size"}."""
        if self.result is None:
            if self.compression == "gzip":
                self._blob.write(self._c.flush())
            elif self.compression == "zstd":
                self._blob.write(self._c.flush(_zstd.ZstdCompressor.FLUSH_FRAME))
            diff_id = self._blob.digest() if self._c is None else \
                f"sha256:{self._tar.hexdigest()}"
            self.result = {"digest": self._blob.digest(), "size": self._blob.count,
                           "diff_id": diff_id, "tar_size": self.tar_size}
        return self.result
