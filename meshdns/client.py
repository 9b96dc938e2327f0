"""A client of the meshdns HTTP API (the ``apply``, ``get`` and ``resolve`` commands).

Standard library only (urllib). Proxies are chosen here, never left to urllib's
defaults:

- a loopback server (127.0.0.0/8, ::1, ``localhost``) and a ``NO_PROXY`` host are
  reached directly;
- a request carrying a token over plain ``http://`` is sent directly, never through
  ``HTTP_PROXY``: the proxy would read the token in clear text;
- otherwise the environment's proxy is used (``HTTPS_PROXY`` for ``https://``,
  a CONNECT tunnel, so the token stays inside TLS).

Redirects are not followed: the API never sends one, and following it would carry
the token to another host.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

SCHEMES = ("http", "https")


class ClientError(Exception):
    """A request that failed: printed as ``meshdns <command>: <message>``, exit 1."""


def server_url(text: str) -> str:
    """``--server``: ``http[s]://HOST:PORT`` or ``HOST:PORT`` (http assumed), without a
    trailing slash; ClientError naming the option otherwise."""
    value = text.strip()
    if "://" not in value:
        value = "http://" + value
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise ClientError(f"--server {text!r}: {exc}") from None
    if url.scheme not in SCHEMES or not url.hostname:
        raise ClientError(f"--server must be HOST:PORT or http(s)://HOST:PORT, got {text!r}")
    return value.rstrip("/")


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def proxies_for(url: str, token: bool) -> dict[str, str]:
    """The proxies for one request to ``url`` ({} for direct), from the environment's
    ``*_proxy`` variables: see the module docstring."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if is_loopback(host):
        return {}
    env = urllib.request.getproxies_environment()
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if urllib.request.proxy_bypass(netloc):  # NO_PROXY (on Linux: the environment)
        return {}
    if token and parts.scheme == "http":
        return {}
    return {scheme: env[scheme] for scheme in SCHEMES if scheme in env}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx reply is raised as an HTTPError


class ApiClient:
    """``request(method, path, body)`` against one server: the decoded JSON reply, or
    ClientError with the API's error (``HTTP 400: field: message``)."""

    def __init__(self, server: str, token: str | None = None, timeout: float = 120.0) -> None:
        self.server = server_url(server)
        self.token = token or None
        self.timeout = timeout
        self.proxies = proxies_for(self.server, self.token is not None)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(self.proxies),
                                                   _NoRedirect())

    def request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.server + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token is not None:
            req.add_unredirected_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ClientError(api_error(exc.code, exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            via = f" (through the proxy {', '.join(sorted(set(self.proxies.values())))})" \
                if self.proxies else ""
            raise ClientError(f"cannot reach {self.server}{via}: {reason}") from None
        except ValueError:
            raise ClientError(f"{url}: the reply is not JSON") from None


def api_error(status: int, body: bytes) -> str:
    """``HTTP 400: upsert[0].port: must be ...``: the field first, as the API names it."""
    try:
        doc = json.loads(body)
        message, field = str(doc["error"]), doc.get("field")
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:500].decode('utf-8', 'replace')}"
    return f"HTTP {status}: {field}: {message}" if field else f"HTTP {status}: {message}"
