"""Arguments every stage shares: ``--config``, ``--profile`` and repeated ``--set dotted.key=value``."""

from __future__ import annotations

import argparse
import logging
import os

from pipelines.config import DEFAULT_CONFIG_PATH, PROJECT_ROOT_ENV, Config, load_config


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="YAML config (default: %(default)s)")
    group.add_argument("--profile", default=None, help="named profile from the config, e.g. demo")
    group.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.lr=3e-4 (repeatable)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    cfg = load_config(args.config, args.profile, args.sets)
    # a job of `cxr <stage> --address` runs in Ray's copy of the code: relative paths mean the submitter's checkout
    return cfg.with_absolute_paths() if os.environ.get(PROJECT_ROOT_ENV) else cfg
