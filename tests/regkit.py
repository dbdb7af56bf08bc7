"""A real registry for the registry tests: Debian's ``docker-registry`` (distribution 2.8),
started on 127.0.0.1 with a temporary config and storage, and small HTTP helpers.

* ``ensure_tools()`` installs docker-registry, skopeo and apache2-utils (htpasswd) with
  apt-get when missing (idempotent), or raises ``Unavailable``.
* ``RegistryServer(root, htpasswd=None)``: ``start()`` runs ``docker-registry serve`` on a
  free port (access log kept, so a test can count requests: ``requests("GET", "/blobs/")``),
  ``stop()`` ends it by its pid. ``.host`` is ``127.0.0.1:PORT``.
* ``skopeo(*args)``: skopeo with a permissive private policy (the machine's may be absent).
* ``Proxy(upstream, flip_blob_byte=N, content_type=...)``: a small HTTP proxy in front of
  the registry that can corrupt blob bodies of N bytes or more (one bit flipped), rewrite the manifest's Content-Type; it also
  serves forward-proxy requests (absolute URIs), counting them, for the ``HTTP_PROXY`` test.
* ``TokenProxy(upstream, credentials=None)``: a bearer-token front of the registry (a
  ``/token`` realm, 401 challenges with a scope, tokens checked per repository and action).
* ``Silent()``: a TCP port that accepts connections and never answers (timeouts).
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import List, Optional, Sequence

REGISTRY_BIN = "/usr/bin/docker-registry"
TOOLS = {REGISTRY_BIN: "docker-registry", "skopeo": "skopeo", "htpasswd": "apache2-utils"}


class Unavailable(Exception):
    pass


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise Unavailable("the registry tests install and run docker-registry as root")
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if not shutil.which(cmd)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    still = [c for c in TOOLS if not shutil.which(c)]
    if still:
        raise Unavailable(f"cannot install {missing}: {r.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_file(path: Path, user: str, password: str) -> Path:
    r = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True,
                       check=True)
    path.write_text(r.stdout.strip() + "\n")
    return path


class RegistryServer:
    def __init__(self, root: Path, htpasswd: Optional[Path] = None,
                 storage: Optional[Path] = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.htpasswd = htpasswd
        self._storage = storage
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log = self.root / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        """(another server's storage may be shared: same images, other auth)"""
        return self._storage or self.root / "storage"

    def _config(self) -> str:
        auth = ""
        if self.htpasswd:
            auth = f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {self.htpasswd}\n"
        return (f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                f"  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n{auth}")

    def start(self) -> "RegistryServer":
        for _attempt in range(5):
            self.port = free_port()
            (self.root / "config.yml").write_text(self._config())
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.root / "config.yml")],
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            logf.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                    c.request("GET", "/v2/")
                    status = c.getresponse().status
                    c.close()
                    if status in (200, 401):
                        return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def requests(self, method: str, path_part: str, status: Optional[int] = None) -> List[str]:
        """Access-log request lines with this method whose path contains ``path_part``."""
        out = []
        pat = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')
        for line in self.log.read_text(errors="replace").splitlines():
            m = pat.search(line)
            if m and m.group(1) == method and path_part in m.group(2) and \
                    (status is None or int(m.group(3)) == status):
                out.append(m.group(2))
        return out

    def blob_gets(self) -> List[str]:
        """Digests of the blobs served so far (GET .../blobs/sha256:..., 200 or 206)."""
        return [p.rsplit("/", 1)[1] for s in (200, 206)
                for p in self.requests("GET", "/blobs/sha256:", s)]


