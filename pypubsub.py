#!/usr/bin/env python3
"""PyPubSub: an HTTP streaming publish/subscribe daemon (drop-in for ASF PyPubSub 0.7.4).

    pypubsub [--config pypubsub.yaml] [--acl pypubsub_acl.yaml] [--log-level info]
             [--log-format text|json] [--check-config]

(``pypubsub`` is installed by ``pip install .``; ``.venv/bin/python pypubsub.py`` is the same.)

Owns the command line, logging set-up and the event loop choice; everything else is in
``server`` (daemon), ``hub`` (routing engine) and ``plugins``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from server import __version__
from server.config import load_config
from server.errors import ConfigError
from server.logs import LOG_FORMATS, setup_logging
from server.run import check_binds, serve
from wiring import build_daemon, plugin_problems

logger = logging.getLogger("pypubsub")

DEFAULT_CONFIG = "pypubsub.yaml"  # 0.7.4's defaults
DEFAULT_ACL = "pypubsub_acl.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PyPubSub: HTTP streaming publish/subscribe daemon")
    p.add_argument("--config", default=None,
                   help=f"configuration file (default: {DEFAULT_CONFIG}; embedded defaults if absent)")
    p.add_argument("--acl", default=None, help=f"ACL file (default: {DEFAULT_ACL} if present)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="logging level (default: info)")
    p.add_argument("--log-format", default=None, choices=list(LOG_FORMATS),
                   help="text, or json: one JSON object per line (default: server.log_format, "
                        "else text)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration and ACL files, report every error, and exit "
                        "(0: valid, 2: errors)")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (prompted, or one line of stdin), print its hash for the "
                        "ACL file, and exit")
    p.add_argument("--hash-scheme", default="argon2id", choices=["argon2id", "bcrypt"],
                   help="hash for --hash-password (default: argon2id)")
    p.add_argument("--version", action="version", version=f"PyPubSub {__version__}")
    return p


def _config_errors(e: ConfigError) -> None:
    for err in getattr(e, "errors", None) or [e]:
        logger.error("configuration error: %s", err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format or "text")
    if args.hash_password:
        from plugins.acl import hash_password_cli

        return hash_password_cli(args.hash_scheme, sys.stdin, sys.stdout, sys.stdin.isatty())
    config_path = args.config
    if config_path is None:
        if os.path.exists(DEFAULT_CONFIG):
            config_path = DEFAULT_CONFIG
        else:
            logger.warning("no %s here: running on the embedded defaults", DEFAULT_CONFIG)
    acl_path = args.acl
    if acl_path is None and os.path.exists(DEFAULT_ACL):
        acl_path = DEFAULT_ACL
    try:
        config = load_config(config_path, plugin_problems)
        if args.log_format is None and config.server.log_format != "text":
            setup_logging(args.log_level, config.server.log_format)
        app = build_daemon(config, acl_path)
    except ConfigError as e:
        _config_errors(e)
        return 2
    if args.check_config:
        bad = check_binds(config)
        for err in bad:
            logger.error("configuration error: %s", err)
        if bad:
            return 2
        logger.info("configuration OK: %s, ACL %s", config.file, acl_path or "(none)")
        return 0
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop not installed: using the default asyncio loop")
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(serve(config, app))
    except ConfigError as e:
        _config_errors(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
