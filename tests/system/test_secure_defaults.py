"""Secure by default: a non-loopback API needs a token; metrics can live on their own port."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshdns.config import ConfigError, parse_config

from ..support import make_config, running_server


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@pytest.mark.parametrize("listen", ["0.0.0.0:15080", "[::]:15080", "10.1.2.3:15080"])
def test_a_public_api_without_a_token_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"api": {"listen": listen}}, env={})
    assert str(err.value).startswith("api.token: is required when api.listen is not a "
                                     "loopback address")
    assert "api.allow_unauthenticated: true" in str(err.value)


@pytest.mark.parametrize("raw,env", [
    ({"api": {"listen": "0.0.0.0:15080", "token": "t"}}, {}),
    ({"api": {"listen": "0.0.0.0:15080"}}, {"MESHDNS_API_TOKEN": "from-env"}),
    ({"api": {"listen": "0.0.0.0:15080", "allow_unauthenticated": True}}, {}),
    ({"api": {"listen": "127.0.0.5:15080"}}, {}),
    ({"api": {"listen": "[::1]:15080"}}, {}),
])
def test_a_token_an_override_or_loopback_is_accepted(raw: dict[str, Any],
                                                     env: dict[str, str]) -> None:
    parse_config(raw, env=env)


def test_serve_refuses_to_start_a_public_api_without_a_token(tmp_path: Path) -> None:
    """As a user runs it: the process exits at once with the message, serving nothing."""
    raw = make_config(tmp_path, {"api": {"listen": "0.0.0.0:0"}})
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump(raw))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "meshdns", "serve", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "api.token: is required when api.listen is not a loopback address" in proc.stderr


def test_metrics_listen_serves_metrics_and_probes_apart_from_the_api(tmp_path: Path) -> None:
    raw = make_config(tmp_path, {"metrics": {"listen": "127.0.0.1:0"},
                                 "api": {"token": "s3cret"}})
    with running_server(raw) as server:
        api = server.api_url
        assert server.mesh.api is not None
        metrics = server.mesh.api.metrics_address
        assert metrics is not None and metrics.port not in (0, server.mesh.api_address.port)
        base = f"http://127.0.0.1:{metrics.port}"
        status, body = get(base + "/metrics")
        assert status == 200
        assert b"meshdns_registry_services 3.0" in body
        assert get(base + "/healthz")[0] == 200
        status, body = get(base + "/readyz")
        assert status == 200 and json.loads(body)["services"] == 3
        # Nothing of the registry API there, token or not.
        assert get(base + "/v1/services", "s3cret")[0] == 404
        # ...and /metrics is no longer on the API listener; the API itself is as before.
        assert get(api + "/metrics")[0] == 404
        assert get(api + "/v1/services")[0] == 401
        assert get(api + "/v1/services", "s3cret")[0] == 200


def test_a_taken_metrics_port_names_the_address(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        raw = make_config(tmp_path, {"metrics": {"listen": f"127.0.0.1:{port}"}})
        with pytest.raises(OSError) as err, running_server(raw):
            pass
    assert f"cannot listen on 127.0.0.1:{port} (metrics.listen)" in str(err.value)
