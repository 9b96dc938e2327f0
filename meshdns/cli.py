"""The ``meshdns`` command: the server (serve, check-config, version) and a client of its
HTTP API (apply, get services, resolve), in the spirit of ``kumactl apply``.

The client commands use only the standard library (urllib, in meshdns/client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import __version__, logs
from .client import ApiClient, ClientError
from .config import Config, ConfigError, config_warnings, load_config
from .configfile import parse_document

if TYPE_CHECKING:
    from .server import MeshServer

DEFAULT_SERVER = "http://127.0.0.1:15080"
DESCRIPTION = "A sidecar-local DNS resolver for service-mesh names, fed over HTTP."
EPILOG = (f"apply, get and resolve talk to a running meshdns: --server (env MESHDNS_SERVER, "
          f"default {DEFAULT_SERVER}), bearer token --token (env MESHDNS_API_TOKEN). "
          "Run `meshdns COMMAND --help` for a command's options.")


def setup_logging(config: Config) -> None:
    logs.setup_logging(config.log.level, config.log.format)


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def config_errors(exc: ConfigError) -> None:
    for line in exc.errors:
        print(f"meshdns: config error: {line}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import MeshServer
    from .store import StateError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        config_errors(exc)
        return 2
    setup_logging(config)
    for line in config_warnings(config):
        logging.getLogger("meshdns").warning("config: %s", line)
    _event_loop_policy()
    started = None if args.ports_file is None else (
        lambda server: write_ports_file(Path(args.ports_file), server))
    try:
        asyncio.run(MeshServer(config).serve_until_signal(
            reload=lambda: load_config(args.config), started=started))
    except StateError as exc:
        logging.getLogger("meshdns").error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("meshdns").error("cannot start: %s", exc)
        return 1
    return 0


def write_ports_file(path: Path, server: MeshServer) -> None:
    """``serve --ports-file``: the addresses the listeners got (port 0 picks one), as
    ``{"pid", "dns": ["127.0.0.1:40123", ...], "api", "metrics"}``, written once every
    listener is bound, by a rename so that a reader never sees half a file."""
    api = server.api_address
    metrics = server.api.metrics_address if server.api is not None else None
    doc = {"pid": os.getpid(), "dns": [str(hp) for hp in server.dns_addresses],
           "api": None if api is None else str(api),
           "metrics": None if metrics is None else str(metrics)}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    partial.replace(path)


def cmd_worker(args: argparse.Namespace) -> int:
    """A dns.workers process, started by the main one (not for direct use)."""
    import os

    from .config import parse_config
    from .server import MeshServer
    from .workers import WORKER_ENV

    raw = os.environ.get(WORKER_ENV)
    if not raw:
        print("meshdns worker: started by `meshdns serve` with dns.workers > 1 only",
              file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "MESHDNS_FOLLOW_TOKEN"}
    config = parse_config(json.loads(raw), env)
    setup_logging(config)
    _event_loop_policy()
    parent = os.getppid()

    async def run() -> None:
        server = MeshServer(config, worker_id=args.id)

        async def orphan_watch() -> None:
            # The main process owns the registry; a worker outliving it must not linger.
            while os.getppid() == parent:
                await asyncio.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        watch = asyncio.get_running_loop().create_task(orphan_watch())
        try:
            await server.serve_until_signal()
        finally:
            watch.cancel()

    asyncio.run(run())
    return 0


def file_errors(config: Config) -> list[str]:
    """What check-config finds beyond the keys: files that a running server would need.

    Every ``*_file`` key must name an existing file, except the state file, which is
    created on the first write (its directory must exist). The seed file must also
    hold a valid registry for these VIP ranges.
    """
    errors: list[str] = []
    for section in ("dns", "api", "registry", "log"):
        values = vars(getattr(config, section))
        for key, value in values.items():
            if not key.endswith("_file") or value is None:
                continue
            path = Path(value)
            where = f"{section}.{key}: {value}"
            if key == "state_file":
                if not path.parent.is_dir():
                    errors.append(f"{where}: directory {path.parent} does not exist")
                elif path.exists() and not path.is_file():
                    errors.append(f"{where}: is not a file")
            elif not path.is_file():
                errors.append(f"{where}: " + ("is not a file" if path.exists()
                                               else "does not exist"))
    seed = config.registry.seed_file
    if seed and Path(seed).is_file() and not any("seed_file" in e for e in errors):
        from .core.registry import Registry, RegistryError, apply_put
        from .settings import registry_policy
        from .store import StateError, load_seed

        try:
            apply_put(Registry.empty(), load_seed(seed), registry_policy(config), time.time())
        except StateError as exc:
            errors.append(f"registry.seed_file: {exc}")
        except RegistryError as exc:
            errors.append(f"registry.seed_file: {seed}: {exc.field or ''}: {exc.message}")
    return errors


def forwarding_loops(config: Config, read_files: bool) -> list[str]:
    """The upstreams serve would refuse as a loop back to itself (it logs each as an
    ERROR and, with none left, answers REFUSED for every name it does not serve).

    The rule is serve's own (``dns.forwardplan.effective_forward``). Empty ``dns.upstreams`` means
    the resolv.conf nameservers, read only when the files are checked: with
    ``--skip-files`` the config is for another machine, with another resolv.conf.
    """
    from .dns.forwardplan import effective_forward

    # Each names its source: dns.upstreams, dns.forward[i].upstreams or the file.
    return effective_forward(config, read_resolv=read_files)[1]


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, check_files=not args.skip_files)
    except ConfigError as exc:
        config_errors(exc)
        return 2
    errors = [] if args.skip_files else file_errors(config)
    errors += forwarding_loops(config, read_files=not args.skip_files)
    for line in config_warnings(config):
        print(f"meshdns: config warning: {line}", file=sys.stderr)
    for line in errors:
        print(f"meshdns: config error: {line}", file=sys.stderr)
    if errors:
        return 2
    print(f"{args.file}: ok")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"meshdns {__version__}")
    return 0


# ---------------------------------------------------------------- API client


def request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One API call to ``--server`` (meshdns/client.py: no proxy for loopback, NO_PROXY
    hosts or a token over plain http); the decoded JSON reply, or ClientError."""
    return ApiClient(args.server, args.token, args.timeout).request(method, path, body)


