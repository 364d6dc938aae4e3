"""Where a `broker` subcommand finds the broker's settings: `--config FILE` or `--data-dir DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from broker.config import DEFAULT_ADMIN_ADDR, DEFAULT_RESOLVE_ADDR, Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`--config FILE` or `--data-dir DIR`, one of them required (read by `settings`)."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="FILE", help="the broker's TOML settings file")
    where.add_argument("--data-dir", type=Path, metavar="DIR", help="a `broker dev` data directory")


def settings(args: argparse.Namespace) -> Settings:
    """The settings of `--config FILE`, or of the `broker dev` layout in `--data-dir DIR`."""
    if args.config is not None:
        return Settings.load(args.config)
    return Settings.for_dev(args.data_dir, DEFAULT_ADMIN_ADDR, DEFAULT_RESOLVE_ADDR)
