"""One registry's HTTP API (OCI distribution spec ``/v2/``): transport, authentication,
retries and errors. ``pull`` and ``push`` speak through ``Registry``.

Transport: ``requests`` on ``urllib3`` (see the README for why). One ``Session`` per registry
(its connection pool is shared by the download threads); proxies come from the environment
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``); TLS is verified against the system's
trust store, plus ``/etc/containers/certs.d/HOST[:PORT]/*.crt`` as podman reads it.
``urllib3.Retry`` retries failed connections, read errors of idempotent requests and 429/5xx
answers a bounded number of times with exponential backoff (``Retry-After`` honoured); a blob
download that breaks off mid-stream is resumed with a ``Range`` request from the byte it got
to, the same bounded number of times. Whatever still fails is one line naming the host and
the problem (unknown host, connection refused, timed out after N attempts, TLS, ...).

Plain HTTP: only for hosts named insecure (``--insecure-registry``,
``$OVERLAYFS_PY_INSECURE_REGISTRIES``, or ``insecure = true`` in ``registries.conf``) and for
localhost (``localhost``, ``127.0.0.0/8``, ``::1``), as docker does: HTTPS is tried first
(certificate not checked for those hosts), then HTTP.

Authentication: requests go out anonymous (or with the token got earlier for that scope); a
``401`` with a ``WWW-Authenticate`` challenge is answered once: ``Basic`` with the
credentials from ``auth``, ``Bearer`` by asking the challenge's realm for a token for
``repository:NAME:pull[,push]`` (with the credentials, when there are any). A second 401 or a
403 is an ``AuthError`` that says which credentials were tried.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import ipaddress
import logging
import os
import threading
import time
import urllib.parse
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ..errors import DigestMismatch, ImageError, NotFound
from . import auth as _auth

log = logging.getLogger("overlayfs_py.image.registry")

INSECURE_ENV = "OVERLAYFS_PY_INSECURE_REGISTRIES"
REGISTRIES_CONF = ("/etc/containers/registries.conf",)
CERTS_D = ("/etc/containers/certs.d", "/etc/docker/certs.d")
CHUNK = 1 << 20


def _user_agent() -> str:
    try:
        from importlib.metadata import version
        return f"overlayfs-py/{version('overlayfs-py')}"
    except Exception:                    # not installed (running from a source tree)
        return "overlayfs-py"


USER_AGENT = _user_agent()


class RegistryError(ImageError):
    """A registry could not be reached or refused what was asked."""


class ConnectError(RegistryError):
    """Unknown host, refused connection, TLS failure, proxy failure."""


class TimeoutError_(RegistryError):
    """No answer in time, after the bounded retries."""


class AuthError(RegistryError):
    """401 or 403: the credentials tried (or none) are not good enough."""


class RegistryNotFound(NotFound):
    """404: no such repository, tag, manifest or blob."""


class Cancelled(Exception):
    """The pull was stopped (another layer failed, or Ctrl-C)."""


@dataclasses.dataclass
class Options:
    """How to talk to registries (all optional)."""
    authfile: Optional[str] = None
    username: Optional[str] = None         # with password: used instead of the auth files
    password: Optional[str] = None
    insecure: Sequence[str] = ()           # hosts where plain HTTP / unverified TLS is ok
    timeout: float = 30.0                  # seconds, per connect and per read
    retries: int = 3                       # bounded retries of a failed request or stream
    backoff: float = 0.5                   # seconds; doubles with each retry
    chunk_size: int = 32 << 20             # push: blobs above this go in PATCH chunks
    jobs: int = 3                          # parallel layer downloads / uploads


def _env_insecure() -> List[str]:
    return [h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",") if h.strip()]


def _conf_insecure() -> List[str]:
    """Locations with ``insecure = true`` in registries.conf (v2 TOML format)."""
    paths = [os.environ["CONTAINERS_REGISTRIES_CONF"]] \
        if os.environ.get("CONTAINERS_REGISTRIES_CONF") else list(REGISTRIES_CONF)
    out: List[str] = []
    for path in paths:
        try:
            import tomllib
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, ValueError):
            continue
        for reg in doc.get("registry", []) if isinstance(doc.get("registry"), list) else []:
            if isinstance(reg, dict) and reg.get("insecure") is True:
                loc = str(reg.get("location") or reg.get("prefix") or "")
                if loc:
                    out.append(loc.split("/", 1)[0])
    return out


def is_localhost(hostname: str) -> bool:
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(hostname).is_loopback
    return False


def _split_hostport(host: str) -> Tuple[str, Optional[str]]:
    if host.startswith("["):
        end = host.index("]")
        rest = host[end + 1:]
        return host[1:end], rest[1:] if rest.startswith(":") else None
    if ":" in host:
        h, p = host.rsplit(":", 1)
        return h, p
    return host, None


def _describe_exception(exc: BaseException) -> Tuple[type, str]:
    """(error class, reason) for a requests/urllib3 failure."""
    seen = []
    e: Optional[BaseException] = exc
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
            e = e.reason
            continue
        nxt = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
        if nxt is None:
            nxt = e.__cause__ or e.__context__
        e = nxt
    for e in seen:
        if isinstance(e, urllib3.exceptions.NameResolutionError):
            return ConnectError, "unknown host (the name does not resolve)"
        if isinstance(e, ConnectionRefusedError):
            return ConnectError, "connection refused"
        if isinstance(e, urllib3.exceptions.NewConnectionError):
            # (a subclass of ConnectTimeoutError in urllib3, hence first)
            if "refused" in str(e).lower():
                return ConnectError, "connection refused"
            if "timed out" not in str(e).lower():
                return ConnectError, f"cannot connect ({_last_words(e)})"
        if isinstance(e, (urllib3.exceptions.ConnectTimeoutError,
                          requests.exceptions.ConnectTimeout)):
            return TimeoutError_, "connection timed out"
        if isinstance(e, (urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout)):
            return TimeoutError_, "timed out waiting for the registry's answer"
        if isinstance(e, (urllib3.exceptions.ProxyError, requests.exceptions.ProxyError)):
            return ConnectError, f"proxy error ({_last_words(e)})"
        if isinstance(e, (urllib3.exceptions.SSLError, requests.exceptions.SSLError)):
            return ConnectError, f"TLS error ({_last_words(e)})"
    return ConnectError, f"connection failed ({_last_words(seen[-1])})"


def _last_words(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[-160:] if len(text) > 160 else text


def _registry_errors(resp: requests.Response) -> str:
    """The ``errors`` codes of a registry's JSON answer, e.g. ``MANIFEST_UNKNOWN``."""
    try:
        doc = resp.json()
    except ValueError:
        return ""
    errs = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errs, list):
        return ""
    return ", ".join(str(e.get("code") or e.get("message"))
                     for e in errs if isinstance(e, dict))


