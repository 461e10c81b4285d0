"""The ``genie-dg`` command. Each subcommand is a module with ``add_arguments`` and ``run``,
registered in :data:`SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from genie_dg.errors import UserInputError


@dataclass(frozen=True)
class Subcommand:
    """A subcommand's help line and the module that implements it.

    The module defines ``add_arguments(parser)`` and ``run(args) -> exit status``.
    """

    help: str
    module: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "download": Subcommand(
        "fetch a DomainBed image dataset into --data-dir (resumable, checksummed, safely extracted)",
        "genie_dg.data.download",
    ),
    "verify-data": Subcommand(
        "count a dataset's images per domain and class against its config; exit 1 on a mismatch",
        "genie_dg.data.verify",
    ),
    "fetch-weights": Subcommand(
        "store the pretrained backbone weights a config needs in genie-dg's weights cache "
        "($GENIE_DG_WEIGHTS), for machines without a network",
        "genie_dg.models.weights",
    ),
    "collect": Subcommand(
        "print DomainBed-style result tables of a sweep for each model selection method",
        "genie_dg.results.collect",
    ),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (each pulls in different libraries)."""
    parser = argparse.ArgumentParser(prog="genie-dg", description="Data and results tools of genie-dg.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        # Import only a subcommand named on the command line: a bare --help stays fast.
        if name in argv:
            module = importlib.import_module(command.module)
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a user mistake is one ``error:`` line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.run(args)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
