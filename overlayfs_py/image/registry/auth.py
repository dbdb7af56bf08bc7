"""Registry credentials and authentication challenges.

Credentials are read from the files podman and docker write, first match wins:

1. ``--authfile FILE`` (the API's ``authfile=``), else ``$REGISTRY_AUTH_FILE``;
2. ``${XDG_RUNTIME_DIR}/containers/auth.json`` (for root without ``XDG_RUNTIME_DIR``:
   ``/run/containers/0/auth.json``, podman's default);
3. ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``;
4. ``~/.docker/config.json`` (docker's ``DOCKER_CONFIG`` is honoured).

An entry is ``{"auths": {KEY: {"auth": base64("user:password")}}}`` (or ``username`` and
``password`` fields). KEY is a registry host (``localhost:5000``, ``docker.io``; docker's
``https://index.docker.io/v1/`` form is understood too) or, as podman allows, a host and a
repository namespace (``quay.io/team``): the most specific key that matches wins. Credential
helpers (``credHelpers``, ``credsStore``) are not run.

``login`` writes an entry with the same rules as ``podman login`` into the file of step 1 or
2 (created 0600, replaced atomically, other entries kept). ``parse_challenge`` reads a
``WWW-Authenticate`` header (``Basic realm=...``, ``Bearer realm=...,service=...,scope=...``).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import secrets
from typing import Dict, List, Optional, Tuple

from ..errors import ImageError


class AuthFileError(ImageError):
    """An auth file that cannot be read or written."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str                    # the file (and key) they came from, for messages

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode("utf-8")
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def describe(self) -> str:
        return f"user {self.username!r} from {self.source}"


def _home() -> str:
    return os.path.expanduser("~")


def auth_files(authfile: Optional[str] = None) -> List[str]:
    """The files credentials are looked up in, in order (see the module docstring)."""
    if authfile:
        return [authfile]
    out = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        out.append(env)
    out.append(default_login_file())
    xdg_config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(_home(), ".config")
    out.append(os.path.join(xdg_config, "containers", "auth.json"))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(_home(), ".docker")
    out.append(os.path.join(docker_dir, "config.json"))
    seen = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def default_login_file(authfile: Optional[str] = None) -> str:
    """Where ``login`` writes: ``authfile``, ``$REGISTRY_AUTH_FILE``, else podman's
    per-session file."""
    if authfile:
        return authfile
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "containers", "auth.json")
    if os.geteuid() == 0:
        return "/run/containers/0/auth.json"
    xdg_config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(_home(), ".config")
    return os.path.join(xdg_config, "containers", "auth.json")


def normalize_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000`` -> ``h:5000``."""
    k = key.strip()
    had_scheme = False
    for scheme in ("https://", "http://"):
        if k.startswith(scheme):
            k, had_scheme = k[len(scheme):], True
    if had_scheme:
        # docker's legacy keys carry an API path; podman keeps host/namespace keys bare.
        k = re.sub(r"/v[12]/?$", "", k)
    k = k.rstrip("/")
    if k in ("index.docker.io", "registry-1.docker.io"):
        k = "docker.io"
    elif k.startswith(("index.docker.io/", "registry-1.docker.io/")):
        k = "docker.io/" + k.split("/", 1)[1]
    return k


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            data = f.read(4 << 20)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AuthFileError(f"auth file {path}: {e.strerror}") from None
    if not data.strip():
        return {}
    try:
        doc = json.loads(data)
    except ValueError:
        raise AuthFileError(f"auth file {path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise AuthFileError(f"auth file {path}: not a JSON object")
    return doc


def _decode_entry(entry: object, where: str) -> Optional[Tuple[str, str]]:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            raw = base64.b64decode(str(entry["auth"]), validate=False).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise AuthFileError(f"{where}: the 'auth' field is not base64 of user:password") \
                from None
        if ":" not in raw:
            raise AuthFileError(f"{where}: the 'auth' field is not base64 of user:password")
        user, password = raw.split(":", 1)
        return user, password
    if entry.get("username") is not None and entry.get("password") is not None:
        return str(entry["username"]), str(entry["password"])
    return None


def lookup(host: str, repository: str = "", authfile: Optional[str] = None
           ) -> Optional[Credentials]:
    """Credentials for ``host`` (and ``repository``, for namespaced keys), or None."""
    want = [f"{host}/{repository}"] if repository else []
    parts = repository.split("/") if repository else []
    for i in range(len(parts) - 1, 0, -1):
        want.append(f"{host}/{'/'.join(parts[:i])}")
    want.append(host)
    for path in auth_files(authfile):
        doc = _read_json(path)
        if not doc:
            continue
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            continue
        by_key: Dict[str, Tuple[str, object]] = {}
        for k, v in auths.items():
            by_key.setdefault(normalize_key(str(k)), (str(k), v))
        for key in want:
            if key in by_key:
                orig, entry = by_key[key]
                got = _decode_entry(entry, f"auth file {path}: {orig}")
                if got is not None:
                    return Credentials(got[0], got[1], f"{path} ({orig})")
    return None


def login(host: str, username: str, password: str, authfile: Optional[str] = None) -> str:
    """Store credentials for ``host``; returns the file written."""
    path = default_login_file(authfile)
    doc = _read_json(path) or {}
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    # Drop other spellings of the same key, so that the new entry is the one found.
    for k in [k for k in auths if normalize_key(k) == normalize_key(host)]:
        del auths[k]
    raw = f"{username}:{password}".encode("utf-8")
    auths[host] = {"auth": base64.b64encode(raw).decode("ascii")}
    doc["auths"] = auths
    _write_private(path, json.dumps(doc, indent=1).encode() + b"\n")
    return path


def logout(host: str, authfile: Optional[str] = None) -> Optional[str]:
    """Remove the credentials for ``host``; returns the file changed, or None."""
    path = default_login_file(authfile)
    doc = _read_json(path)
    auths = (doc or {}).get("auths")
    if not isinstance(auths, dict):
        return None
    keys = [k for k in auths if normalize_key(k) == normalize_key(host)]
    if not keys:
        return None
    for k in keys:
        del auths[k]
    _write_private(path, json.dumps(doc, indent=1).encode() + b"\n")
    return path


def _write_private(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise AuthFileError(f"auth file {path}: {e.strerror}") from None


# ---------------------------------------------------------------------- challenges

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclasses.dataclass(frozen=True)
class Challenge:
    scheme: str                    # "basic" or "bearer" (lowercase)
    params: Tuple[Tuple[str, str], ...]

    def get(self, key: str) -> Optional[str]:
        return dict(self.params).get(key)


def parse_challenge(header: Optional[str]) -> Optional[Challenge]:
    """The first Basic or Bearer challenge of a ``WWW-Authenticate`` header."""
    if not header:
        return None
    m = re.match(r"\s*([A-Za-z]+)\s*(.*)$", header, re.S)
    if not m:
        return None
    scheme, rest = m.group(1).lower(), m.group(2)
    params = []
    pos = 0
    while pos < len(rest):
        pm = _PARAM.match(rest, pos)
        if not pm or pm.end() == pos:
            break
        value = pm.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.append((pm.group(1).lower(), value))
        pos = pm.end()
    if scheme not in ("basic", "bearer"):
        return None
    return Challenge(scheme, tuple(params))
