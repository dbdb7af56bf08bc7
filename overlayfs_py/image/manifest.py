"""OCI / Docker schema 2 documents: descriptors, indexes, manifests, configs, platforms, and
the walk from an index entry to one image (``resolve``), shared by every kind of source.

A source only has to say which descriptors it lists at the top (an OCI layout's index, a
registry's tag) and how to read a blob; ``resolve`` follows indexes down to the manifest for
the wanted platform, reads and verifies the manifest and the config, and pairs every layer
with its ``diff_id``.
"""
from __future__ import annotations

import dataclasses
import json
import platform as _platform
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import digest as _digest
from . import mediatypes as mt
from .errors import CorruptData, ImageError, NotFound, UnsupportedMediaType

MAX_JSON = 8 << 20        # manifests and configs are small; refuse anything absurd


@dataclasses.dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT])")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> "Platform":
        machine = _platform.machine().lower()
        arch, variant = {
            "x86_64": ("amd64", None), "amd64": ("amd64", None), "i386": ("386", None),
            "i686": ("386", None), "aarch64": ("arm64", None), "arm64": ("arm64", None),
            "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "ppc64le": ("ppc64le", None),
            "s390x": ("s390x", None), "riscv64": ("riscv64", None),
        }.get(machine, (machine, None))
        return cls("linux", arch, variant)

    def matches(self, p: Optional[dict]) -> bool:
        if not p:
            return False
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        got = p.get("variant")
        # arm64's variant is v8 when given; treat "no variant" as the default one.
        return got == self.variant or (got is None and self.variant in ("v8",))


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Tuple[Tuple[str, str], ...] = ()
    platform: Optional[Tuple[Tuple[str, object], ...]] = None
    urls: Tuple[str, ...] = ()

    @classmethod
    def from_json(cls, d: object, what: str) -> "Descriptor":
        if not isinstance(d, dict):
            raise CorruptData(f"{what}: a descriptor is not a JSON object")
        media_type = d.get("mediaType")
        dg = d.get("digest")
        size = d.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise CorruptData(f"{what}: a descriptor has no mediaType")
        if not isinstance(dg, str):
            raise CorruptData(f"{what}: a descriptor has no digest")
        _digest.split(dg)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptData(f"{what}: descriptor {dg} has no valid size")
        ann = d.get("annotations") or {}
        plat = d.get("platform")
        return cls(media_type, dg, size,
                   tuple(sorted((str(k), str(v)) for k, v in ann.items()))
                   if isinstance(ann, dict) else (),
                   tuple(sorted(plat.items())) if isinstance(plat, dict) else None,
                   tuple(d.get("urls") or ()))

    def to_json(self) -> dict:
        out: Dict[str, object] = {"mediaType": self.media_type, "digest": self.digest,
                                  "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    def annotation(self, key: str) -> Optional[str]:
        return dict(self.annotations).get(key)

    def platform_dict(self) -> Optional[dict]:
        return dict(self.platform) if self.platform else None

    def replace(self, **kw) -> "Descriptor":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of an image: its blob and the digest of its uncompressed tar."""
    blob: Descriptor
    diff_id: str

    @property
    def compression(self) -> str:
        return mt.layer_compression(self.blob.media_type)


@dataclasses.dataclass(frozen=True)
class Image:
    """One resolved image: verified manifest and config, layers bottom first."""
    source: str                 # what the user named, for messages and records
    manifest_digest: str
    manifest_media_type: str
    manifest_bytes: bytes
    manifest: dict
    config_digest: str
    config_bytes: bytes
    config: dict
    layers: Tuple[Layer, ...]

    @property
    def config_descriptor(self) -> Descriptor:
        return Descriptor.from_json(self.manifest["config"], "manifest")

    @property
    def diff_ids(self) -> List[str]:
        return [l.diff_id for l in self.layers]

    def manifest_descriptor(self) -> Descriptor:
        return Descriptor(self.manifest_media_type, self.manifest_digest,
                          len(self.manifest_bytes))


def loads(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptData(f"{what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptData(f"{what}: not a JSON object")
    return doc


def media_type_of(doc: dict, fallback: Optional[str]) -> str:
    got = doc.get("mediaType")
    if isinstance(got, str) and got:
        return got
    if fallback:
        return fallback
    # An OCI index or manifest may leave mediaType out; tell them apart by their fields.
    if "manifests" in doc:
        return mt.OCI_INDEX
    if "layers" in doc or "config" in doc:
        return mt.OCI_MANIFEST
    raise UnsupportedMediaType("a document without mediaType that is neither an index nor a "
                               "manifest")


def index_entries(doc: dict, what: str) -> List[Descriptor]:
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise CorruptData(f"{what}: no 'manifests' list")
    return [Descriptor.from_json(d, what) for d in manifests]


def choose_platform(entries: Sequence[Descriptor], want: Platform, what: str) -> Descriptor:
    candidates = [e for e in entries if e.media_type in mt.MANIFESTS + mt.INDEXES]
    for e in candidates:
        if want.matches(e.platform_dict()):
            return e
    have = sorted({str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
                   for p in (e.platform_dict() for e in candidates) if p})
    if not have and len(candidates) == 1:
        return candidates[0]         # a one-entry index without platforms
    raise NotFound(f"{what}: no image for platform {want} (has: {', '.join(have) or 'none'})")


BlobReader = Callable[[Descriptor, str], bytes]


def read_json_blob(read_blob: BlobReader, desc: Descriptor, what: str) -> bytes:
    if desc.size > MAX_JSON:
        raise CorruptData(f"{what} {desc.digest}: {desc.size} bytes is too large")
    data = read_blob(desc, what)
    if len(data) != desc.size:
        raise CorruptData(f"{what} {desc.digest}: {len(data)} bytes where the descriptor "
                          f"says {desc.size}")
    got = _digest.of_bytes(data, desc.digest.split(":", 1)[0])
    if got != desc.digest:
        from .errors import DigestMismatch
        raise DigestMismatch(f"{what}: digest mismatch: expected {desc.digest}, got {got}")
    return data


def resolve(source: str, top: Descriptor, read_blob: BlobReader,
            platform: Optional[Platform] = None) -> Image:
    """From an index entry (an index or a manifest) to a verified Image."""
    want = platform or Platform.host()
    desc = top
    for _depth in range(8):
        if desc.media_type not in mt.INDEXES + mt.MANIFESTS:
            raise UnsupportedMediaType(f"{source}: unsupported manifest media type "
                                       f"{desc.media_type!r}")
        data = read_json_blob(read_blob, desc, "manifest" if desc.media_type in mt.MANIFESTS
                              else "index")
        doc = loads(data, f"{source}: {desc.digest}")
        kind = media_type_of(doc, desc.media_type)
        if kind in mt.INDEXES:
            desc = choose_platform(index_entries(doc, f"{source}: index {desc.digest}"), want,
                                   source)
            continue
        if kind not in mt.MANIFESTS:
            raise UnsupportedMediaType(f"{source}: unsupported manifest media type {kind!r}")
        return image_from_manifest(source, desc.digest, kind, data, doc, read_blob)
    raise CorruptData(f"{source}: indexes nested too deep")


def image_from_manifest(source: str, manifest_digest: str, media_type: str, data: bytes,
                        doc: dict, read_blob: BlobReader) -> Image:
    what = f"{source}: manifest {_digest.short(manifest_digest)}"
    config = Descriptor.from_json(doc.get("config"), what)
    if config.media_type not in mt.CONFIGS:
        raise UnsupportedMediaType(f"{what}: unsupported config media type "
                                   f"{config.media_type!r}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise CorruptData(f"{what}: no 'layers' list")
    blobs = [Descriptor.from_json(l, what) for l in raw_layers]
    for b in blobs:
        mt.layer_compression(b.media_type)          # UnsupportedMediaType if not a layer
    cdata = read_json_blob(read_blob, config, "config")
    cdoc = loads(cdata, f"{source}: config")
    diff_ids = config_diff_ids(cdoc, f"{source}: config")
    if len(diff_ids) != len(blobs):
        raise CorruptData(f"{source}: the config lists {len(diff_ids)} diff_ids for "
                          f"{len(blobs)} layers")
    return Image(source, manifest_digest, media_type, data, doc, config.digest, cdata, cdoc,
                 tuple(Layer(b, d) for b, d in zip(blobs, diff_ids)))


def config_diff_ids(cdoc: dict, what: str) -> List[str]:
    rootfs = cdoc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise CorruptData(f"{what}: no rootfs.diff_ids")
    ids = rootfs["diff_ids"]
    for d in ids:
        if not isinstance(d, str):
            raise CorruptData(f"{what}: a diff_id is not a string")
        _digest.split(d)
    return list(ids)


def dumps(doc: dict) -> bytes:
    """Compact JSON in the key order given: the bytes that get hashed."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
