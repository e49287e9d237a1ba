"""``o2mag evaluate``: short real runs on a tiny MVTec-like tree, and one-line input errors."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from o2mag.cli import main
from o2mag.evaluation.demo import make_demo_data
from o2mag.runs.store import OutputStore

# a two-epoch schedule on 32 px images with a 4-wide U-Net: seconds on a CPU
TINY = ["--size", "32", "--epochs", "2", "--samples-per-epoch", "16", "--batch-size", "8", "--base-width", "4",
        "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The demo's tiny MVTec-like root and synthetic tree (two categories, two defects each)."""
    mvtec, synth = make_demo_data(tmp_path_factory.mktemp("demo"))
    return mvtec, synth


@pytest.fixture()
def copy(trees, tmp_path):
    """A private copy to break."""
    mvtec, synth = (tmp_path / "mvtec", tmp_path / "synthetic")
    shutil.copytree(trees[0], mvtec)
    shutil.copytree(trees[1], synth)
    return mvtec, synth


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last.startswith("o2mag: error:") and needle in last, err
    return last


def test_detect_two_epochs_writes_results_and_report(trees, tmp_path, capsys):
    mvtec, synth = trees
    out = tmp_path / "eval"
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "plate", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "final-checkpoint" and not res["leaky"] and not res["demo"]
    rec = res["categories"]["plate"]
    assert set(rec["metrics"]) == {"auroc_i", "ap_i", "f1max_i", "auroc_p", "ap_p", "f1max_p", "aupro"}
    assert all(0 <= v <= 1 for v in rec["metrics"].values())
    assert [h["epoch"] for h in rec["history"]] == [1, 2]
    # the split: 9 images per defect, the first 3 held back; the synthetic 24 per defect all used
    assert rec["split"]["test"] == {"good": 8, "dent": 6, "scratch": 6}
    assert rec["split"]["references"] == {"dent": 3, "scratch": 3}
    assert rec["synthetic"] == {"dent": 24, "scratch": 24}
    assert rec["checkpoint"].endswith("model_final.pt") and (out / "plate" / "model_final.pt").is_file()
    report = (out / "report.md").read_text()
    assert "| plate |" in report and "LEAKY" not in report and "Demonstration" not in report
    for png in ("per_category.png", "pr_curves.png", "plate/examples.png"):
        assert Image.open(out / png).size[0] > 100
    assert res["mean"] == rec["metrics"]

    # same --out again: refused without --overwrite, nothing replaced
    before = (out / "results.json").read_bytes()
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "plate", "--out", str(out), *TINY]) == 2
    _one_line_error(capsys, "--overwrite")
    assert (out / "results.json").read_bytes() == before


def test_seeded_runs_repeat(trees, tmp_path):
    mvtec, synth = trees
    metrics = []
    for k in range(2):
        out = tmp_path / f"e{k}"
        assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                     "--category", "fabric", "--out", str(out), "--seed", "3", *TINY, "--epochs", "1"]) == 0
        metrics.append(json.loads((out / "results.json").read_text())["categories"]["fabric"]["metrics"])
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-6)


def test_leaky_protocol_is_marked_everywhere(trees, tmp_path, capsys):
    mvtec, synth = trees
    out = tmp_path / "leaky"
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "all", "--out", str(out), "--leaky-paper-protocol", *TINY]) == 0
    err = capsys.readouterr().err
    assert "LEAKY" in err
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "leaky-paper" and res["leaky"] and set(res["categories"]) == {"fabric", "plate"}
    assert res["settings"]["mask_resize"] == "bilinear-truncated" and res["settings"]["pixel_f1"] == "0.05 grid"
    for cat, rec in res["categories"].items():
        assert rec["selected_epoch"] in (1, 2) and len(rec["per_epoch_test_metrics"]) == 2
        assert rec["checkpoint"].endswith("model_best_on_test_LEAKY.pt")
        chosen = rec["per_epoch_test_metrics"][rec["selected_epoch"] - 1]
        assert rec["metrics"] == pytest.approx({k: v for k, v in chosen.items() if k != "epoch"}, abs=1e-6)
    assert "LEAKY PROTOCOL" in (out / "report.md").read_text()


