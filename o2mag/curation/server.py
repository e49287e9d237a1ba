"""The review web page of ``o2mag review OUT``, on Flask (README "Reviewing in a browser").

Flask is the web library: small, long maintained (Pallets), synchronous like the rest of o2mag,
with Werkzeug's routing, request parsing, path-safe file sending (``send_from_directory`` refuses
any path outside its folder) and a threaded development server that can bind port 0. The page
itself (``o2mag/data/review/``) is one HTML file with inline CSS and JavaScript: no external asset,
it works offline.

Endpoints:

- ``GET /``: the page.
- ``GET /api/samples``: ``{"out", "folders": [{category, defect, counts}], "samples": [{category,
  defect, index, id, image, mask, reference, quality, review}]}``; URLs are this server's, ``id``
  is the sample's identity (:attr:`o2mag.curation.decisions.Sample.id`).
- ``POST /api/samples/<category>/<defect>/<index>`` with ``{"review": "accepted" | "rejected" |
  null, "id": "<the sample's id as listed>"}``: records the decision in the manifest
  (:func:`o2mag.curation.decisions.decide`), rewrites the folder's ``contact_sheet.png`` and returns
  the sample. A malformed body (``id`` missing included) is 400, an unknown folder or sample 404;
  409 when the sample at that index is no longer the one with that ``id`` (``generate
  --overwrite`` replaced it since the page loaded): nothing is recorded and the answer carries the
  sample now there, for the page to show instead.

Only this machine's browsers may talk to it: a request whose ``Host`` is not ``localhost``,
``127.0.0.1``, ``[::1]`` or the address the server was bound to (any IP address when bound to all,
``0.0.0.0`` / ``::``), with the server's port, is refused (403), so a web page cannot reach it by
DNS rebinding; a POST whose ``Origin`` is another site's is refused (403) too (a client that sends
no ``Origin``, like curl, is fine).
- ``GET /files/<category>/<defect>/<image|mask>/<NNN.png>``: a sample's files, only from
  ``OUT/<category>/<defect>/`` of a folder with a manifest.
- ``GET /api/samples/<category>/<defect>/<index>/reference.png``: the reference defect the
  manifest names for the sample (relative paths: against the line's ``cwd``), with ``M_R``
  outlined, drawn in memory (the client names no path).
"""
from __future__ import annotations

import io
import ipaddress
import re
import threading
from importlib import resources
from pathlib import Path
from urllib.parse import quote
from typing import Any, Dict, Tuple

import numpy as np
from flask import Flask, Response, abort, jsonify, request, send_from_directory
from werkzeug.serving import make_server
from PIL import Image, ImageFilter

from ..errors import InputError
from ..runs.contact_sheet import write_contact_sheet
from .decisions import REVIEWS, Sample, decide, defect_folders, review_counts, samples
from .rescore import inputs_of

__all__ = ["create_app", "serve"]

_FILE = re.compile(r"^\d{3,}\.png$")
_LOCAL = ("localhost", "127.0.0.1", "::1")
_ANY = ("0.0.0.0", "::", "")