def read_services(path: str) -> list[Any]:
    """A list of services, or ``{services: [...]}`` (what ``get services -o yaml``
    prints: its ``revision`` is ignored), from a YAML or JSON file; ``-`` is stdin.
    Kuma's own documents (MeshService, MeshExternalService, MeshMultiZoneService, one or
    many, as kubectl or kumactl print them) become mesh service items
    (docs/meshservice.md section 6)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ClientError(f"{path}: cannot be read: {exc}") from None
    from .core.registry import RegistryError
    from .kuma import load_kuma, looks_like_kuma

    if looks_like_kuma(_first_document(text)):
        try:
            return [svc.to_json() for svc in load_kuma(text)]
        except RegistryError as exc:
            raise ClientError(f"{path}: {exc.field}: {exc.message}") from None
    try:
        doc = parse_document(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ClientError(f"{path}: cannot be read: {exc}") from None
    if isinstance(doc, dict) and set(doc) <= {"services", "revision"} and "services" in doc:
        doc = doc["services"]
    if not isinstance(doc, list):
        raise ClientError(f"{path}: must be a list of services or {{services: [...]}}")
    return doc


def cmd_apply(args: argparse.Namespace) -> int:
    services = read_services(args.file)
    if args.prune:  # the file is the whole registry: what it does not list is deleted
        reply = request(args, "PUT", "/v1/services", {"services": services})
    else:
        reply = request(args, "PATCH", "/v1/services", {"upsert": services})
    verb = "replaced the registry with" if args.prune else "applied"
    # An export applied back (or any write of what is there) keeps the revision.
    outcome = "unchanged, " if reply.get("changed") is False else ""
    print(f"{verb} {len(services)} service{'s' * (len(services) != 1)}: "
          f"{outcome}revision {reply['revision']}, {reply['services']} in the registry")
    return 0


def _first_document(text: str) -> Any:
    """The first non-empty document of a YAML stream (or the JSON document); None when
    it does not parse (the ordinary reader then says why)."""
    from .yamlload import Loader, load_json

    if text.lstrip()[:1] in ("{", "["):
        try:
            return load_json(text)
        except (ValueError, RecursionError):
            pass
    loader = Loader(text)
    try:
        while loader.check_data():
            doc = loader.get_data()
            if doc is not None:
                return doc
    except (yaml.YAMLError, ValueError, RecursionError):
        return None
    finally:
        loader.dispose()
    return None


def cmd_get_services(args: argparse.Namespace) -> int:
    doc = request(args, "GET", "/v1/services")
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        rows = [("NAMESPACE", "NAME", "PORT", "VIP", "VIP6", "HOSTNAMES")]
        def ports(s: dict[str, Any]) -> str:  # a mesh service lists its ports
            return str(s["port"]) if "port" in s else \
                ",".join(str(p["port"]) for p in s["ports"]) or "-"

        for s in sorted(doc["services"], key=lambda s: (
                s.get("namespace") or "", s["name"], s.get("port", 0), s.get("kind", ""))):
            rows.append((s.get("namespace") or "-", s["name"], ports(s), s["vip"] or "-",
                         s.get("vip6") or "-", ",".join(s.get("hostnames") or []) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"name": args.name, "type": args.type})
    doc = request(args, "GET", f"/v1/resolve?{query}")
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    if doc.get("upstreams") is not None:
        upstreams = ", ".join(doc["upstreams"]) or "none"
        flags = ", authoritative" if doc.get("authoritative") else ""
        print(f";; {doc['name']} {doc['type']}: {doc['rcode']}{flags} from the upstream "
              f"(forwarded to {upstreams}, rule {doc['rule']})")
    else:
        flags = ", authoritative" if doc.get("authoritative") else ""
        print(f";; {doc['name']} {doc['type']}: {doc['rcode']}{flags} (rule {doc['rule']}, "
              f"zone {doc.get('zone') or '-'}, revision {doc['revision']})")
    service = doc.get("service")
    if service:
        print(f";; service {service['namespace']}/{service['name']} port {service['port']}")
    for section in ("answer", "authority", "additional"):
        for rr in doc.get(section) or []:
            print(f"{rr['name']}\t{rr['ttl']}\t{rr['type']}\t{rr['data']}")
    return 0


# ---------------------------------------------------------------- argument parsing


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", "-s", default=os.environ.get("MESHDNS_SERVER",
                                                                 DEFAULT_SERVER),
                        help="meshdns API URL (env MESHDNS_SERVER, default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("MESHDNS_API_TOKEN"),
                        help="bearer token for /v1 (env MESHDNS_API_TOKEN)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the reply (default %(default)g)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshdns", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"meshdns {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", help="one of:")
    serve = sub.add_parser("serve", help="serve DNS and the HTTP API")
    serve.add_argument("--config", "-c", help="YAML config file (defaults for every key)")
    serve.add_argument("--ports-file", metavar="FILE",
                       help="once listening, write the bound addresses there as JSON "
                       "(with port 0 in dns.listen or api.listen: which port each got)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="check a config file and the files it names")
    check.add_argument("file")
    check.add_argument("--skip-files", action="store_true",
                       help="check keys and values only, not the files they name (seed, "
                       "state, etcd TLS, resolv.conf): for a config meant for another "
                       "machine, e.g. a ConfigMap in CI")
    check.set_defaults(func=cmd_check_config)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)

    apply = sub.add_parser("apply", help="create or update services from a file")
    apply.add_argument("-f", "--file", required=True,
                       help="YAML or JSON: a list of services or {services: [...]}; - is stdin")
    apply.add_argument("--prune", action="store_true",
                       help="replace the whole registry (PUT): delete services not in the file")
    _client_options(apply)
    apply.set_defaults(func=cmd_apply)

    get = sub.add_parser("get", help="list resources (services)")
    get.add_argument("resource", choices=["services"])
    get.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _client_options(get)
    get.set_defaults(func=cmd_get_services)

    resolve = sub.add_parser("resolve", help="explain how the server answers a name")
    resolve.add_argument("name")
    resolve.add_argument("type", nargs="?", default="A", help="record type (default A)")
    resolve.add_argument("-o", "--output", choices=["text", "json"], default="text")
    _client_options(resolve)
    resolve.set_defaults(func=cmd_resolve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # internal (dns.workers > 1): kept out of --help
        worker = argparse.ArgumentParser(prog="meshdns worker")
        worker.add_argument("id")
        return cmd_worker(worker.parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ClientError as exc:
        print(f"meshdns {args.command}: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
