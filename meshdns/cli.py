"""``meshdns serve | check-config | --version``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
