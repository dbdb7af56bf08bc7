"""Registries: pull and push images over the OCI distribution API (``/v2/``).

Modules, one per concern: ``reference`` (``[HOST[:PORT]/]REPO[:TAG|@DIGEST]`` and its
defaults), ``auth`` (credentials from podman's and docker's files, ``login``, challenges),
``client`` (HTTP transport on requests/urllib3: TLS, proxies, retries, resumable blob
streams, authentication, errors; blob uploads), ``pull`` (registry -> store), ``push``
(layout -> registry). The store side (``..store``) is the image half's, shared.

Public API::

    pull(reference, store=None, platform=None, options=None, progress=None) -> Pulled
    push(source, reference, options=None, progress=None) -> Pushed
    login(host, username, password, authfile=None, options=None) -> str (the file written)
    logout(host, authfile=None) -> Optional[str]
    Options(authfile=, username=, password=, insecure=, timeout=, retries=, jobs=, ...)
"""
from __future__ import annotations

import importlib
from typing import Optional

from . import auth as _auth

# The names below load their module on first use (PEP 562): ``client`` imports requests and
# urllib3, a tenth of a second or more that every image command paid at start-up because
# the command line registers the registry commands.
_LAZY = {
    "AuthError": ("client", "AuthError"), "ConnectError": ("client", "ConnectError"),
    "Options": ("client", "Options"), "Registry": ("client", "Registry"),
    "RegistryError": ("client", "RegistryError"),
    "RegistryNotFound": ("client", "RegistryNotFound"),
    "TimeoutError_": ("client", "TimeoutError_"),
    "Pulled": ("pull", "Pulled"), "pull": ("pull", "pull"),
    "Pushed": ("push", "Pushed"), "push": ("push", "push"),
    "RegistryRef": ("reference", "RegistryRef"), "parse_reference": ("reference", "parse"),
}


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def login(host: str, username: str, password: str, *, authfile: Optional[str] = None,
          options: Optional[Options] = None, check: bool = True) -> str:
    """Check the credentials against the registry (unless ``check`` is false), then store
    them for ``host`` in the auth file (see ``auth``); returns the file written."""
    from .client import Options, Registry, check_credentials
    host = _auth.normalize_key(host).split("/", 1)[0]
    if check:
        ref_host = host
        from .reference import API_HOSTS
        reg = Registry(ref_host, API_HOSTS.get(ref_host, ref_host), options or Options())
        try:
            check_credentials(reg, _auth.Credentials(username, password, "the command line"))
        finally:
            reg.close()
    return _auth.login(host, username, password, authfile)


def logout(host: str, *, authfile: Optional[str] = None) -> Optional[str]:
    return _auth.logout(_auth.normalize_key(host).split("/", 1)[0], authfile)


__all__ = ["AuthError", "ConnectError", "Options", "Pulled", "Pushed", "Registry",
           "RegistryError", "RegistryNotFound", "RegistryRef", "TimeoutError_", "login",
           "logout", "parse_reference", "pull", "push"]
