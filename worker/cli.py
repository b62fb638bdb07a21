"""Subcommands of this component for the `loracast` command line (filled in by its owner)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    del sub
