"""``virtualstain``: train, predict, evaluate and inspect checkpoints from the command line (same core as the widgets).

Every user error (bad image, bad checkpoint, bad option) ends as one ``error: ...`` line and exit status 2,
never a traceback. One module per group of commands, each with its parser (``add_parsers``) and its handlers; the
file-handling side of ``predict`` is ``cli_files`` (also imported by Dask workers, without argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..cli_files import progress_printer  # noqa: F401 - re-exported (tests, benchmarks)
from ..core.errors import VirtualStainError
from . import conditions, evaluate, models, predict, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtualstain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"napari-virtualstain {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (predict, train, conditions, models, evaluate):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except VirtualStainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `virtualstain info ... | head`: the reader left; no traceback for that
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