def skopeo(*args: str, policy_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    policy = Path(policy_dir) / "policy.json"
    if not policy.exists():
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    r = subprocess.run(["skopeo", "--policy", str(policy), *args], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {r.stderr[-2000:]}")
    return r


# ---------------------------------------------------------------------- proxies

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _relay(self):
        srv: "Proxy" = self.server.owner                      # type: ignore[attr-defined]
        path = self.path
        forward = path.startswith("http://")
        if forward:
            srv.forwarded.append(path)
            u = urllib.parse.urlsplit(path)
            host, port = u.hostname, u.port or 80
            path = urllib.parse.urlunsplit(("", "", u.path, u.query, ""))
        else:
            host, port = "127.0.0.1", srv.upstream_port
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "proxy-connection")}
        headers["Host"] = f"{host}:{port}"
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request(self.command, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        if srv.flip_blob_byte and self.command == "GET" and "/blobs/sha256:" in path and \
                len(data) >= srv.flip_blob_byte:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
            srv.corrupted.append(path)
        self.send_response(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() in ("content-length", "connection", "transfer-encoding"):
                continue
            if k.lower() == "content-type" and srv.content_type and "/manifests/" in path:
                v = srv.content_type
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _relay

    def do_CONNECT(self):
        self.send_response(405, "no CONNECT here")
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Proxy:
    def __init__(self, upstream_port: int, *, flip_blob_byte: int = 0,
                 content_type: Optional[str] = None):
        self.upstream_port = upstream_port
        self.flip_blob_byte = flip_blob_byte
        self.content_type = content_type
        self.corrupted: List[str] = []
        self.forwarded: List[str] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.owner = self                              # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Silent:
    """Accepts TCP connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                c, _ = self.sock.accept()
                self.conns.append(c)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def tree(root: Path, skip: Sequence[str] = ()) -> dict:
    """path -> (type, mode, uid, gid, size, sha256 or link target, mtime for non-dirs)."""
    import hashlib
    import stat as st
    out = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            kind = st.S_IFMT(s.st_mode)
            extra = None
            if st.S_ISREG(s.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
                extra = h.hexdigest()
            elif st.S_ISLNK(s.st_mode):
                extra = os.readlink(p)
            elif st.S_ISCHR(s.st_mode) or st.S_ISBLK(s.st_mode):
                extra = s.st_rdev
            out[rel] = (kind, st.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                        s.st_size if st.S_ISREG(s.st_mode) else 0, extra,
                        None if st.S_ISDIR(s.st_mode) else int(s.st_mtime))
    return out


class _TokenHandler(_Handler):
    """Bearer-token front of a registry: ``/token`` hands out tokens (checking Basic
    credentials if the proxy has any), everything else needs a token whose scope covers the
    request, and is relayed to the registry."""

    def _relay(self):
        srv: "TokenProxy" = self.server.owner                 # type: ignore[attr-defined]
        u = urllib.parse.urlsplit(self.path)
        if u.path == "/token":
            q = urllib.parse.parse_qs(u.query)
            srv.token_requests.append(q)
            if srv.credentials is not None:
                want = "Basic " + __import__("base64").b64encode(
                    ":".join(srv.credentials).encode()).decode()
                if self.headers.get("Authorization") != want:
                    return self._answer(401, b'{"details":"bad credentials"}')
            scope = q.get("scope", [""])[0]
            body = ('{"token": "tok %s"}' % scope).encode()
            return self._answer(200, body)
        m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags)/", u.path)
        auth = self.headers.get("Authorization", "")
        if m:
            repo = m.group(1)
            need = "push" if self.command in ("PUT", "POST", "PATCH", "DELETE") else "pull"
            scope = auth[len("Bearer tok "):] if auth.startswith("Bearer tok ") else ""
            parts = scope.split(":")
            ok = len(parts) == 3 and parts[1] == repo and need in parts[2].split(",")
            if not ok:
                srv.challenged += 1
                return self._answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                    "WWW-Authenticate": f'Bearer realm="http://{srv.host}/token",'
                                        f'service="test-registry",'
                                        f'scope="repository:{repo}:{need}"'})
        elif u.path in ("/v2/", "/v2") and not auth.startswith("Bearer "):
            return self._answer(401, b"{}", {
                "WWW-Authenticate": f'Bearer realm="http://{srv.host}/token",'
                                    f'service="test-registry"'})
        return super()._relay()

    def _answer(self, status, body, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _relay


class TokenProxy(Proxy):
    def __init__(self, upstream_port: int, credentials: Optional[tuple] = None):
        self.upstream_port = upstream_port
        self.flip_blob_byte = 0
        self.content_type = None
        self.corrupted: List[str] = []
        self.forwarded: List[str] = []
        self.credentials = credentials
        self.token_requests: List[dict] = []
        self.challenged = 0
        self.server = _Server(("127.0.0.1", 0), _TokenHandler)
        self.server.owner = self                              # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
