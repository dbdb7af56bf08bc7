"""The image half's errors. Every one is bad input or a failed operation whose ``str()`` is
one line naming the problem; the command line prints it as ``overlayfs-py: <line>`` and exits 1.
"""
from __future__ import annotations


class ImageError(Exception):
    """Base class: one line, no traceback for the user."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


class NotFound(ImageError):
    """A source, tag, manifest, config, blob or stored image that does not exist."""


class DigestMismatch(ImageError):
    """A blob or an uncompressed layer whose digest is not the one promised."""


class CorruptData(ImageError):
    """A truncated or damaged archive, compressed stream or JSON document."""


class HostileArchive(ImageError):
    """A layer tar that tries to write outside its layer (``..``, absolute names,
    names through symlinks, hard links to elsewhere...)."""


class UnsupportedMediaType(ImageError):
    """A manifest, config or layer of a media type we do not read."""


class StoreError(ImageError):
    """The store cannot be used (permissions, a different format, a full disk...)."""
