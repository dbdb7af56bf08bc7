"""Media types of OCI and Docker schema 2 images, and what each says about a layer's bytes."""
from __future__ import annotations

from .errors import UnsupportedMediaType

OCI_LAYOUT_VERSION = "1.0.0"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"   # uncompressed, seen in the wild

INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

# layer media type -> compression of its bytes
_LAYERS = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
    DOCKER_LAYER: "none",
}

COMPRESSIONS = ("gzip", "zstd", "none")


def layer_compression(media_type: str) -> str:
    """"gzip", "zstd" or "none"; UnsupportedMediaType for anything that is not a layer tar."""
    try:
        return _LAYERS[media_type]
    except KeyError:
        raise UnsupportedMediaType(f"unsupported layer media type {media_type!r}") from None


def oci_layer_type(compression: str) -> str:
    return {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compression]


def to_oci(media_type: str) -> str:
    """The OCI equivalent of a Docker schema 2 media type (same bytes); others unchanged."""
    if media_type in _LAYERS:
        return oci_layer_type(_LAYERS[media_type])
    return {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_LIST: OCI_INDEX,
            DOCKER_CONFIG: OCI_CONFIG}.get(media_type, media_type)
