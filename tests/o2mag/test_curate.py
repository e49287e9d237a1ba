"""``o2mag generate`` writes a quality record per sample, and ``o2mag curate`` lists, rescores,
accepts and rejects (decisions in the manifest as ``review``, through ``OutputStore.annotate``,
safe beside another writer of the same folder)."""
import json
import threading

import numpy as np
import pytest
from PIL import Image

from o2mag.cli import main
from o2mag.curation.decisions import decide, review_counts, samples
from o2mag.commands import curate
from o2mag.runs.store import OutputStore, complete_samples, sample_id

from .calls import FAST, fresh_copy, generate_embedded, generated_elsewhere, replace_sample

CAT, DEF = "synthetic_surface", "scratch"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate_embedded(tmp_path_factory.mktemp("gen") / "out", 5)


@pytest.fixture
def out(generated, tmp_path):
    return fresh_copy(generated, tmp_path / "out")


def _last(out):
    return {i: rec for i, _, _, rec in complete_samples(out / CAT / DEF)}


def test_generate_writes_a_quality_record_against_the_replay(generated):
    recs = _last(generated)
    assert sorted(recs) == list(range(5))
    for rec in recs.values():
        q = rec["quality"]
        assert q["baseline"] == "replay" and 0.0 <= q["score"] <= 1.0
        assert q["presence"] > 0 and q["leakage"] >= 0 and 0 <= q["likeness"] <= 1


