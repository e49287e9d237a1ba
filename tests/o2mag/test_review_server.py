"""``o2mag review``'s endpoints (o2mag.curation.server, Flask): listing, decisions saved in the
manifest, 4xx for malformed requests and paths outside OUT, 409 for a decision on a sample replaced
since the page loaded, 403 for a foreign Host (DNS rebinding) or Origin, two clients deciding at
once, a manifest appended by a running writer, and the command printing its URL on one line."""
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("flask", reason="the review page needs Flask (the test extra installs it)")

from o2mag.cli import main  # noqa: E402
from o2mag.curation.server import create_app, serve  # noqa: E402
from o2mag.runs.contact_sheet import contact_sheet  # noqa: E402
from o2mag.runs.store import OutputStore, complete_samples, sample_id  # noqa: E402

from .calls import fresh_copy, generate_embedded, generated_elsewhere, replace_sample  # noqa: E402

CAT, DEF = "synthetic_surface", "scratch"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate_embedded(tmp_path_factory.mktemp("gen") / "out", 4)


@pytest.fixture
def out(generated, tmp_path):
    (tmp_path / "secret.txt").write_text("outside OUT")
    return fresh_copy(generated, tmp_path / "out")


@pytest.fixture
def client(out):
    return create_app(out).test_client()


def _reviews(out):
    return {i: rec.get("review") for i, _, _, rec in complete_samples(out / CAT / DEF)}


def _ids(out):
    return {i: sample_id(rec) for i, _, _, rec in complete_samples(out / CAT / DEF)}


def _decide(client, out, index, review, **kw):
    return client.post(f"/api/samples/{CAT}/{DEF}/{index}", json={"review": review, "id": _ids(out)[index]}, **kw)


def test_list_gives_every_sample_with_urls_that_serve_its_files(client, out):
    body = client.get("/api/samples").get_json()
    assert [(s["category"], s["defect"], s["index"]) for s in body["samples"]] == [(CAT, DEF, i) for i in range(4)]
    assert body["folders"] == [{"category": CAT, "defect": DEF,
                                "counts": {"accepted": 0, "rejected": 0, "unreviewed": 4}}]
    s = body["samples"][2]
    assert s["review"] is None and 0 <= s["quality"]["score"] <= 1
    assert client.get(s["image"]).data == (out / CAT / DEF / "image" / "002.png").read_bytes()
    assert client.get(s["mask"]).data == (out / CAT / DEF / "mask" / "002.png").read_bytes()
    ref = client.get(s["reference"])
    assert ref.status_code == 200 and ref.mimetype == "image/png" and ref.data[:4] == b"\x89PNG"
    page = client.get("/").get_data(as_text=True)
    assert "<script>" in page and "http://" not in page and "https://" not in page  # no external asset


def test_a_decision_is_saved_in_the_manifest_and_can_be_undone(client, out):
    r = _decide(client, out, 1, "rejected")
    assert r.status_code == 200 and r.get_json()["sample"]["review"] == "rejected"
    assert r.get_json()["counts"] == {"accepted": 0, "rejected": 1, "unreviewed": 3}
    assert _reviews(out) == {0: None, 1: "rejected", 2: None, 3: None}
    assert _decide(client, out, 2, "accepted").status_code == 200
    assert _decide(client, out, 1, None).status_code == 200
    assert _reviews(out) == {0: None, 1: None, 2: "accepted", 3: None}
    # a fresh server (a restart) reads the decisions back
    again = create_app(out).test_client().get("/api/samples").get_json()
    assert [s["review"] for s in again["samples"]] == [None, None, "accepted", None]


@pytest.mark.parametrize("body, kwargs", [
    ({"review": "bogus", "id": "x"}, {}), ({"review": 1, "id": "x"}, {}), ({}, {}),
    ({"review": "rejected", "id": "x", "x": 1}, {}), ({"review": "rejected"}, {}),
    ({"review": "rejected", "id": 5}, {}),
    (None, {"data": "not json", "content_type": "application/json"}), (None, {"data": "[1]"}),
    (["rejected"], {}),
])
def test_malformed_decisions_are_400_and_change_nothing(client, out, body, kwargs):
    before = (out / CAT / DEF / "manifest.jsonl").read_bytes()
    r = client.post(f"/api/samples/{CAT}/{DEF}/0", **({"json": body} if body is not None else kwargs))
    assert r.status_code == 400 and "review" in r.get_json()["error"]
    assert (out / CAT / DEF / "manifest.jsonl").read_bytes() == before


