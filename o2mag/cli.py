"""The ``o2mag`` command: the parser and the dispatch to its sub-commands (:mod:`o2mag.commands`).

Input problems (missing file, unreadable image, bad mask, impossible option, model folder that is
not a diffusers pipeline) end with a one-line message and exit code 2, never a traceback; a run
that fails for a reason the user can act on (AGO overflow, GPU out of memory) ends with a one-line
message and exit code 1; Ctrl-C ends with exit code 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ._version import __version__
from .commands import curate, dataset, evaluate, generate, review
from .commands.options import Parser
from .errors import InputError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="o2mag", description="Training-free one-to-more anomaly generation (O2MAG) on a frozen "
                                         "Stable Diffusion: one reference defect -> many new defects.")
    p.add_argument("--version", action="version", version=f"o2mag {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    generate.add_parser(sub)
    dataset.add_parser(sub)
    evaluate.add_parser(sub)
    curate.add_parser(sub)
    review.add_parser(sub)
    return p


def _who() -> str:
    """'o2mag', or 'o2mag[rank 3/8]' in a launch of several processes (each may report)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return "o2mag"
    return f"o2mag[rank {rank}/{world}]" if world > 1 else "o2mag"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it; code 2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    import torch  # deferred: parsing (o2mag --help, usage errors) must not load torch

    threads = torch.get_num_threads()
    who = _who()
    try:
        return args.handler(args)
    except InputError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # AGO diverged (fp16 overflow): its message says what to change
        print(f"{who}: error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print(f"{who}: error: out of GPU memory; lower --batch-size, use --dtype fp16, or drop --kv-cache "
              "(complete samples are kept, rerun the same command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{who}: interrupted; complete samples are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # main() may run in-process (tests, notebooks)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