def test_embedded_demo_path_runs_offline(tmp_path, capsys):
    """The README's default (no data given), here with a one-epoch schedule to keep CI short; the
    full demo schedule is the same code with more epochs."""
    out = tmp_path / "demo"
    assert main(["evaluate", "detect", "--out", str(out), "--epochs", "1", "--samples-per-epoch", "8",
                 "--size", "32", "--quiet"]) == 0
    assert "EMBEDDED DEMO" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["demo"] and set(res["categories"]) == {"fabric", "plate"}
    assert res["settings"]["train"]["base_width"] == 8  # demo default, not the papers' 64
    assert "Demonstration" in (out / "report.md").read_text()


def test_manifest_reference_in_the_test_split_is_held_back(copy, tmp_path):
    """A generator that took its reference from test images beyond the first third must not be
    tested on that image."""
    mvtec, synth = copy
    leaked = mvtec / "plate" / "test" / "dent" / "005.png"
    store = OutputStore(synth, "plate", "dent", overwrite=True, settings={"reference": str(leaked)})
    store.write(0, np.zeros((96, 96, 3), np.uint8), np.pad(np.ones((4, 4), bool), 46))
    out = tmp_path / "o"
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "plate", "--out", str(out), *TINY]) == 0
    rec = json.loads((out / "results.json").read_text())["categories"]["plate"]
    assert rec["split"]["excluded_by_manifest"] == [str(leaked)]
    assert rec["split"]["test"]["dent"] == 5 and rec["split"]["references"]["dent"] == 4


def test_detect_input_errors(copy, tmp_path, capsys):
    mvtec, synth = copy
    base = ["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth), "--out",
            str(tmp_path / "o"), *TINY]

    assert main([*base, "--category", "bottle"]) == 2
    _one_line_error(capsys, "'bottle' not found")

    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--category", "plate"]) == 2
    _one_line_error(capsys, "go together")

    assert main([*base, "--size", "48"]) == 2
    _one_line_error(capsys, "multiple of 32")

    # a synthetic category with folders but no sample
    for d in (synth / "fabric").iterdir():
        shutil.rmtree(d / "image")
    assert main([*base, "--category", "fabric"]) == 2
    _one_line_error(capsys, "no complete samples")

    # a ground-truth mask of another size than its image
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(mvtec / "plate" / "ground_truth" / "dent" / "004_mask.png")
    assert main([*base, "--category", "plate"]) == 2
    last = _one_line_error(capsys, "004_mask.png")
    assert "50x40" in last and "004.png" in last
    # none of these input errors left an --out folder behind (not even an empty one)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, extra", [
    ("detect", ["--category", "bottle"]), ("detect", ["--device", "cuda:99"]),
    ("detect", ["--device", "cpu", "--amp", "on"]),
    ("classify", ["--category", "plate", "--backbone", "tiny", "--device", "cuda:99"]),
])
def test_an_input_error_creates_no_out_folder(trees, tmp_path, capsys, command, extra):
    mvtec, synth = trees
    out = tmp_path / "new" / "results"
    code = main(["evaluate", command, "--mvtec-root", str(mvtec), "--synthetic", str(synth), "--out", str(out),
                 "--quiet", *extra])
    assert code == 2, capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_quality_input_error_creates_no_out_folder(trees, tmp_path, capsys):
    mvtec, _ = trees
    good = mvtec / "plate" / "train" / "good"
    out = tmp_path / "q"
    assert main(["evaluate", "quality", "--generated", str(good), "--reference", str(good), "--out", str(out),
                 "--kid-features", "tiny", "--lpips-net", "tiny", "--device", "cuda:99", "--quiet"]) == 2
    assert not out.exists()


