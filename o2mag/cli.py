"""The ``o2mag`` command: the parser and the dispatch to its sub-commands (:mod:`o2mag.commands`).

Exit codes (the README's table):

- 0: done; every sample asked for is in the output folder.
- 1: the run failed for a reason the user can act on (AGO overflow, GPU out of memory); one line.
- 2: a problem with what the user gave (missing file, unreadable image, bad mask, impossible
  option, model folder that is not a diffusers pipeline) or an OS error about one of the user's
  paths (read-only or full folder, a path through a file, no permission); one line naming it,
  never a traceback.
- 3: the run ended with samples still missing (a sample whose claim was taken over after a stall,
  or one another run claimed as this one ended); rerunning the same command finishes them.
- 130: interrupted (Ctrl-C); complete samples are kept.

A damaged file that o2mag reads back and does not use (a cache entry, a manifest line) is reported
as one ``o2mag: warning:`` line.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

from ._version import __version__
from .commands import curate, dataset, evaluate, generate, review
from .commands.options import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, Parser
from .errors import DataWarning, InputError
from .runs.processes import end_processes

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
        with warnings.catch_warnings():
            _warn_in_one_line(who)
            return args.handler(args)
    except InputError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except FloatingPointError as e:  # AGO diverged (fp16 overflow): its message says what to change
        print(f"{who}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except torch.cuda.OutOfMemoryError:
        print(f"{who}: error: out of GPU memory; lower --batch-size, use --dtype fp16, or drop --kv-cache "
              "(complete samples are kept, rerun the same command to resume)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if e.filename is None:  # not about a path: a bug or the system's, shown as itself
            raise
        print(f"{who}: error: {_os_error(e)} (what was complete is kept: fix this and rerun the same command)",
              file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{who}: interrupted; complete samples are kept, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        end_processes()  # under torchrun / accelerate launch: leave the process group cleanly
        torch.set_num_threads(threads)  # main() may run in-process (tests, notebooks)


def _os_error(e: OSError) -> str:
    """'<path>: <what the OS said>' (both paths of a rename)."""
    where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{where}: {e.strerror or e}"


def _warn_in_one_line(who: str) -> None:
    """Inside ``warnings.catch_warnings()``: every :class:`~o2mag.errors.DataWarning` (a damaged file
    o2mag did not use) as one ``o2mag: warning:`` line, each time; other warnings as usual."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"{who}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", DataWarning)
    warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