def test_list_prints_every_sample_with_its_score(out, capsys):
    assert main(["curate", str(out), "--list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["folder", "index", "score", "presence", "leakage", "likeness", "review"]
    recs = _last(out)
    assert len(rows) == 1 + len(recs)
    for row in rows[1:]:
        folder, index, score, *_, review = row.split()
        assert folder == f"{CAT}/{DEF}" and review == "-"
        assert float(score) == pytest.approx(recs[int(index)]["quality"]["score"], rel=1e-3)


def test_reject_below_marks_exactly_the_low_scores_and_keeps_status(out, capsys):
    scores = {i: r["quality"]["score"] for i, r in _last(out).items()}
    cut = sorted(scores.values())[2]  # the two lowest fall below it (ties aside)
    assert main(["curate", str(out), "--reject-below", repr(cut)]) == 0
    recs = _last(out)
    assert {i for i, r in recs.items() if r.get("review") == "rejected"} == {i for i, s in scores.items() if s < cut}
    assert all(r["status"] == "ok" for r in recs.values())
    counts = review_counts(out / CAT / DEF)
    assert counts["rejected"] == sum(s < cut for s in scores.values()) and counts["accepted"] == 0


def test_keep_top_accepts_k_and_rejects_the_rest(out):
    assert main(["curate", str(out), "--keep-top", "2"]) == 0
    recs = _last(out)
    ranked = sorted(recs, key=lambda i: (-recs[i]["quality"]["score"], i))
    assert [recs[i]["review"] for i in ranked] == ["accepted"] * 2 + ["rejected"] * 3


def _ranked(out):
    recs = _last(out)
    return sorted(recs, key=lambda i: (-recs[i]["quality"]["score"], i))


def test_keep_top_never_flips_the_same_commands_rejections(out):
    scores = {i: r["quality"]["score"] for i, r in _last(out).items()}
    cut = sorted(scores.values())[2]
    assert main(["curate", str(out), "--reject-below", repr(cut), "--keep-top", "5"]) == 0
    assert {i: r["review"] for i, r in _last(out).items()} == \
        {i: "rejected" if s < cut else "accepted" for i, s in scores.items()}


def test_keep_top_never_overturns_a_reviewers_decision(out):
    best, second, third, fourth, worst = _ranked(out)
    assert main(["curate", str(out), "--reject", str(best), "--accept", str(worst)]) == 0
    assert main(["curate", str(out), "--keep-top", "2"]) == 0  # worst counts as one of the 2 kept
    assert {i: r["review"] for i, r in _last(out).items()} == \
        {best: "rejected", worst: "accepted", second: "accepted", third: "rejected", fourth: "rejected"}
    before = (out / CAT / DEF / "manifest.jsonl").read_bytes()
    assert main(["curate", str(out), "--keep-top", "4"]) == 0  # everything decided: nothing changes
    assert (out / CAT / DEF / "manifest.jsonl").read_bytes() == before


def test_a_decision_never_lands_on_a_sample_replaced_since_it_was_read(out):
    old = {i: sample_id(r) for i, r in _last(out).items()}
    assert decide(out, CAT, DEF, {0: "accepted"}, {0: old[0]}).keys() == {0}
    assert sample_id(_last(out)[0]) == old[0]  # a decision keeps the sample's id
    replace_sample(out, CAT, DEF, 1)
    new = sample_id(_last(out)[1])
    assert new != old[1]
    assert decide(out, CAT, DEF, {1: "rejected", 2: "rejected"}, {1: old[1], 2: old[2]}).keys() == {2}
    assert _last(out)[1].get("review") is None  # the new picture was judged by no one
    assert decide(out, CAT, DEF, {1: "rejected"}, {1: new}).keys() == {1}
    store = OutputStore(out, CAT, DEF, annotator=True)
    try:
        with pytest.raises(ValueError, match="expect"):
            store.annotate({3: {"review": "accepted"}}, {4: old[4]})
    finally:
        store.close()


def test_curate_skips_and_names_a_sample_replaced_after_it_read_them(out, capsys, monkeypatch):
    lowest = _ranked(out)[-1]
    real = curate.reject_below

    def then_replaced(items, threshold):  # generate --overwrite runs while curate decides
        plan = real(items, threshold)
        replace_sample(out, CAT, DEF, lowest)
        return plan

    monkeypatch.setattr(curate, "reject_below", then_replaced)
    assert main(["curate", str(out), "--reject-below", "1.0", "--keep-top", "1"]) == 0
    err = capsys.readouterr().err
    assert f"skipped sample(s) {lowest}: replaced" in err
    recs = _last(out)
    assert "review" not in recs[lowest]
    assert all(r["review"] == "rejected" for i, r in recs.items() if i != lowest)


def test_accept_reject_clear_by_index_and_bad_indices(out, capsys):
    assert main(["curate", str(out), "--reject", "0,2-3", "--accept", "1"]) == 0
    assert {i: r.get("review") for i, r in _last(out).items()} == \
        {0: "rejected", 1: "accepted", 2: "rejected", 3: "rejected", 4: None}
    assert main(["curate", str(out), "--clear", "2"]) == 0
    assert "review" not in _last(out)[2]
    before = (out / CAT / DEF / "manifest.jsonl").read_bytes()
    for bad in (["--reject", "1-x"], ["--reject", "3-1"], ["--accept", "99"]):
        assert main(["curate", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
    assert (out / CAT / DEF / "manifest.jsonl").read_bytes() == before  # nothing written on an error
    assert main(["curate", str(out / "nowhere"), "--list"]) == 2


def test_rescore_gives_old_folders_records_against_the_normal_image(out, capsys):
    path = out / CAT / DEF / "manifest.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    for rec in lines:
        rec.pop("quality")
        rec.pop("check")  # a folder from before line checks too (a changed line fails its check)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))  # a folder from before quality records
    assert main(["curate", str(out), "--reject-below", "0.5"]) == 0
    assert "no quality record" in capsys.readouterr().err and "review" not in _last(out)[0]
    assert main(["curate", str(out), "--rescore"]) == 0
    recs = _last(out)
    assert all(r["quality"]["baseline"] == "normal" and 0 <= r["quality"]["score"] <= 1 for r in recs.values())
    assert main(["curate", str(out), "--rescore"]) == 0  # nothing stale: nothing rewritten
    assert "rescored 0 sample(s)" in capsys.readouterr().err


def test_decisions_beside_another_writer_of_the_folder(out):
    """A generate-like writer appends and replaces samples while decisions come in from two
    threads: every decision on an untouched sample survives, a replaced sample starts unreviewed."""
    settings = _last(out)[0]["settings"]
    writer = OutputStore(out, CAT, DEF, settings=settings)
    img = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[40:60, 40:60] = True
    try:
        errors = []

        def decide_many(indices, value):
            try:
                for i in indices:
                    decide(out, CAT, DEF, {i: value})
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=decide_many, args=([0, 1, 2], "rejected")),
                   threading.Thread(target=decide_many, args=([3, 4], "accepted"))]
        for t in threads:
            t.start()
        for k in range(5, 9):
            assert writer.claim([k]) == [k]  # as the runner does; it checks the live leases too
            writer.write(k, img, mask, {"seed": [0, k]})
            writer.check_others()
        for t in threads:
            t.join()
        assert not errors
        replacer = OutputStore(out, CAT, DEF, settings=settings, overwrite=True)
        replacer.write(1, img, mask, {"seed": [0, 1]})
        replacer.close()
    finally:
        writer.close()
    recs = _last(out)
    assert sorted(recs) == list(range(9))
    assert {i: recs[i].get("review") for i in range(9)} == \
        {0: "rejected", 1: None, 2: "rejected", 3: "accepted", 4: "accepted", 5: None, 6: None, 7: None, 8: None}
    assert [s.index for s in samples(out) if s.review == "rejected"] == [0, 2]


def test_annotate_refuses_the_store_keys(out):
    store = OutputStore(out, CAT, DEF)
    try:
        with pytest.raises(ValueError, match="status"):
            store.annotate({0: {"status": "gone"}})
        assert store.annotate({99: {"review": "rejected"}}) == {}  # no such sample: nothing written
    finally:
        store.close()


def test_a_reviewer_holding_the_manifest_lease_never_stops_a_writer(out):
    settings = _last(out)[0]["settings"]
    writer = OutputStore(out, CAT, DEF, settings=settings)
    reviewer = OutputStore(out, CAT, DEF, annotator=True)
    try:
        reviewer.leases.acquire("manifest")
        writer.check_others()  # the reviewer's lease (no settings) is no conflicting run
        assert writer.claimed_by_others() == set()
        reviewer.leases.release("manifest")
        tmp = out / CAT / DEF / "image" / ".o2mag-009.png.abc.tmp"
        tmp.write_bytes(b"half")  # a writer's file being renamed into place
        OutputStore(out, CAT, DEF, annotator=True).close()
        assert tmp.exists()  # a reviewer never tidies writers' files
    finally:
        writer.close()
        reviewer.close()


def test_regenerate_rejected_adds_new_samples_with_the_folders_own_settings(out, capsys):
    assert main(["curate", str(out), "--reject", "1,3"]) == 0
    before = {i: (out / CAT / DEF / "image" / f"{i:03d}.png").read_bytes() for i in range(5)}
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "5", "--device", "cpu"]) == 0
    assert "3 of 5 samples kept, generating 2 more" in capsys.readouterr().err
    recs = _last(out)
    assert sorted(recs) == list(range(7))
    assert [i for i, r in recs.items() if r.get("review") == "rejected"] == [1, 3]
    assert all(recs[i]["settings"] == recs[0]["settings"] and "quality" in recs[i] for i in (5, 6))
    assert recs[5]["mask_params"] != recs[1]["mask_params"]  # a new index: a new mask seed
    assert all((out / CAT / DEF / "image" / f"{i:03d}.png").read_bytes() == b for i, b in before.items())
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "5"]) == 0  # enough: nothing made
    assert sorted(_last(out)) == list(range(7))
    assert main(["curate", str(out), "--num", "5"]) == 2