def test_a_decision_on_a_sample_replaced_since_the_page_loaded_is_409(client, out):
    listed = {s["index"]: s for s in client.get("/api/samples").get_json()["samples"]}
    assert listed[1]["id"] == _ids(out)[1]
    replace_sample(out, CAT, DEF, 1)  # generate --overwrite, after the page loaded
    before = (out / CAT / DEF / "manifest.jsonl").read_bytes()
    r = client.post(f"/api/samples/{CAT}/{DEF}/1", json={"review": "rejected", "id": listed[1]["id"]})
    assert r.status_code == 409 and "reload" in r.get_json()["error"]
    assert r.get_json()["sample"]["id"] == _ids(out)[1] != listed[1]["id"]  # the sample there now
    assert (out / CAT / DEF / "manifest.jsonl").read_bytes() == before and _reviews(out)[1] is None
    r = client.post(f"/api/samples/{CAT}/{DEF}/1", json={"review": "rejected", "id": r.get_json()["sample"]["id"]})
    assert r.status_code == 200 and _reviews(out)[1] == "rejected"  # judged again, as shown now
    r = client.post(f"/api/samples/{CAT}/{DEF}/2", json={"review": "accepted", "id": listed[2]["id"]})
    assert r.status_code == 200  # an untouched sample keeps its id through decisions


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost:8080",
                                  "10.0.0.7", "[::2]"])
