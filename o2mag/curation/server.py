"""The review web page of ``o2mag review OUT``, on Flask (README "Reviewing in a browser").

Flask is the web library: small, long maintained (Pallets), synchronous like the rest of o2mag,
with Werkzeug's routing, request parsing, path-safe file sending (``send_from_directory`` refuses
any path outside its folder) and a threaded development server that can bind port 0. The page
itself (``o2mag/data/review/``) is one HTML file with inline CSS and JavaScript: no external asset,
it works offline.

Endpoints:

- ``GET /``: the page.
- ``GET /api/samples``: ``{"out", "folders": [{category, defect, counts}], "samples": [{category,
  defect, index, image, mask, reference, quality, review}]}``; URLs are this server's.
- ``POST /api/samples/<category>/<defect>/<index>`` with ``{"review": "accepted" | "rejected" |
  null}``: records the decision in the manifest (:func:`o2mag.curation.decisions.decide`),
  rewrites the folder's ``contact_sheet.png`` and returns the sample. A malformed body is 400,
  an unknown folder or sample 404.
- ``GET /files/<category>/<defect>/<image|mask>/<NNN.png>``: a sample's files, only from
  ``OUT/<category>/<defect>/`` of a folder with a manifest.
- ``GET /api/samples/<category>/<defect>/<index>/reference.png``: the reference defect the
  manifest names for the sample (relative paths: against the line's ``cwd``), with ``M_R``
  outlined, drawn in memory (the client names no path).
"""
from __future__ import annotations

import io
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


def create_app(out: str | Path) -> Flask:
    """The Flask app serving the review page of the output tree ``out``.

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
        return {"category": s.category, "defect": s.defect, "index": s.index,
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

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
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
        if not isinstance(body, dict) or set(body) != {"review"} \
                or not (body["review"] is None or body["review"] in REVIEWS):
            abort(400, description='the body must be {"review": "accepted" | "rejected" | null}')
        find(category, defect, index)
        lines = decide(root, category, defect, {index: body["review"]})
        if index not in lines:  # replaced by a writer between the look and the decision
            abort(404, description=f"{category}/{defect} sample {index} is being replaced; reload")
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

