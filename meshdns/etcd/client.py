"""A small asyncio client for etcd's v3 JSON gateway (``/v3/...`` over HTTP/1.1).

Why the gateway (the README says more): it needs nothing beyond the aiohttp
meshdns already has, TLS is an ``ssl`` context, and every call is one POST, so
failover is trying the next endpoint. Keys and values travel base64-encoded;
64-bit integers travel as JSON strings; fields at their default (0, false, PUT)
are left out of answers.

Failover: each request goes to the endpoint that answered last; when it cannot
be reached, times out, or answers "unavailable" (a member without a leader, a
leader change), the next one is tried, each once. Requests ask the member to
answer "no leader" at once rather than wait out an election (the gateway's
``Grpc-Metadata-hasleader`` header), and a caller may give each attempt a
shorter deadline than ``request_timeout`` (writes do: backend.py), so a request
that met a dead leader is tried on the others within a fraction of a second. Only when every endpoint failed does a request raise
:class:`EtcdUnavailable`. An error etcd answered deliberately (a bad request, too
many operations in one transaction) is :class:`EtcdError` and is not retried.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

log = logging.getLogger("meshdns.etcd")

# gRPC status codes that mean "ask another member" (or this one later).
_RETRYABLE = {4, 14}  # DEADLINE_EXCEEDED (e.g. leader changed mid-request), UNAVAILABLE
_UNAUTHENTICATED = 16
WATCH_LINE_MAX = 256 * 1024 * 1024  # one watch response (one big transaction) at most


class EtcdUnavailable(Exception):
    """No endpoint answered: nothing was read, and a write may not have been applied."""


class EtcdError(Exception):
    """etcd answered with an error (``code``: the gRPC status code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def num(value: Any) -> int:
    """A 64-bit integer from the gateway's JSON (a string; absent means 0)."""
    return int(value) if value is not None else 0


def ssl_context(ca_file: str | None, cert_file: str | None,
                key_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], *, dial_timeout: float = 2.0,
                 request_timeout: float = 5.0, ssl_ctx: ssl.SSLContext | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.dial_timeout = dial_timeout
        self.request_timeout = request_timeout
        self.ssl_ctx = ssl_ctx
        self.username = username
        self.password = password
        self.current = 0  # index of the endpoint that answered last
        self.watching: str | None = None  # the endpoint of the open watch stream
        self._token: str | None = None
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_ctx if self.ssl_ctx else False,
                                             limit=64)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self.current + i) % n] for i in range(n)]

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def _unary_headers(self) -> dict[str, str]:
        # "no leader" at once from a member that has none (not for watches: a follower
        # serves a watch through an election, and this would cancel it).
        return {**self._headers(), "Grpc-Metadata-hasleader": "true"}

    # ------------------------------------------------------------ one request

    async def call(self, path: str, body: dict[str, Any], *,
                   attempt_timeout: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first endpoint that answers, each attempt
        within ``attempt_timeout`` (at most ``request_timeout``)."""
        errors: list[str] = []
        timeout = self.request_timeout if attempt_timeout is None else \
            min(attempt_timeout, self.request_timeout)
        for endpoint in self._order():
            try:
                answer = await self._post(endpoint, path, body, timeout)
            except EtcdError as exc:
                if exc.code == _UNAUTHENTICATED and self.username is not None:
                    self._token = None  # expired: authenticate again, once
                    try:
                        answer = await self._post(endpoint, path, body, timeout)
                    except EtcdError as again:
                        exc = again
                    else:
                        self.current = self.endpoints.index(endpoint)
                        return answer
                if exc.code not in _RETRYABLE:
                    raise
                errors.append(f"{endpoint}: {exc.message}")
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                errors.append(f"{endpoint}: {str(exc) or type(exc).__name__}")
                continue
            self.current = self.endpoints.index(endpoint)
            return answer
        raise EtcdUnavailable("; ".join(errors))

    async def _post(self, endpoint: str, path: str, body: dict[str, Any],
                    total: float | None = None) -> dict[str, Any]:
        if self.username is not None and self._token is None and path != "/v3/auth/authenticate":
            await self._authenticate(endpoint)
        timeout = aiohttp.ClientTimeout(total=total or self.request_timeout,
                                        sock_connect=min(self.dial_timeout,
                                                         total or self.dial_timeout))
        async with self._http().post(endpoint + path, json=body,
                                     headers=self._unary_headers(),
                                     timeout=timeout) as resp:
            data = await resp.read()
            status = resp.status
        try:
            doc = json.loads(data)
        except ValueError:
            raise EtcdError(14, f"HTTP {status} without a JSON body") from None
        if not isinstance(doc, dict):
            raise EtcdError(14, f"HTTP {status}: not a JSON object")
        if status != 200 or "error" in doc:
            code = doc.get("code", 14 if status >= 500 else 2)
            raise EtcdError(int(code), str(doc.get("message") or doc.get("error") or status))
        return doc

    async def _authenticate(self, endpoint: str) -> None:
        doc = await self._post(endpoint, "/v3/auth/authenticate",
                               {"name": self.username, "password": self.password})
        self._token = str(doc.get("token", "")) or None

    # ------------------------------------------------------------ the calls used

    async def range(self, key: bytes, range_end: bytes | None = None, *, revision: int = 0,
                    limit: int = 0, keys_only: bool = False,
                    attempt_timeout: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"key": b64(key)}
        if keys_only:
            body["keys_only"] = True
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if revision:
            body["revision"] = str(revision)
        if limit:
            # Pages come in key order as they are: no sort_order / sort_target, with
            # which etcd 3.4 reads every key of the range to sort it before the limit
            # (a 1-key page of a 300,000-key generation took 3-5 s on a loaded machine).
            body["limit"] = str(limit)
        return await self.call("/v3/kv/range", body, attempt_timeout=attempt_timeout)

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None, *,
                  attempt_timeout: float | None = None) -> dict[str, Any]:
        return await self.call("/v3/kv/txn", {"compare": compare, "success": success,
                                              "failure": failure or []},
                               attempt_timeout=attempt_timeout)

    async def lease_grant(self, ttl: int, *, attempt_timeout: float | None = None) -> int:
        doc = await self.call("/v3/lease/grant", {"TTL": str(ttl)},
                              attempt_timeout=attempt_timeout)
        return num(doc.get("ID"))

    async def lease_keepalive(self, lease: int) -> int:
        """One keep-alive of ``lease``; its TTL now (0 or less: expired)."""
        doc = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return num(doc.get("result", doc).get("TTL"))

    async def lease_revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def status(self) -> dict[str, Any]:
        return await self.call("/v3/maintenance/status", {})

    async def watch(self, key: bytes, range_end: bytes, start_revision: int
                    ) -> AsyncIterator[dict[str, Any]]:
        """The watch responses (``result`` objects) of one watch stream, from the first
        endpoint that accepts it; ends (or raises) when the stream breaks."""
        body = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                   "start_revision": str(start_revision),
                                   "progress_notify": True}}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.dial_timeout,
                                        sock_read=None)
        errors: list[str] = []
        for endpoint in self._order():
            try:
                if self.username is not None and self._token is None:
                    await self._authenticate(endpoint)
                resp = await self._http().post(endpoint + "/v3/watch", json=body,
                                               headers=self._headers(), timeout=timeout)
            except (aiohttp.ClientError, TimeoutError, OSError, EtcdError) as exc:
                errors.append(f"{endpoint}: {str(exc) or type(exc).__name__}")
                continue
            if resp.status != 200:
                errors.append(f"{endpoint}: HTTP {resp.status}")
                resp.release()
                continue
            self.current = self.endpoints.index(endpoint)
            self.watching = endpoint
            try:
                async for line in _lines(resp.content):
                    doc = json.loads(line)
                    if "error" in doc:
                        err = doc["error"]
                        code = int(err.get("grpc_code", err.get("code", 14)))
                        if code == _UNAUTHENTICATED:
                            self._token = None  # expired: the next attempt authenticates
                        raise EtcdError(code, str(err.get("message", err)))
                    yield doc.get("result", {})
            finally:
                self.watching = None
                resp.release()
            return
        raise EtcdUnavailable("watch: " + "; ".join(errors))


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited JSON objects, however large (a 1000-service transaction
    arrives as one object of a few MB)."""
    pending: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        while chunk:
            cut = chunk.find(b"\n")
            if cut < 0:
                pending.append(chunk)
                size += len(chunk)
                if size > WATCH_LINE_MAX:
                    raise EtcdError(8, "watch response over the size limit")
                break
            pending.append(chunk[:cut])
            line = b"".join(pending)
            pending, size = [], 0
            chunk = chunk[cut + 1:]
            if line.strip():
                yield line
