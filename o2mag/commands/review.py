"""``o2mag review OUT``: the review web page of an output folder (:mod:`o2mag.curation.server`).

Serves on ``--host`` (127.0.0.1) and ``--port`` (0: a free port), prints the page's URL on one
line of standard output, opens a browser only with ``--open``, and runs until Ctrl-C. Decisions
are saved as ``o2mag curate`` saves them.
"""
from __future__ import annotations

import sys
import webbrowser
from pathlib import Path

from ..curation.decisions import defect_folders
from ..errors import InputError
from . import options as o

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Add ``review`` to the ``o2mag`` sub-parser set ``sub``."""
    r = sub.add_parser(
        "review", help="review generated samples in a local web page (accept/reject by click or key)",
        description="Serve a local web page over an output folder: per category/defect a grid of samples with "
                    "the target mask outlined, the reference beside, quality scores, sorting and filtering by "
                    "score, accept/reject by click and keyboard. Decisions go into the manifests (as o2mag "
                    "curate writes them). Needs Flask: pip install 'o2mag[review]'.",
        formatter_class=o.HelpFormatter)
    r.add_argument("out", metavar="OUT", help="output folder (<OUT>/<category>/<defect>/manifest.jsonl)")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (only this machine by default)")
    r.add_argument("--port", type=o.int_at_least("--port", 0), default=0, help="port; 0 picks a free one")
    r.add_argument("--open", action="store_true", help="open the page in the default browser")
    r.set_defaults(handler=run)


def run(args) -> int:
    """The ``o2mag review`` command (called by :func:`o2mag.cli.main`)."""
    if args.port > 65535:
        raise InputError(f"--port must be <= 65535, got {args.port}")
    if not defect_folders(args.out):
        raise InputError(f"{args.out} holds no generated samples (no <category>/<defect>/manifest.jsonl)")
    try:
        from ..curation.server import create_app, serve  # deferred: Flask is the optional 'review' extra
    except ImportError as e:
        raise InputError(f"o2mag review needs Flask ({e}); install it with: pip install 'o2mag[review]'") from None
    try:
        server = serve(create_app(Path(args.out), args.host), args.host, args.port)
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{server.server_port}/"
    print(f"o2mag: review page at {url}", flush=True)
    print("o2mag: press Ctrl-C to stop; every decision is already saved", file=sys.stderr, flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
