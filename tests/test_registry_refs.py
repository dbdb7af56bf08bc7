"""Registry references, credentials files and authentication challenges (no registry)."""
from __future__ import annotations

import base64
import json
import os

import pytest

from overlayfs_py.image.errors import ImageError
from overlayfs_py.image.registry import auth
from overlayfs_py.image.registry.client import is_localhost
from overlayfs_py.image.registry.reference import normalize, parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,host,repo,tag,digest", [
    ("debian", "docker.io", "library/debian", "latest", None),
    ("debian:12", "docker.io", "library/debian", "12", None),
    ("team/app", "docker.io", "team/app", "latest", None),
    ("docker.io/debian", "docker.io", "library/debian", "latest", None),
    ("index.docker.io/team/app:1", "docker.io", "team/app", "1", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/a/b/c:v1.2", "localhost:5000", "a/b/c", "v1.2", None),
    ("127.0.0.1:5000/app@" + D, "127.0.0.1:5000", "app", None, D),
    ("quay.io/org/app:1@" + D, "quay.io", "org/app", "1", D),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ("docker://ghcr.io/o/p:t", "ghcr.io", "o/p", "t", None),
    ("my-registry.example.com:443/x__y/z-w.v:T_1", "my-registry.example.com:443", "x__y/z-w.v",
     "T_1", None),
])
def test_parse(text, host, repo, tag, digest):
    r = parse(text)
    assert (r.host, r.repository, r.tag, r.digest) == (host, repo, tag, digest)


def test_names_and_api_hosts():
    assert parse("debian").api_host == "registry-1.docker.io"
    assert parse("debian").name == "docker.io/library/debian:latest"
    assert parse("localhost:5000/app@" + D).name == "localhost:5000/app@" + D
    assert parse("[::1]:5000/app").hostname == "::1"
    assert normalize("localhost:5000/app") == "localhost:5000/app:latest"
    assert normalize("Not A Ref") is None


@pytest.mark.parametrize("bad", ["", "UPPER/case", "app:", "app:-x", "http://h/app",
                                 "app@sha256:12", "a//b", "host:5000/"])
def test_parse_refuses(bad):
    with pytest.raises(ImageError):
        parse(bad)


def test_localhost():
    assert is_localhost("localhost") and is_localhost("127.0.0.9") and is_localhost("::1")
    assert not is_localhost("example.com") and not is_localhost("10.0.0.1")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_credentials_lookup_order_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    docker = tmp_path / "home" / ".docker" / "config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hub:hubpw")},
        "quay.io": {"auth": _b64("d:dpw")}}}))
    podman = tmp_path / "run" / "containers" / "auth.json"
    podman.parent.mkdir(parents=True)
    podman.write_text(json.dumps({"auths": {
        "quay.io/team": {"auth": _b64("team:tpw")},
        "quay.io": {"username": "q", "password": "qpw:with:colons"}}}))
    c = auth.lookup("docker.io", "library/debian")
    assert (c.username, c.password) == ("hub", "hubpw") and str(docker) in c.source
    c = auth.lookup("quay.io", "team/app")                      # the namespaced key wins
    assert (c.username, c.password) == ("team", "tpw") and str(podman) in c.source
    c = auth.lookup("quay.io", "other/app")                     # podman's file before docker's
    assert (c.username, c.password) == ("q", "qpw:with:colons")
    assert auth.lookup("ghcr.io", "x") is None
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"auths": {"quay.io": {"auth": _b64("e:epw")}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert auth.lookup("quay.io", "team/app").username == "e"
    assert auth.lookup("quay.io", "x", authfile=str(docker)).username == "d"
    explicit.write_text("{not json")
    with pytest.raises(ImageError, match="not valid JSON"):
        auth.lookup("quay.io", "x")


def test_login_writes_podmans_file_privately(tmp_path, monkeypatch):
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    f = tmp_path / "run" / "containers" / "auth.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"auths": {"http://h:5000": {"auth": _b64("old:o")},
                                       "other": {"auth": _b64("k:k")}}, "x": 1}))
    assert auth.login("h:5000", "u", "p:w") == str(f)
    doc = json.loads(f.read_text())
    assert doc["x"] == 1 and set(doc["auths"]) == {"h:5000", "other"}
    assert auth.lookup("h:5000").password == "p:w"
    assert os.stat(f).st_mode & 0o777 == 0o600
    assert auth.logout("h:5000") == str(f)
    assert auth.lookup("h:5000") is None and auth.logout("h:5000") is None


def test_challenges():
    c = auth.parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                             'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer" and c.get("realm") == "https://auth.example/token"
    assert c.get("service") == "reg" and c.get("scope") == "repository:a/b:pull,push"
    c = auth.parse_challenge('Basic realm="test realm"')
    assert c.scheme == "basic" and c.get("realm") == "test realm"
    assert auth.parse_challenge("Negotiate abc") is None
    assert auth.parse_challenge(None) is None
