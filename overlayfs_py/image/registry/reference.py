"""Registry references: ``[HOST[:PORT]/]REPO[:TAG][@DIGEST]``, as docker and podman read them.

The grammar is distribution's (``distribution/reference``): the first path component is a
registry host if it contains a ``.`` or a ``:``, or is ``localhost`` (or an IPv6 address in
brackets); otherwise the host is ``docker.io``, and a one-component repository there lives
under ``library/``. Without a tag or a digest the tag is ``latest``. A ``docker://`` prefix
(skopeo's transport name) is accepted and dropped.

``RegistryRef.name`` (``host/repo:tag`` or ``host/repo@digest``) is the canonical name an image
is recorded under in the store, so ``image mount`` finds it by any spelling that normalizes
to it (``normalize``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from .. import digest as _digest
from ..errors import ImageError

DEFAULT_HOST = "docker.io"
DEFAULT_TAG = "latest"
# docker.io is an alias: its API is served by registry-1.docker.io.
API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$")


class ReferenceError_(ImageError):
    """A reference that does not follow the grammar."""


@dataclasses.dataclass(frozen=True)
class RegistryRef:
    host: str                      # as the user names it (docker.io, localhost:5000, ...)
    repository: str                # library/debian, team/app
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def api_host(self) -> str:
        """The host[:port] the HTTP requests go to."""
        return API_HOSTS.get(self.host, self.host)

    @property
    def hostname(self) -> str:
        """The host without its port (and without IPv6 brackets)."""
        h = self.host
        if h.startswith("["):
            return h[1:h.index("]")]
        return h.rsplit(":", 1)[0] if ":" in h else h

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def repo_name(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def name(self) -> str:
        """The canonical name: ``host/repo@digest`` when pulled by digest, else
        ``host/repo:tag``."""
        if self.digest:
            return f"{self.repo_name}@{self.digest}"
        return f"{self.repo_name}:{self.tag or DEFAULT_TAG}"

    def with_digest(self, digest: str) -> "RegistryRef":
        return dataclasses.replace(self, tag=None, digest=digest)

    def __str__(self) -> str:
        s = self.repo_name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _is_host(component: str) -> bool:
    return ("." in component or ":" in component or component == "localhost"
            or component.startswith("[")) and bool(_HOST.match(component))


def parse(text: str, *, default_tag: bool = True) -> RegistryRef:
    """Parse a registry reference (see the module docstring); ImageError if it is not one."""
    if not text:
        raise ReferenceError_("empty image reference")
    raw = text
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    if "://" in text:
        raise ReferenceError_(f"invalid image reference {raw!r}: give HOST/REPO[:TAG], "
                              "without a URL scheme")
    digest = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        try:
            _digest.split(digest)
        except ImageError:
            raise ReferenceError_(f"invalid image reference {raw!r}: bad digest "
                                  f"{digest!r}") from None
    tag = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG.match(tag):
            raise ReferenceError_(f"invalid image reference {raw!r}: bad tag {tag!r}")
    parts = text.split("/")
    if len(parts) > 1 and _is_host(parts[0]):
        host, path = parts[0], parts[1:]
    else:
        host, path = DEFAULT_HOST, parts
    if host == "index.docker.io":
        host = DEFAULT_HOST
    if not path or not all(_COMPONENT.match(p) for p in path):
        raise ReferenceError_(f"invalid image reference {raw!r}: the repository must be "
                              "lowercase letters, digits and separators (. _ __ -), "
                              "in /-separated components")
    repository = "/".join(path)
    if host == DEFAULT_HOST and len(path) == 1:
        repository = f"library/{repository}"
    if len(repository) > 255:
        raise ReferenceError_(f"invalid image reference {raw!r}: repository name too long")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return RegistryRef(host, repository, tag, digest)


def normalize(text: str) -> Optional[str]:
    """The canonical store name of ``text`` if it parses as a registry reference (an
    image pulled by tag and digest is recorded by its tag); None otherwise."""
    try:
        ref = parse(text)
    except ImageError:
        return None
    return ref.name