def test_split_without_test_defects_is_an_error(copy, tmp_path, capsys):
    mvtec, synth = copy
    cat = mvtec / "plate"
    for defect in ("dent", "scratch"):  # keep 2 images per defect: 2 // 3 = 0 held back ...
        for p in sorted((cat / "test" / defect).glob("*.png"))[2:]:
            p.unlink()
        # ... but the manifests name both as references, so nothing is left to test
        store = OutputStore(synth, "plate", defect, overwrite=True,
                            settings={"reference": str(cat / "test" / defect / "001.png")})
        store.write(0, np.zeros((96, 96, 3), np.uint8), np.pad(np.ones((4, 4), bool), 46))
        store = OutputStore(synth, "plate", defect, overwrite=True,
                            settings={"reference": str(cat / "test" / defect / "000.png")})
        store.write(1, np.zeros((96, 96, 3), np.uint8), np.pad(np.ones((4, 4), bool), 46))
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth), "--category",
                 "plate", "--out", str(tmp_path / "o"), *TINY]) == 2
    _one_line_error(capsys, "holds no defect image")


def test_classify_with_tiny_backbone(trees, tmp_path, capsys):
    mvtec, synth = trees
    out = tmp_path / "cls"
    assert main(["evaluate", "classify", "--mvtec-root", str(mvtec), "--synthetic", str(synth), "--category",
                 "all", "--backbone", "tiny", "--epochs", "1", "--size", "32", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    for cat, rec in res["categories"].items():
        conf = np.array(rec["confusion"])
        assert conf.shape == (2, 2) and conf.sum() == rec["n_test"] == 12
        assert rec["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    assert "Demonstration backbone" in (out / "report.md").read_text()


def test_classify_resnet_without_weights_is_a_clean_error(trees, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    mvtec, synth = trees
    assert main(["evaluate", "classify", "--mvtec-root", str(mvtec), "--synthetic", str(synth), "--category",
                 "plate", "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "resnet34-b627a593.pth")
    assert not (tmp_path / "c").exists()  # failed before writing anything


def test_quality_with_tiny_networks(trees, tmp_path, capsys):
    mvtec, synth = trees
    out = tmp_path / "q"
    assert main(["evaluate", "quality", "--generated", str(synth / "plate" / "dent"), "--reference",
                 str(mvtec / "plate" / "test" / "dent"), "--kid-features", "tiny", "--lpips-net", "tiny",
                 "--size", "32", "--kid-subsets", "5", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert "demonstrate" in captured.err
    res = json.loads((out / "quality.json").read_text())
    assert res["kid"]["subset_size"] == 9 and res["kid"]["n_fake"] == 24  # capped at the 9 references
    assert printed["ic_lpips"] == res["ic_lpips"]["ic_lpips"] > 0
    assert sum(res["ic_lpips"]["cluster_sizes"]) == 24


def test_quality_inception_without_weights_is_a_clean_error(trees, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    mvtec, synth = trees
    assert main(["evaluate", "quality", "--generated", str(synth / "plate" / "dent"), "--reference",
                 str(mvtec / "plate" / "test" / "dent")]) == 2
    _one_line_error(capsys, "weights-inception-2015-12-05-6726825d.pth")
    assert main(["evaluate", "quality", "--generated", str(tmp_path / "none"), "--reference", "x"]) == 2
    _one_line_error(capsys, "not found")


def test_evaluate_without_subcommand_prints_help(capsys):
    assert main(["evaluate"]) == 2
    assert "detect" in capsys.readouterr().out


def test_real_refs_mix_the_held_back_references_into_training(trees, tmp_path):
    mvtec, synth = trees
    out = tmp_path / "rr"
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth), "--category",
                 "plate", "--out", str(out), "--real-refs", *TINY, "--epochs", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["real_refs"] and res["settings"]["train"]["real_fraction"] == 0.1
    assert res["categories"]["plate"]["split"]["test"] == {"good": 8, "dent": 6, "scratch": 6}  # unchanged
    assert "real reference defects" in (out / "report.md").read_text()


def test_training_batches_follow_the_configured_shares():
    import torch

    from o2mag.evaluation.segmentation import TrainConfig, _draw_batch

    gen = torch.Generator().manual_seed(0)
    cfg = TrainConfig(normal_fraction=0.5, real_fraction=0.1)
    counts = {"normal": 0, "real": 0, "synthetic": 0}
    for _ in range(200):
        for k, idx in _draw_batch(gen, {"normal": 5, "real": 3, "synthetic": 7}, cfg, 50).items():
            counts[k] += len(idx)
            assert all(0 <= i < {"normal": 5, "real": 3, "synthetic": 7}[k] for i in idx.tolist())
    total = sum(counts.values())
    assert total == 10_000
    assert abs(counts["normal"] / total - 0.5) < 0.02 and abs(counts["real"] / total - 0.1) < 0.01
    # no real pool: its share goes to the synthetic samples
    picks = _draw_batch(gen, {"normal": 5, "synthetic": 7}, cfg, 1000)
    assert len(picks["real"]) == 0 and len(picks["synthetic"]) > 400


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="float16 autocast runs on CUDA only")
def test_amp_on_cuda_trains_to_finite_results(trees, tmp_path):
    """AMP (float16 autocast + gradient scaling) on a GPU: detect and classify finish with finite
    losses and metrics in range."""
    mvtec, synth = trees
    out = tmp_path / "amp"
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "plate", "--out", str(out), "--device", "cuda", "--amp", "on",
                 *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["train"]["amp"] is True and res["settings"]["device"].startswith("cuda")
    rec = res["categories"]["plate"]
    assert all(np.isfinite(h["loss"]) for h in rec["history"]), rec["history"]
    assert all(0 <= v <= 1 for v in rec["metrics"].values())
    cls = tmp_path / "cls"
    assert main(["evaluate", "classify", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "plate", "--backbone", "tiny", "--epochs", "1", "--size", "32",
                 "--device", "cuda", "--out", str(cls), "--quiet"]) == 0
    res = json.loads((cls / "results.json").read_text())["categories"]["plate"]
    assert 0 <= res["accuracy"] <= 1


def test_detect_trains_without_rejected_samples_and_says_how_many(copy, tmp_path, capsys):
    from o2mag.curation.decisions import decide

    mvtec, synth = copy
    decide(synth, "plate", "dent", {0: "rejected", 3: "rejected", 5: "accepted"})
    decide(synth, "plate", "scratch", {1: "rejected"})
    out = tmp_path / "eval"
    assert main(["evaluate", "detect", "--mvtec-root", str(mvtec), "--synthetic", str(synth),
                 "--category", "plate", "--out", str(out), *TINY]) == 0
    assert "plate: trained without 3 rejected synthetic sample(s) (dent 2, scratch 1)" in capsys.readouterr().err
    rec = json.loads((out / "results.json").read_text())["categories"]["plate"]
    assert rec["synthetic"] == {"dent": 22, "scratch": 23}
    assert rec["synthetic_rejected"] == {"dent": 2, "scratch": 1}
    assert "dent 22 (2 rejected left out)" in (out / "report.md").read_text()


def test_quality_uses_only_the_manifests_kept_samples(copy, tmp_path, capsys):
    """As detect and classify do: rejected samples and files the manifest does not list as
    complete (leftovers of an interrupted run) are left out, and the count says so."""
    from o2mag.curation.decisions import decide

    mvtec, synth = copy
    folder = synth / "plate" / "dent"
    decide(synth, "plate", "dent", {0: "rejected", 1: "rejected"})
    shutil.copy(folder / "image" / "002.png", folder / "image" / "900.png")  # no manifest line
    out = tmp_path / "q"
    assert main(["evaluate", "quality", "--generated", str(folder), "--reference",
                 str(mvtec / "plate" / "test" / "dent"), "--kid-features", "tiny", "--lpips-net", "tiny",
                 "--size", "32", "--kid-subsets", "5", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "22 sample(s) used" in err and "2 rejected" in err and "1 other file(s)" in err
    res = json.loads((out / "quality.json").read_text())
    assert res["kid"]["n_fake"] == 22 and sum(res["ic_lpips"]["cluster_sizes"]) == 22