class Registry:
    """One registry host: ``request()`` with auth and retries; blob and manifest calls."""

    def __init__(self, host: str, api_host: Optional[str] = None,
                 options: Optional[Options] = None):
        self.host = host                            # as named (for credentials, messages)
        self.api_host = api_host or host
        self.options = options or Options()
        hostname, _port = _split_hostport(self.api_host)
        insecure = {h.strip() for h in list(self.options.insecure) + _env_insecure()
                    + _conf_insecure()}
        self.insecure = (self.host in insecure or self.api_host in insecure
                         or hostname in insecure or is_localhost(hostname))
        self.session = self._session(self.options.retries)
        self._base: Optional[str] = None
        self._auth: Dict[str, str] = {}             # scope -> Authorization header
        self._challenge: Optional[_auth.Challenge] = None
        self._lock = threading.Lock()
        self._creds_loaded = False
        self._creds: Optional[_auth.Credentials] = None

    # ------------------------------------------------------------------ transport
    def _session(self, retries: int) -> requests.Session:
        s = requests.Session()
        retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                      other=0, redirect=5, backoff_factor=self.options.backoff,
                      status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False,
                      respect_retry_after_header=True)
        adapter = HTTPAdapter(max_retries=retry, pool_connections=4,
                              pool_maxsize=max(4, self.options.jobs + 2))
        s.mount("https://", adapter)
        s.mount("http://", adapter)
        s.headers["User-Agent"] = USER_AGENT
        s.verify = self._verify()
        return s

    def _verify(self):
        """False for insecure hosts; else a CA bundle from certs.d if there is one, else
        True (the default trust store)."""
        if self.insecure:
            return False
        for base in CERTS_D:
            for name in (self.api_host, self.host):
                crts = sorted(glob.glob(os.path.join(base, name, "*.crt")))
                if crts:
                    return crts[0]
        return True

    def close(self) -> None:
        self.session.close()

    def _timeout(self) -> Tuple[float, float]:
        return (self.options.timeout, self.options.timeout)

    def _send(self, method: str, url: str, **kw) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self._timeout(), **kw)
        except requests.exceptions.RequestException as e:
            cls, why = _describe_exception(e)
            tries = self.options.retries + 1
            if cls is TimeoutError_:
                why += f" ({tries} attempts, {self.options.timeout:g} s each)"
            raise cls(f"registry {self.host}: {why}") from None

    def base_url(self) -> str:
        """``https://host`` or, for insecure hosts that do not speak TLS, ``http://host``."""
        if self._base is not None:
            return self._base
        with self._lock:
            if self._base is None:
                self._base = self._probe()
        return self._base

    def _probe(self) -> str:
        https = f"https://{self.api_host}"
        if not self.insecure:
            self._ping(self.session, https)
            return https
        quick = self._session(0)
        try:
            self._ping(quick, https)
            return https
        except ConnectError as e:
            log.debug("registry %s: HTTPS failed (%s); trying HTTP", self.host, e)
        finally:
            quick.close()
        http = f"http://{self.api_host}"
        self._ping(self.session, http)
        return http

    def _ping(self, session: requests.Session, base: str) -> None:
        try:
            r = session.get(f"{base}/v2/", timeout=self._timeout())
        except requests.exceptions.RequestException as e:
            cls, why = _describe_exception(e)
            if cls is TimeoutError_:
                why += f" ({self.options.retries + 1} attempts, {self.options.timeout:g} s each)"
            raise cls(f"registry {self.host}: {why}") from None
        with r:
            if r.status_code == 401:
                self._challenge = _auth.parse_challenge(r.headers.get("WWW-Authenticate"))
                return
            if r.status_code == 200:
                return
            if r.status_code in (404, 400) and "Docker-Distribution-Api-Version" not in r.headers:
                raise ConnectError(f"registry {self.host}: {base}/v2/ answers {r.status_code}: "
                                   "not a container registry")
            if r.status_code >= 500:
                raise RegistryError(f"registry {self.host}: {base}/v2/ answers "
                                    f"{r.status_code} {r.reason}")

    # ------------------------------------------------------------------ auth
    def credentials(self, repository: str = "") -> Optional[_auth.Credentials]:
        if self.options.username is not None:
            return _auth.Credentials(self.options.username, self.options.password or "",
                                     "the command line")
        return _auth.lookup(self.host, repository, self.options.authfile)

    def _tried(self, creds: Optional[_auth.Credentials]) -> str:
        if creds is None:
            files = ", ".join(_auth.auth_files(self.options.authfile))
            return f"no credentials (anonymous; none for {self.host} in {files})"
        return f"credentials tried: {creds.describe()}"

    def _authorize(self, challenge: _auth.Challenge, scope: str, repository: str) -> str:
        creds = self.credentials(repository)
        if challenge.scheme == "basic":
            if creds is None:
                raise AuthError(f"registry {self.host}: {repository}: 401 unauthorized: "
                                f"{self._tried(None)}; log in with 'overlayfs-py image login "
                                f"{self.host}'")
            return creds.basic()
        realm = challenge.get("realm")
        if not realm:
            raise AuthError(f"registry {self.host}: a Bearer challenge without a realm")
        params = {"scope": scope}
        if challenge.get("service"):
            params["service"] = challenge.get("service")
        headers = {"Authorization": creds.basic()} if creds else {}
        try:
            r = self.session.get(realm, params=params, headers=headers,
                                 timeout=self._timeout())
        except requests.exceptions.RequestException as e:
            cls, why = _describe_exception(e)
            raise cls(f"registry {self.host}: token server {realm}: {why}") from None
        with r:
            if r.status_code in (401, 403):
                raise AuthError(f"registry {self.host}: {repository}: the token server refused "
                                f"({r.status_code}): {self._tried(creds)}")
            if r.status_code != 200:
                raise AuthError(f"registry {self.host}: token server {realm} answers "
                                f"{r.status_code} {r.reason}")
            try:
                doc = r.json()
                token = doc.get("token") or doc.get("access_token")
            except (ValueError, AttributeError):
                token = None
        if not token or not isinstance(token, str):
            raise AuthError(f"registry {self.host}: token server {realm} gave no token")
        return f"Bearer {token}"

    def request(self, method: str, repository: str, path: str, *,
                actions: Sequence[str] = ("pull",), url: Optional[str] = None,
                headers: Optional[Dict[str, str]] = None, body: Optional[Callable] = None,
                stream: bool = False, params: Optional[dict] = None) -> requests.Response:
        """``METHOD /v2/<repository>/<path>`` (or ``url``), authenticating as needed.
        ``body()`` makes the request body afresh (it may be sent twice, after a 401).
        Returns the response whatever its status, except 401/403 (AuthError)."""
        scope = f"repository:{repository}:{','.join(actions)}"
        target = url or f"{self.base_url()}/v2/{repository}/{path}"
        for attempt in (1, 2):
            h = dict(headers or {})
            with self._lock:
                token = self._auth.get(scope)
            if token:
                h["Authorization"] = token
            kw = {"headers": h, "stream": stream, "params": params, "allow_redirects": True}
            if body is not None:
                kw["data"] = body()
            r = self._send(method, target, **kw)
            if r.status_code not in (401, 403):
                return r
            challenge = _auth.parse_challenge(r.headers.get("WWW-Authenticate"))
            status = f"{r.status_code} {'unauthorized' if r.status_code == 401 else 'forbidden'}"
            r.close()
            creds = self.credentials(repository)
            if r.status_code == 403 or attempt == 2 or challenge is None:
                raise AuthError(f"registry {self.host}: {repository}: {status} "
                                f"({' '.join(actions)}): {self._tried(creds)}")
            value = self._authorize(challenge, scope, repository)
            with self._lock:
                self._auth[scope] = value
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ errors
    def fail(self, r: requests.Response, what: str) -> None:
        """Raise the error that a non-2xx answer to ``what`` means."""
        codes = _registry_errors(r)
        detail = f" ({codes})" if codes else ""
        r.close()
        if r.status_code == 404:
            raise RegistryNotFound(f"registry {self.host}: {what}: not found{detail}")
        if r.status_code in (401, 403):
            raise AuthError(f"registry {self.host}: {what}: {r.status_code}{detail}")
        raise RegistryError(f"registry {self.host}: {what}: {r.status_code} {r.reason}{detail}")

    # ------------------------------------------------------------------ manifests and blobs
    def get_manifest(self, repository: str, reference: str, accept: Iterable[str]
                     ) -> Tuple[bytes, str, Optional[str]]:
        """(bytes, media type, the registry's Docker-Content-Digest) of a manifest."""
        r = self.request("GET", repository, f"manifests/{reference}",
                         headers={"Accept": ", ".join(accept)})
        if r.status_code != 200:
            if r.status_code == 404:
                codes = _registry_errors(r)
                r.close()
                kind = "no manifest" if reference.startswith("sha") else "no tag"
                if "NAME_UNKNOWN" in codes:
                    raise RegistryNotFound(f"registry {self.host}: no repository "
                                           f"{repository!r}")
                raise RegistryNotFound(f"registry {self.host}: {kind} {reference!r} in "
                                       f"repository {repository!r} (404 {codes or 'not found'})")
            self.fail(r, f"{repository}: manifest {reference}")
        with r:
            data = r.content
            if len(data) > 8 << 20:
                raise RegistryError(f"registry {self.host}: manifest {reference}: too large")
        ctype = (r.headers.get("Content-Type") or "").split(";", 1)[0].strip()
        return data, ctype, r.headers.get("Docker-Content-Digest")

    def has_blob(self, repository: str, digest: str, actions=("pull",)) -> bool:
        r = self.request("HEAD", repository, f"blobs/{digest}", actions=actions)
        r.close()
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        self.fail(r, f"{repository}: blob {digest}")
        return False

    def get_blob_bytes(self, repository: str, digest: str, limit: int) -> bytes:
        r = self.request("GET", repository, f"blobs/{digest}", stream=True)
        if r.status_code != 200:
            if r.status_code == 404:
                r.close()
                raise RegistryNotFound(f"registry {self.host}: {repository}: blob {digest} "
                                       "not found")
            self.fail(r, f"{repository}: blob {digest}")
        with r:
            data = r.raw.read(limit + 1, decode_content=True)
        return data

    def open_blob(self, repository: str, digest: str, size: Optional[int],
                  cancel: Optional[threading.Event] = None, on_bytes=None) -> "BlobStream":
        return BlobStream(self, repository, digest, size, cancel, on_bytes)