def _rand_png(path, seed, shape=(80, 80, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.RandomState(seed).rand(*shape) * 255).astype(np.uint8)).save(path)


def _mask_png(path, top=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((80, 80), np.uint8)
    m[top:top + 20, 30:50] = 255
    Image.fromarray(m).save(path)


def _rewrite(manifest, drop):
    """The manifest as an older o2mag would have written it: without ``drop`` (and the line check)."""
    lines = [json.loads(l) for l in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in {"check", *drop}}) + "\n"
                                for r in lines))


@pytest.fixture
def two_dirs(tmp_path, monkeypatch):
    """A folder made by o2mag generate from relative --ref/--ref-mask/--normal in dir A, then the
    current directory moved to dir B, which holds other files of the same names (not images)."""
    return generated_elsewhere(tmp_path, monkeypatch, num=3)


def test_regenerate_and_rescore_read_the_inputs_where_generate_ran(two_dirs, capsys):
    a, _, out = two_dirs
    folder = out / "custom" / "defect"
    assert all(r["cwd"] == str(a) for _, _, _, r in complete_samples(folder))
    assert main(["curate", str(out), "--reject", "0", "--category", "custom", "--defect", "defect"]) == 0
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "3", "--device", "cpu"]) == 0
    recs = {i: rec for i, _, _, rec in complete_samples(folder)}
    assert sorted(recs) == [0, 1, 2, 3] and recs[3]["settings"] == recs[0]["settings"]
    assert recs[3]["cwd"] == str(a)  # made from A's files, run from A again
    _rewrite(folder / "manifest.jsonl", ["quality"])
    capsys.readouterr()
    assert main(["curate", str(out), "--rescore"]) == 0
    assert "not scored" not in capsys.readouterr().err
    assert all(r["quality"]["baseline"] == "normal" for _, _, _, r in complete_samples(folder))