def _split_host(host: str) -> Tuple[str, str]:
    """``"[::1]:8080"`` -> ("::1", "8080"); ``"localhost"`` -> ("localhost", "")."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str, bound: str, port: str) -> bool:
    """``host`` (a ``Host`` header) names this server: a loopback name or ``bound`` (any IP
    address when ``bound`` is a wildcard), and ``port`` (80 when the header gives none)."""
    name, given = _split_host(host.strip().lower())
    if (given or "80") != port:
        return False
    return name in _LOCAL or name == bound.strip("[]").lower() or (bound in _ANY and _is_ip(name))


def _page() -> str:
    return resources.files("o2mag").joinpath("data/review/index.html").read_text(encoding="utf-8")


def _outlined(image: Image.Image, mask: np.ndarray) -> bytes:
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    edge = (np.asarray(m) > 0) & ~(np.asarray(m.filter(ImageFilter.MinFilter(3))) > 0)
    arr = np.asarray(image.convert("RGB")).copy()
    arr[edge] = (255, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def create_app(out: str | Path, host: str = "127.0.0.1") -> Flask:
    """The Flask app serving the review page of the output tree ``out``, on a server bound to
    ``host`` (the ``Host`` headers it accepts, see the module's docstring).

    Long on purpose: the routes are closures over the folder and the reference cache; split up,
    each would take them all as arguments."""
    root = Path(out).resolve()
    if not root.is_dir():
        raise InputError(f"output folder not found: {root}")
    app = Flask("o2mag.review")
    app.json.sort_keys = False
    references: Dict[Tuple[str, int], bytes] = {}
    lock = threading.Lock()

    def folders() -> Dict[Tuple[str, str], Path]:
        return {(c, d): f for c, d, f in defect_folders(root)}

    def as_json(s: Sample) -> Dict[str, Any]:
        cat, dfc = quote(s.category, safe=""), quote(s.defect, safe="")
        base = f"/files/{cat}/{dfc}"
        return {"category": s.category, "defect": s.defect, "index": s.index, "id": s.id,
                "image": f"{base}/image/{s.image.name}", "mask": f"{base}/mask/{s.mask.name}",
                "reference": f"/api/samples/{cat}/{dfc}/{s.index}/reference.png",
                "quality": s.record.get("quality"), "review": s.review}

    def find(category: str, defect: str, index: int) -> Sample:
        if (category, defect) not in folders():
            abort(404, description=f"no defect folder {category}/{defect} in {root}")
        for s in samples(root, category, defect):
            if s.index == index:
                return s
        abort(404, description=f"{category}/{defect} has no complete sample {index}")

    @app.before_request
    def only_this_machine():
        port = str(request.environ.get("SERVER_PORT") or "80")
        if not host_allowed(request.host, host, port):
            abort(403, description=f"refused: Host {request.host!r} is not this review server "
                                   "(open the URL o2mag review printed)")
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin is not None and origin != f"{request.scheme}://{request.host}":
            abort(403, description=f"refused: a request from another site ({origin})")

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(409)
    def error(e):
        return jsonify(error=e.description), e.code

    @app.get("/")
    def page():
        return Response(_page(), mimetype="text/html")

    @app.get("/api/samples")
    def list_samples():
        found = folders()
        return jsonify(out=str(root),
                       folders=[{"category": c, "defect": d, "counts": review_counts(f)}
                                for (c, d), f in found.items()],
                       samples=[as_json(s) for s in samples(root)])

    @app.post("/api/samples/<category>/<defect>/<int:index>")
    def set_review(category: str, defect: str, index: int):
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or set(body) != {"review", "id"} or not isinstance(body["id"], str) \
                or not (body["review"] is None or body["review"] in REVIEWS):
            abort(400, description='the body must be {"review": "accepted" | "rejected" | null, '
                                   '"id": "<the sample\'s id from /api/samples>"}')
        find(category, defect, index)
        lines = decide(root, category, defect, {index: body["review"]}, {index: body["id"]})
        if index not in lines:  # another sample than the one judged, or being replaced
            current = [as_json(s) for s in samples(root, category, defect) if s.index == index]
            return jsonify(error=f"{category}/{defect} sample {index} was replaced since the page loaded; "
                                 "nothing was recorded: reload it and judge the new one",
                           sample=current[0] if current else None), 409
        try:  # the folder's contact sheet shows the decisions too, as after o2mag curate
            write_contact_sheet(folders()[(category, defect)])
        except OSError as e:  # the decision is saved; an old sheet is no reason to refuse it
            app.logger.warning("contact sheet of %s/%s not rewritten: %s", category, defect, e)
        s = find(category, defect, index)
        return jsonify(sample=as_json(s), counts=review_counts(folders()[(category, defect)]))

    @app.get("/files/<category>/<defect>/<kind>/<name>")
    def files(category: str, defect: str, kind: str, name: str):
        folder = folders().get((category, defect))
        if folder is None or kind not in ("image", "mask") or not _FILE.match(name):
            abort(404, description="not a sample file of this output folder")
        return send_from_directory(folder / kind, name, max_age=0)

    @app.get("/api/samples/<category>/<defect>/<int:index>/reference.png")
    def reference(category: str, defect: str, index: int):
        s = find(category, defect, index)
        settings = s.record.get("settings") or {}
        name = str(s.record.get("reference") or settings.get("reference"))
        key = (f"{category}/{defect}/{name}", str(s.record.get("cwd")), int(settings.get("size") or 0))
        with lock:
            png = references.get(key)
        if png is None:
            try:
                size = Image.open(s.image).width
                ref, m_r, _ = inputs_of(s.record, size)
            except (InputError, OSError) as e:
                abort(404, description=f"reference not available: {e}")
            png = _outlined(ref, m_r)
            with lock:
                references[key] = png
        return Response(png, mimetype="image/png")

    return app


def serve(app: Flask, host: str, port: int) -> Any:
    """A threaded Werkzeug server for ``app`` bound to ``host:port`` (0: a free port); the caller
    runs ``serve_forever()`` and reads ``server_port``."""
    return make_server(host, port, app, threaded=True)