class BlobStream:
    """A blob's bytes as a ``read(n)`` stream (unverified: the reader verifies); breaks are
    resumed with ``Range`` requests, at most ``retries`` times."""

    def __init__(self, registry: Registry, repository: str, digest: str, size: Optional[int],
                 cancel: Optional[threading.Event], on_bytes):
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.size = size
        self.cancel = cancel
        self.on_bytes = on_bytes
        self.pos = 0
        self.resumes = 0
        self.resp: Optional[requests.Response] = None
        self._skip = 0
        self._open()

    def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        r = self.registry.request("GET", self.repository, f"blobs/{self.digest}",
                                  headers=headers, stream=True)
        if r.status_code == 404:
            r.close()
            raise RegistryNotFound(f"registry {self.registry.host}: {self.repository}: blob "
                                   f"{self.digest} not found")
        if r.status_code not in (200, 206):
            self.registry.fail(r, f"{self.repository}: blob {self.digest}")
        self._skip = self.pos if (self.pos and r.status_code == 200) else 0
        self.resp = r

    def _raw_read(self, n: int) -> bytes:
        assert self.resp is not None
        while True:
            b = self.resp.raw.read(n, decode_content=True)
            if self._skip and b:
                cut = min(self._skip, len(b))
                b, self._skip = b[cut:], self._skip - cut
                if not b:
                    continue
            return b

    def read(self, n: int = CHUNK) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled()
            try:
                b = self._raw_read(n)
                if not b and self.size is not None and self.pos < self.size:
                    raise urllib3.exceptions.ProtocolError("the blob ended early")
            except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException,
                    OSError) as e:
                self._resume(e)
                continue
            self.pos += len(b)
            if self.on_bytes is not None and b:
                self.on_bytes(len(b))
            return b

    def _resume(self, e: BaseException) -> None:
        self.close()
        self.resumes += 1
        if self.resumes > self.registry.options.retries:
            cls, why = _describe_exception(e)
            raise cls(f"registry {self.registry.host}: blob {self.digest}: {why}, after "
                      f"{self.resumes} attempts") from None
        log.debug("blob %s broke off at %d (%s); resuming", self.digest, self.pos, e)
        time.sleep(self.registry.options.backoff * (2 ** (self.resumes - 1)))
        self._open()

    def close(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- uploads and login

class _CountingFile:
    """A file as a request body: ``len()`` gives requests the Content-Length, ``read``
    reports progress."""

    def __init__(self, f, size: int, on_bytes=None):
        self.f = f
        self.left = size
        self.on_bytes = on_bytes

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n if n and n > 0 else CHUNK)
        self.left -= len(b)
        if b and self.on_bytes is not None:
            self.on_bytes(len(b))
        return b