def test_lines_without_a_working_directory_refuse_relative_paths(two_dirs, capsys):
    _, _, out = two_dirs
    folder = out / "custom" / "defect"
    _rewrite(folder / "manifest.jsonl", ["cwd", "quality"])  # an older o2mag's folder
    assert main(["curate", str(out), "--reject", "0", "--category", "custom", "--defect", "defect"]) == 0
    before = (folder / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'ref.png'" in err and "directory" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert (folder / "manifest.jsonl").read_bytes() == before  # refused before anything was made
    assert main(["curate", str(out), "--rescore"]) == 0
    err = capsys.readouterr().err
    assert err.count("not scored") == 3 and "'ref.png'" in err
    assert all("quality" not in r for _, _, _, r in complete_samples(folder))


def test_regenerate_counts_mvtec_references_as_generate_does(tmp_path):
    root, out = tmp_path / "mvtec", tmp_path / "out"
    for i in range(3):
        _rand_png(root / f"bottle/test/broken_large/{i:03d}.png", 10 + i)
        _mask_png(root / f"bottle/ground_truth/broken_large/{i:03d}_mask.png", 10 + 10 * i)
    _rand_png(root / "bottle/train/good/000.png", 20)
    (root / "bottle/test/broken_large/.DS_Store").write_bytes(b"\0\0\0\1Bud1")  # what Finder leaves
    assert main(["generate", "--mvtec-root", str(root), "--category", "bottle", "--defect", "broken_large",
                 "--ref-index", "1", "--foreground", "all", "--num", "2", "--out", str(out), *FAST]) == 0
    assert main(["curate", str(out), "--reject", "0"]) == 0
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "2", "--device", "cpu"]) == 0
    recs = {i: rec for i, _, _, rec in complete_samples(out / "bottle" / "broken_large")}
    assert sorted(recs) == [0, 1, 2] and recs[2]["settings"] == recs[0]["settings"]
    assert recs[2]["settings"]["reference"].endswith("001.png")


@pytest.mark.parametrize("rc", [1, 3])
def test_regenerate_passes_on_the_exit_code_of_generate(out, capsys, monkeypatch, rc):
    from o2mag.commands import curate
    calls = []
    monkeypatch.setattr(curate.generate, "run", lambda args: calls.append(args) or rc)  # made nothing
    assert main(["curate", str(out), "--reject", "1,3"]) == 0
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "5", "--device", "cpu"]) == rc
    assert len(calls) == 1  # no more rounds after a failed one
    assert "only 3 of 5 samples kept" in capsys.readouterr().err


def test_regenerate_that_keeps_too_few_is_incomplete(out, capsys, monkeypatch):
    from o2mag.commands import curate
    monkeypatch.setattr(curate.generate, "run", lambda args: 0)  # "done", but nothing new is kept
    assert main(["curate", str(out), "--reject", "1,3"]) == 0
    assert main(["curate", str(out), "--regenerate-rejected", "--num", "5", "--device", "cpu"]) == 3
    assert f"after {curate.ROUNDS} rounds" in capsys.readouterr().err