def test_a_foreign_host_is_refused(client, out, host):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends its own Host."""
    before = (out / CAT / DEF / "manifest.jsonl").read_bytes()
    for r in (client.get("/api/samples", headers={"Host": host}), client.get("/", headers={"Host": host}),
              client.get(f"/files/{CAT}/{DEF}/image/000.png", headers={"Host": host}),
              _decide(client, out, 0, "rejected", headers={"Host": host})):
        assert r.status_code == 403 and "Host" in r.get_json()["error"]
    assert (out / CAT / DEF / "manifest.jsonl").read_bytes() == before


def test_local_hosts_and_the_bound_address_are_served(out):
    for bound, host in [("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "[::1]"),
                        ("127.0.0.1", "LocalHost:80"), ("192.168.1.5", "192.168.1.5"), ("0.0.0.0", "10.0.0.7"),
                        ("::", "[fe80::1]:80")]:
        assert create_app(out, bound).test_client().get("/api/samples", headers={"Host": host}).status_code == 200
    assert create_app(out, "0.0.0.0").test_client().get("/", headers={"Host": "evil.example"}).status_code == 403


def test_a_post_from_another_origin_is_refused(client, out):
    r = _decide(client, out, 0, "rejected", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and _reviews(out)[0] is None
    assert _decide(client, out, 0, "rejected", headers={"Origin": "null"}).status_code == 403
    assert _decide(client, out, 0, "rejected", headers={"Origin": "http://localhost"}).status_code == 200
    assert _reviews(out)[0] == "rejected"


@pytest.mark.parametrize("method, url", [
    ("post", f"/api/samples/{CAT}/{DEF}/99"), ("post", f"/api/samples/{CAT}/nope/0"),
    ("post", f"/api/samples/{CAT}/{DEF}/-1"), ("post", f"/api/samples/{CAT}/{DEF}/x"),
    ("get", "/files/../secret.txt"), ("get", "/files/..%2F..%2Fsecret.txt"),
    ("get", f"/files/{CAT}/{DEF}/image/..%2F..%2F..%2F..%2Fsecret.txt"),
    ("get", f"/files/{CAT}/{DEF}/image/%2e%2e%2fmanifest.jsonl"),
    ("get", f"/files/{CAT}/{DEF}/../manifest.jsonl"), ("get", f"/files/{CAT}/{DEF}/mask/999.png"),
    ("get", f"/files/{CAT}/{DEF}/.o2mag/000.png"), ("get", f"/files/..%2F{CAT}/{DEF}/image/000.png"),
    ("get", f"/api/samples/{CAT}/{DEF}/99/reference.png"), ("delete", f"/api/samples/{CAT}/{DEF}/0"),
])
def test_paths_outside_out_and_unknown_samples_are_4xx(client, method, url):
    r = getattr(client, method)(url, **({"json": {"review": "rejected"}} if method == "post" else {}))
    assert 400 <= r.status_code < 500
    assert b"outside OUT" not in r.data and b'"status"' not in r.data


@pytest.fixture
def live(out):
    """The app on a real threaded server on a free port."""
    server = serve(create_app(out), "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _post(url, review):
    with urllib.request.urlopen(url.split("/api/")[0] + "/api/samples", timeout=30) as r:
        index = int(url.rsplit("/", 1)[1])
        sid = next(s["id"] for s in json.load(r)["samples"] if s["index"] == index)
    req = urllib.request.Request(url, data=json.dumps({"review": review, "id": sid}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def test_two_clients_deciding_at_once_lose_nothing(live, out):
    errors = []

    def client(indices, review):
        try:
            for _ in range(3):
                for i in indices:
                    assert _post(f"{live}/api/samples/{CAT}/{DEF}/{i}", review) == 200
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=([0, 2], "rejected")),
               threading.Thread(target=client, args=([1, 3], "accepted"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _reviews(out) == {0: "rejected", 1: "accepted", 2: "rejected", 3: "accepted"}


def test_a_manifest_appended_by_a_running_writer(live, out):
    settings = next(iter(complete_samples(out / CAT / DEF)))[3]["settings"]
    writer = OutputStore(out, CAT, DEF, settings=settings)
    img = np.full((128, 128, 3), 90, np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[50:70, 50:70] = True
    try:
        for k in range(4, 10):
            assert writer.claim([k]) == [k]
            writer.write(k, img, mask, {"seed": [0, k]})
            if k % 2:
                assert _post(f"{live}/api/samples/{CAT}/{DEF}/{k}", "rejected") == 200
            with urllib.request.urlopen(f"{live}/api/samples", timeout=30) as r:
                listed = json.load(r)["samples"]
            assert [s["index"] for s in listed] == list(range(k + 1))  # every sample written so far
            writer.check_others()
    finally:
        writer.close()
    assert [i for i, r in _reviews(out).items() if r == "rejected"] == [5, 7, 9]


def test_the_command_prints_its_url_on_one_line_and_serves(out):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "o2mag", "review", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("o2mag: review page at http://127.0.0.1:") and line.endswith("/\n")
        url = line.split(" at ", 1)[1].strip()
        with urllib.request.urlopen(url + "api/samples", timeout=30) as r:
            assert len(json.load(r)["samples"]) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_command_refuses_a_folder_without_samples(tmp_path, capsys):
    assert main(["review", str(tmp_path)]) == 2
    assert "no generated samples" in capsys.readouterr().err
    assert main(["review", str(tmp_path / "missing")]) == 2


def test_a_decision_rewrites_the_contact_sheet(client, out):
    sheet = out / CAT / DEF / "contact_sheet.png"
    before = sheet.read_bytes()
    r = _decide(client, out, 1, "rejected")
    assert r.status_code == 200
    after = np.asarray(Image.open(sheet).convert("RGB"))
    assert sheet.read_bytes() != before
    assert np.array_equal(after, np.asarray(contact_sheet(out / CAT / DEF).convert("RGB")))  # the decision shown


def test_the_reference_is_read_where_generate_ran(tmp_path, monkeypatch):
    """Relative --ref/--ref-mask/--normal: the reference image comes from generate's directory,
    not from same-named files where the server runs; each sample names its own reference URL."""
    _, _, out = generated_elsewhere(tmp_path, monkeypatch, num=2)
    client = create_app(out).test_client()
    listed = client.get("/api/samples").get_json()["samples"]
    assert [s["reference"] for s in listed] == [f"/api/samples/custom/defect/{i}/reference.png" for i in (0, 1)]
    r = client.get(listed[1]["reference"])
    assert r.status_code == 200 and r.mimetype == "image/png"
