"""What every command shares: the help formatter, the compute options, comma-separated names."""

from __future__ import annotations

import argparse

from ..cli_files import PRECISIONS


def compute_options(parser: argparse.ArgumentParser) -> None:
    """Precision and CPU threads, the same on every command that runs a network."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                        help="auto: bf16 where the CPU/GPU runs it fast (AVX-512 bf16/AMX CPUs, bf16 GPUs; fp16 on "
                             "other GPUs), else float32; float32: the reference (slower)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: OMP_NUM_THREADS if set, else the cores that are idle at the start)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' so a new user sees what a plain run does; skips flags and unset (None) defaults,
    whose help says what happens instead ('(default: None)' tells nobody anything)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def split_names(text: str | None):
    return [s.strip() for s in text.split(",")] if text else None
