"""``image push SOURCE[:TAG] REF``: an image from an OCI layout (or any other source the image
commands read: an OCI or Docker archive, or an image in the store whose blobs are there)
into a registry.

Order, as the distribution spec requires: every blob first (config and layers; a ``HEAD``
skips those the registry has, the rest go up in parallel, monolithic up to
``Options.chunk_size`` and in ``PATCH`` chunks above), then the manifest, by its exact bytes
(so its digest does not change). For an index, each listed manifest is pushed (by digest)
before the index. The registry checks each blob's digest when the upload completes; the
manifest's digest is checked against what the registry answers.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
from typing import List, Optional, Union

from .. import digest as _digest
from .. import manifest as _manifest
from .. import mediatypes as mt
from .. import reference as _srcref
from ..api import open_store
from ..errors import DigestMismatch, ImageError, UnsupportedMediaType
from ..manifest import Descriptor
from ..progress import Progress
from ..source import Source, open_source
from ..store import Store
from . import reference as _reference
from .client import Options, Registry, put_manifest, upload_blob


@dataclasses.dataclass
class Pushed:
    reference: str                  # host/repo:tag as pushed
    digest: str                     # the top manifest's (or index's) digest
    media_type: str
    uploaded: List[str]             # blob digests sent
    skipped: List[str]              # blob digests the registry already had

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _Pusher:
    def __init__(self, src: Source, reg: Registry, repository: str, progress: Progress,
                 jobs: int):
        self.src = src
        self.reg = reg
        self.repository = repository
        self.progress = progress
        self.jobs = max(1, jobs)
        self.uploaded: List[str] = []
        self.skipped: List[str] = []

    def push(self, desc: Descriptor, reference: str, depth: int = 0) -> str:
        if depth > 4:
            raise ImageError(f"{self.src.description}: indexes nested too deep")
        if desc.media_type not in mt.MANIFESTS + mt.INDEXES:
            raise UnsupportedMediaType(f"{self.src.description}: unsupported manifest media "
                                       f"type {desc.media_type!r}")
        data = _manifest.read_json_blob(self.src.read_blob, desc, "manifest")
        doc = _manifest.loads(data, f"{self.src.description}: {desc.digest}")
        kind = _manifest.media_type_of(doc, desc.media_type)
        if kind in mt.INDEXES:
            for child in _manifest.index_entries(doc, f"{self.src.description}: index"):
                self.push(child, child.digest, depth + 1)
        else:
            what = f"{self.src.description}: manifest {_digest.short(desc.digest)}"
            blobs = [Descriptor.from_json(doc.get("config"), what)]
            blobs += [Descriptor.from_json(l, what) for l in doc.get("layers") or []]
            self._blobs(blobs)
        got = put_manifest(self.reg, self.repository, reference, kind, data)
        if got and got != desc.digest:
            raise DigestMismatch(f"registry {self.reg.host}: {self.repository}: the manifest "
                                 f"was stored as {got}, not {desc.digest}")
        return desc.digest

    def _blobs(self, blobs: List[Descriptor]) -> None:
        unique = list({b.digest: b for b in blobs}.values())
        if not unique:
            return
        with concurrent.futures.ThreadPoolExecutor(min(self.jobs, len(unique)),
                                                   thread_name_prefix="push") as pool:
            futures = [pool.submit(self._blob, b) for b in unique]
            error = None
            for fut in concurrent.futures.as_completed(futures):
                try:
                    fut.result()
                except BaseException as e:
                    error = error or e
            if error is not None:
                raise error

    def _blob(self, b: Descriptor) -> None:
        with self.progress.task(f"blob {_digest.short(b.digest)}", total=b.size) as task:
            done = [0]

            def on_bytes(n):
                done[0] += n
                task.advance(done[0])
            sent = upload_blob(self.reg, self.repository, b.digest, b.size,
                               lambda: self.src.open_blob(b), on_bytes)
        (self.uploaded if sent else self.skipped).append(b.digest)


def push(source: str, reference: str, *, store: Union[None, str, Store] = None,
         options: Optional[Options] = None, progress: Optional[Progress] = None) -> Pushed:
    """Push the image ``source`` (``LAYOUT[:TAG]``, ``LAYOUT@DIGEST``, an archive, or a stored
    image) to ``reference`` (``HOST[:PORT]/REPO[:TAG]``); see the module docstring."""
    ref = _reference.parse(reference)
    if ref.digest and not ref.tag:
        raise ImageError(f"{reference}: push to a tag (the digest is the manifest's own)")
    options = options or Options()
    progress = progress or Progress()
    sref = _srcref.parse(source)
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(open_store(store)) if sref.kind == "store" else None
        src = stack.enter_context(open_source(sref, s))
        top = src.select(sref.tag, sref.digest)
        reg = Registry(ref.host, ref.api_host, options)
        stack.callback(reg.close)
        pusher = _Pusher(src, reg, ref.repository, progress, options.jobs)
        digest = pusher.push(top, ref.tag or _reference.DEFAULT_TAG)
    return Pushed(f"{ref.repo_name}:{ref.tag or _reference.DEFAULT_TAG}", digest,
                  top.media_type, pusher.uploaded, pusher.skipped)