def _with_digest(location: str, digest: str) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={urllib.parse.quote(digest, safe='')}"


def _upload_once(reg: Registry, repository: str, digest: str, size: int, open_fn,
                 on_bytes) -> None:
    push = ("pull", "push")
    r = reg.request("POST", repository, "blobs/uploads/", actions=push,
                    headers={"Content-Length": "0"})
    if r.status_code != 202 or not r.headers.get("Location"):
        reg.fail(r, f"{repository}: starting the upload of blob {digest}")
    r.close()
    loc = urllib.parse.urljoin(reg.base_url() + "/", r.headers["Location"])
    what = f"{repository}: upload of blob {digest}"
    if size <= reg.options.chunk_size:
        opened = []

        def body():
            for f in opened:
                f.close()
            f = open_fn()
            opened.append(f)
            return _CountingFile(f, size, on_bytes)
        try:
            r = reg.request("PUT", repository, "", url=_with_digest(loc, digest), actions=push,
                            headers={"Content-Type": "application/octet-stream"}, body=body)
        finally:
            for f in opened:
                f.close()
    else:
        with open_fn() as f:
            offset = 0
            while offset < size:
                chunk = f.read(reg.options.chunk_size)
                if not chunk:
                    raise ImageError(f"{what}: the blob is shorter than its {size} bytes")
                r = reg.request("PATCH", repository, "", url=loc, actions=push,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
                                body=lambda chunk=chunk: chunk)
                if r.status_code != 202:
                    reg.fail(r, f"{what} (chunk at {offset})")
                r.close()
                loc = urllib.parse.urljoin(loc, r.headers.get("Location") or loc)
                offset += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        r = reg.request("PUT", repository, "", url=_with_digest(loc, digest), actions=push,
                        headers={"Content-Type": "application/octet-stream"}, body=lambda: b"")
    if r.status_code not in (201, 204):
        reg.fail(r, what)
    r.close()
    got = r.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise DigestMismatch(f"registry {reg.host}: {what}: the registry stored it as {got}")


