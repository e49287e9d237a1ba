"""``o2mag dataset`` on a tiny MVTec-like tree made here, with the embedded model, offline."""
import json

import numpy as np
import pytest
from PIL import Image

from o2mag.cli import main
from o2mag.commands.dataset import summary_table
from o2mag.sources.mvtec import reference_count
from o2mag.runs.store import read_manifest

FAST = ["--steps", "2", "--ago-steps", "1", "--quiet", "--foreground", "all"]


def _noise(rng, side):
    return Image.fromarray((rng.rand(side, side, 3) * 255).astype(np.uint8))


def _tree(root, spec):
    """spec: {category: {defect: number of test images}}; two train/good images per category."""
    rng = np.random.RandomState(0)
    for cat, defects in spec.items():
        for d, n in defects.items():
            for sub in (f"{cat}/test/{d}", f"{cat}/ground_truth/{d}"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _noise(rng, 48).save(root / f"{cat}/test/{d}/{i:03d}.png")
                m = np.zeros((48, 48), np.uint8)
                m[5 + 3 * i:20 + 3 * i, 10:25] = 255
                Image.fromarray(m).save(root / f"{cat}/ground_truth/{d}/{i:03d}_mask.png")
        (root / f"{cat}/test/good").mkdir(parents=True, exist_ok=True)
        (root / f"{cat}/train/good").mkdir(parents=True, exist_ok=True)
        for i in range(2):
            _noise(rng, 48).save(root / f"{cat}/train/good/{i:03d}.png")
    return root


def _err(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("o2mag: error:")
    for n in needles:
        assert n in err, err


def test_reference_count_is_the_first_third():
    assert [reference_count(n) for n in (0, 2, 3, 5, 6, 10, 30)] == [0, 0, 1, 1, 2, 3, 10]


def test_dataset_from_an_mvtec_root(tmp_path, capsys):
    root = _tree(tmp_path / "mvtec", {"bottle": {"crack": 6, "dent": 3}, "carpet": {"hole": 4}})
    out = tmp_path / "synth"
    args = ["dataset", "--mvtec-root", str(root), "--out", str(out), "--num", "3", "--num-normals", "2",
            "--batch-size", "2", *FAST]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "3 groups (2 categories), 0 of 9 samples present, generating 9" in err
    # the summary table: a row per group and the totals
    rows = {tuple(line.split()[:2]): line.split() for line in err.splitlines() if line.split()[:1] in
            (["bottle"], ["carpet"], ["total"])}
    assert rows[("bottle", "crack")][2:6] == ["2", "3", "3", "3"]  # refs, wanted, present, made
    assert rows[("bottle", "dent")][2:6] == ["1", "3", "3", "3"]
    assert rows[("total", "3")][4:7] == ["9", "9", "9"]
    assert "AGO runs 4" in err  # one AGO per reference: 2 + 1 + 1

    crack = out / "bottle" / "crack"
    lines = sorted(read_manifest(crack / "manifest.jsonl"), key=lambda r: r["index"])
    assert [r["index"] for r in lines] == [0, 1, 2]
    refs = [r["reference"].rsplit("/", 1)[-1] for r in lines]
    normals = [r["normal"].rsplit("/", 1)[-1] for r in lines]
    assert refs == ["000.png", "001.png", "000.png"]  # i mod R over the first third (6 // 3 = 2)
    assert normals == ["000.png", "000.png", "001.png"]  # (i // R) mod M
    assert lines[0]["settings"]["references"][1].endswith("crack/001.png")
    for sub in ("image", "mask"):
        assert sorted(p.name for p in (crack / sub).iterdir()) == ["000.png", "001.png", "002.png"]
    assert np.asarray(Image.open(crack / "mask" / "000.png")).any()
    for g in ("bottle/dent", "carpet/hole"):
        assert len(read_manifest(out / g / "manifest.jsonl")) == 3
    info = json.loads((out / "dataset.json").read_text())
    assert [(g["category"], g["defect"], len(g["references_used"])) for g in info["groups"]] == \
        [("bottle", "crack", 2), ("bottle", "dent", 1), ("carpet", "hole", 1)]

    # a rerun finds everything: nothing made, nothing rewritten; more samples for one category only
    before = (crack / "image" / "000.png").read_bytes()
    assert main(args) == 0
    assert "9 of 9 samples present, generating 0" in capsys.readouterr().err
    assert main(args[:-len(FAST)] + FAST + ["--category", "bottle", "--defect", "crack"] +
                ["--num", "4"]) == 0
    assert "1 groups (1 categories), 3 of 4 samples present, generating 1" in capsys.readouterr().err
    assert (crack / "image" / "000.png").read_bytes() == before
    assert len(read_manifest(crack / "manifest.jsonl")) == 4

    _err(args + ["--category", "cable"], capsys, "category 'cable' not found", "bottle, carpet")
    _err(args + ["--defect", "scratch"], capsys, "defect type 'scratch' not found")
    _err(args + ["--prompt", "a {colour} {defect}"], capsys, "--prompt", "{defect} and {category}")
    _err(args + ["--prompt", "a flaw on a {category}"], capsys, "bottle/crack", "put {defect} in --prompt")


def test_dataset_input_errors(tmp_path, capsys):
    root = _tree(tmp_path / "mvtec", {"bottle": {"crack": 2}})
    _err(["dataset", "--out", str(tmp_path / "o"), *FAST], capsys, "--mvtec-root ROOT or --job")
    _err(["dataset", "--mvtec-root", str(root), "--out", str(tmp_path / "o"), *FAST], capsys,
         "holds 2 image(s)", "no reference")
    _err(["dataset", "--mvtec-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *FAST], capsys,
         "not found")
    _err(["dataset", "--job", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"), *FAST], capsys,
         "job file not found")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))


@pytest.mark.parametrize("job, needle", [
    ({"groups": []}, 'non-empty "groups"'),
    ({"groups": [{"category": "a", "defect": "b"}], "extra": 1}, "unknown key(s) ['extra']"),
    ({"groups": [{"category": "a", "defect": "b"}]}, 'needs "references"'),
    ({"groups": [{"category": "a", "defect": "b", "references": [{"image": "r.png", "mask": "m.png"}]}]},
     'no "normals"'),
    ({"groups": [{"category": "a", "defect": "b", "num": 0, "references": []}]}, '"num" must be'),
    ({"groups": [{"category": "a", "defect": "b", "references": [{"image": "x.png"}]}]}, "each reference is"),
])
def test_job_file_errors(tmp_path, capsys, job, needle):
    f = tmp_path / "job.json"
    f.write_text(json.dumps(job))
    for name in ("r.png", "m.png"):
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / name)
    _err(["dataset", "--job", str(f), "--out", str(tmp_path / "o"), *FAST], capsys, needle)


def test_dataset_from_a_job_file(tmp_path, capsys):
    _tree(tmp_path / "mvtec", {"bottle": {"crack": 3}})
    files = tmp_path / "mine"
    files.mkdir()
    rng = np.random.RandomState(5)
    Image.fromarray((rng.rand(40, 40, 3) * 255).astype(np.uint8)).save(files / "ref.png")
    m = np.zeros((40, 40), np.uint8)
    m[10:25, 5:30] = 255
    Image.fromarray(m).save(files / "ref_mask.png")
    (files / "good").mkdir()
    Image.fromarray((rng.rand(40, 40, 3) * 255).astype(np.uint8)).save(files / "good" / "a.png")
    job = {"num": 2, "mvtec_root": "mvtec", "groups": [
        {"category": "bottle", "defect": "crack"},
        {"category": "plate", "defect": "scratch", "num": 1, "prompt": "a scratch on a plate",
         "anomaly_word": "scratch", "references": [{"image": "mine/ref.png", "mask": "mine/ref_mask.png"}],
         "normals": ["mine/good"]},
    ]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / "synth"
    assert main(["dataset", "--job", str(tmp_path / "job.json"), "--out", str(out), *FAST]) == 0
    assert "2 groups (2 categories), 0 of 3 samples present, generating 3" in capsys.readouterr().err
    assert len(read_manifest(out / "bottle" / "crack" / "manifest.jsonl")) == 2
    plate = read_manifest(out / "plate" / "scratch" / "manifest.jsonl")
    assert len(plate) == 1 and plate[0]["settings"]["prompt"] == "a scratch on a plate"
    assert plate[0]["normal"].endswith("good/a.png") and plate[0]["reference"].endswith("mine/ref.png")
    assert (out / "plate" / "scratch" / "contact_sheet.png").is_file()


def test_the_evaluation_holds_out_every_reference_a_dataset_used(tmp_path, capsys):
    from o2mag.evaluation.data import mvtec_split, synthetic_samples

    root = _tree(tmp_path / "mvtec", {"bottle": {"crack": 6}})
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "bottle/test/good/000.png")
    beyond = root / "bottle/test/crack/004.png"  # not in the first third (000, 001)
    job = {"groups": [{"category": "bottle", "defect": "crack", "num": 1, "mvtec_root": str(root),
                       "references": [{"image": str(beyond),
                                       "mask": str(root / "bottle/ground_truth/crack/004_mask.png")}]}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["dataset", "--job", str(tmp_path / "job.json"), "--out", str(tmp_path / "s"), *FAST]) == 0
    split = mvtec_split(root, "bottle", synthetic_samples(tmp_path / "s", "bottle").references)
    tested = {t.image.name for t in split.test if t.defect == "crack"}
    assert "004.png" not in tested and tested == {"002.png", "003.png", "005.png"}


def test_summary_table_layout():
    from o2mag.runs.runner import GroupResult, RunReport

    rep = RunReport(groups=[GroupResult("a/b", "a", "b", wanted=4, present=0, todo=4, references=2, made=4,
                                        seconds=2.0, complete=4),
                            GroupResult("a/c", "a", "c", wanted=4, present=4, todo=0, references=1,
                                        complete=4)])
    lines = summary_table(rep).splitlines()
    assert lines[0].split() == ["category", "defect", "refs", "wanted", "present", "made", "s/sample"]
    assert lines[2].split() == ["a", "b", "2", "4", "4", "4", "0.50"]
    assert lines[3].split() == ["a", "c", "1", "4", "4", "0", "-"]
    assert lines[-1].split() == ["total", "2", "groups", "3", "8", "8", "4", "0.50"]


def test_summary_table_reports_review_decisions_per_defect_type():
    from o2mag.runs.runner import GroupResult, RunReport

    rep = RunReport(groups=[GroupResult("a/b", "a", "b", wanted=4, present=4, todo=0, references=1, complete=4),
                            GroupResult("a/c", "a", "c", wanted=3, present=3, todo=0, references=1, complete=3)])
    reviews = {"a/b": {"accepted": 1, "rejected": 2, "unreviewed": 1},
               "a/c": {"accepted": 0, "rejected": 0, "unreviewed": 3}}
    lines = summary_table(rep, reviews).splitlines()
    assert lines[0].split()[-3:] == ["accepted", "rejected", "unreviewed"]
    assert lines[2].split()[-3:] == ["1", "2", "1"] and lines[3].split()[-3:] == ["0", "0", "3"]
    assert lines[-1].split()[-3:] == ["1", "2", "4"]
