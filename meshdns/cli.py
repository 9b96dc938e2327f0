"""``meshdns serve | check-config | --version``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from . import __version__
from .config import Config, ConfigError, load_config


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import MeshServer
    from .store import StateError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"meshdns: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    _event_loop_policy()
    try:
        asyncio.run(MeshServer(config).serve_until_signal())
    except StateError as exc:
        logging.getLogger("meshdns").error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("meshdns").error("cannot start: %s", exc)
        return 1
    return 0


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


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        print(f"meshdns: config error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshdns", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meshdns {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve DNS and the HTTP API")
    serve.add_argument("--config", "-c", help="YAML config file (defaults for every key)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config file without serving")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("id")
    worker.set_defaults(func=cmd_worker)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