def upload_blob(reg: Registry, repository: str, digest: str, size: int, open_fn,
                on_bytes=None) -> bool:
    """Upload a blob unless the registry has it (HEAD); monolithic (one PUT) up to
    ``Options.chunk_size``, chunked (PATCHes, then a PUT) above. Returns True if uploaded.
    A broken connection restarts the upload, at most ``Options.retries`` times."""
    if reg.has_blob(repository, digest, actions=("pull", "push")):
        return False
    attempt = 0
    while True:
        try:
            _upload_once(reg, repository, digest, size, open_fn, on_bytes)
            return True
        except (ConnectError, TimeoutError_):
            attempt += 1
            if attempt > reg.options.retries:
                raise
            time.sleep(reg.options.backoff * (2 ** (attempt - 1)))


def put_manifest(reg: Registry, repository: str, reference: str, media_type: str,
                 data: bytes) -> str:
    """PUT a manifest or index under a tag or its digest; returns its digest."""
    r = reg.request("PUT", repository, f"manifests/{reference}", actions=("pull", "push"),
                    headers={"Content-Type": media_type}, body=lambda: data)
    if r.status_code not in (200, 201, 202):
        reg.fail(r, f"{repository}: manifest {reference}")
    r.close()
    return r.headers.get("Docker-Content-Digest") or ""


def check_credentials(reg: Registry, creds: _auth.Credentials) -> None:
    """What ``login`` checks: the registry accepts ``creds`` (AuthError if not)."""
    base = reg.base_url()
    ch = reg._challenge
    if ch is None:
        return                                      # the registry asks for no credentials
    if ch.scheme == "basic":
        r = reg._send("GET", f"{base}/v2/", headers={"Authorization": creds.basic()})
        r.close()
        if r.status_code in (401, 403):
            raise AuthError(f"registry {reg.host}: login refused ({r.status_code}): "
                            f"credentials tried: {creds.describe()}")
        return
    realm = ch.get("realm")
    params = {"service": ch.get("service")} if ch.get("service") else {}
    try:
        r = reg.session.get(realm, params=params, headers={"Authorization": creds.basic()},
                            timeout=reg._timeout())
    except requests.exceptions.RequestException as e:
        cls, why = _describe_exception(e)
        raise cls(f"registry {reg.host}: token server {realm}: {why}") from None
    r.close()
    if r.status_code in (401, 403):
        raise AuthError(f"registry {reg.host}: login refused ({r.status_code}): credentials "
                        f"tried: {creds.describe()}")
    if r.status_code != 200:
        raise AuthError(f"registry {reg.host}: token server {realm} answers {r.status_code}")
