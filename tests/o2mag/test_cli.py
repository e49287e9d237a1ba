"""The ``o2mag`` command: embedded default, output tree, resume/overwrite, and clean input errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from o2mag.cli import main

FAST = ["--steps", "2", "--ago-steps", "1", "--quiet"]


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_embedded_default_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "o2mag-out"
    assert main(["generate", "--out", str(out), "--quiet"]) == 0  # the documented default
    err = capsys.readouterr().err
    assert "EMBEDDED DEFAULT" in err and "stable-diffusion-v1-5" in err
    d = out / "synthetic_surface" / "scratch"
    images = sorted((d / "image").glob("*.png"))
    assert [p.name for p in images] == [f"{i:03d}.png" for i in range(8)]
    assert len(list((d / "mask").glob("*.png"))) == 8
    rec = _lines(d / "manifest.jsonl")
    assert [r["index"] for r in rec] == list(range(8))
    r0 = rec[0]
    assert r0["settings"]["steps"] == 10 and r0["settings"]["ago_steps"] == 20
    assert r0["settings"]["model"] == "o2mag-tiny-seed0" and r0["seed"] == [0, 0]
    assert r0["mask_params"]["kind"] == "affine" and "torch" in r0["versions"]
    img = Image.open(images[0])
    assert img.size == (128, 128) and img.mode == "RGB"
    m = np.asarray(Image.open(d / "mask" / "000.png"))
    assert m.any() and set(np.unique(m)) <= {0, 255}
    assert len(list((out / ".o2mag-cache" / "embeddings").glob("*.pt"))) == 1
    assert Image.open(d / "contact_sheet.png").size[0] > 2 * 128  # written beside the manifest
    before = {p.name: p.read_bytes() for p in images}

    # rerun: nothing missing, nothing rewritten
    assert main(["generate", "--out", str(out), "--quiet"]) == 0
    assert "8 of 8 samples present, generating 0" in capsys.readouterr().err
    assert len(_lines(d / "manifest.jsonl")) == 8

    # --num grows: only the new indices are made; the old files are untouched; a fresh run of the
    # same settings would have made the same sample 8 (per-index mask seeds)
    assert main(["generate", "--out", str(out), "--num", "10", "--quiet"]) == 0
    assert "8 of 10 samples present, generating 2" in capsys.readouterr().err
    assert all((d / "image" / n).read_bytes() == b for n, b in before.items())
    assert [r["index"] for r in _lines(d / "manifest.jsonl")] == list(range(10))

    # other settings without --overwrite: refused (exit 2, no traceback), nothing written
    assert main(["generate", "--out", str(out), "--steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--overwrite" in err and "Traceback" not in err
    assert len(_lines(d / "manifest.jsonl")) == 10

    # --overwrite replaces exactly the indices asked for
    assert main(["generate", "--out", str(out), "--num", "1", "--overwrite", *FAST]) == 0
    rec = _lines(d / "manifest.jsonl")
    assert rec[-1]["index"] == 0 and rec[-1]["settings"]["steps"] == 2
    assert (d / "image" / "001.png").read_bytes() == before["001.png"]


def test_help_via_console_script():
    # the installed console script (pyproject declares o2mag = o2mag.cli:main); next to the running
    # interpreter in a virtual environment, else on PATH
    import shutil
    from pathlib import Path

    exe = Path(sys.executable).with_name("o2mag")
    exe = str(exe) if exe.exists() else shutil.which("o2mag")
    assert exe, "the o2mag console script is not installed (pip install -e .)"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout and "Traceback" not in r.stderr
    r = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ("--ref", "--ref-mask", "--normal", "--num", "--out", "--model", "--mvtec-root", "--kv-cache",
                "--no-blend", "--overwrite", "--resume", "--mask-mode", "--masks", "--foreground", "--dtype",
                "--device", "--ago-steps", "--steps", "--batch-size", "--seed", "--prompt", "--anomaly-word"):
        assert opt in r.stdout, opt


@pytest.fixture()
def files(tmp_path):
    rng = np.random.RandomState(0)
    img = (rng.rand(96, 96, 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "ref.png")
    Image.fromarray(np.roll(img, 5, axis=0)).save(tmp_path / "normal.png")
    m = np.zeros((96, 96), np.uint8)
    m[30:50, 40:60] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(m[:64, :64]).save(tmp_path / "small_mask.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.roll(m, 20, axis=1)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "notamodel").mkdir()
    return tmp_path


def test_user_files_with_kv_cache_and_folder_masks(files, capsys):
    out = files / "out"
    args = ["generate", "--ref", str(files / "ref.png"), "--ref-mask", str(files / "mask.png"),
            "--normal", str(files / "normal.png"), "--out", str(out), "--num", "3", "--batch-size", "2",
            "--prompt", "a photo of a crack", "--category", "thing", "--defect", "crack", *FAST]
    assert main(args + ["--kv-cache", "--masks", str(files / "masks")]) == 0
    d = out / "thing" / "crack"
    rec = _lines(d / "manifest.jsonl")
    assert len(rec) == 3 and rec[0]["settings"]["anomaly_word"] == "crack"
    assert rec[0]["mask_params"]["kind"] == "file" and rec[0]["settings"]["mask_mode"] == "folder"
    m = np.asarray(Image.open(d / "mask" / "002.png")) > 127
    assert m.shape == (128, 128) and m.any()  # folder mask reused in turn, at the working size


def test_kv_cache_device_reaches_the_pipeline(tmp_path, capsys, monkeypatch):
    from o2mag.pipeline import O2MAGPipeline

    seen = {}
    real = O2MAGPipeline.generate_iter

    def spy(self, *a, **k):
        seen.update(k)
        return real(self, *a, **k)

    monkeypatch.setattr(O2MAGPipeline, "generate_iter", spy)
    args = ["generate", "--out", str(tmp_path), "--num", "3", "--batch-size", "2", *FAST]
    _error(args + ["--kv-cache-device", "cpu"], capsys, "--kv-cache-device only applies with --kv-cache")
    assert main(args + ["--kv-cache", "--kv-cache-device", "cpu"]) == 0
    assert seen["kv_cache"] is True and seen["kv_cache_device"] == "cpu"


def test_mvtec_inputs_and_several_normals(tmp_path, capsys):
    rng = np.random.RandomState(1)
    root = tmp_path / "mvtec"
    for sub in ("bottle/test/broken_large", "bottle/ground_truth/broken_large", "bottle/train/good"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray((rng.rand(80, 80, 3) * 255).astype(np.uint8)).save(root / f"bottle/test/broken_large/{i:03d}.png")
        Image.fromarray((rng.rand(80, 80, 3) * 255).astype(np.uint8)).save(root / f"bottle/train/good/{i:03d}.png")
        m = np.zeros((80, 80), np.uint8)
        m[20 + 10 * i:40 + 10 * i, 30:50] = 255
        Image.fromarray(m).save(root / f"bottle/ground_truth/broken_large/{i:03d}_mask.png")
    out = tmp_path / "out"
    assert main(["generate", "--mvtec-root", str(root), "--category", "bottle", "--defect", "broken_large",
                 "--ref-index", "1", "--num-normals", "2", "--num", "3", "--out", str(out),
                 "--foreground", "all", *FAST]) == 0
    rec = sorted(_lines(out / "bottle" / "broken_large" / "manifest.jsonl"), key=lambda r: r["index"])
    s = rec[0]["settings"]
    assert s["source"] == "mvtec" and s["reference"].endswith("001.png") and s["ref_mask"].endswith("001_mask.png")
    assert [r["normal"][-7:] for r in rec] == ["000.png", "001.png", "000.png"]  # sample i: normal i mod 2
    assert s["prompt"] == "a photo of a broken large on a bottle" and s["anomaly_word"] == "large"
    err = capsys.readouterr().err
    assert "inversions 3, AGO runs 1" in err  # the reference once, each normal image once
    assert "tiny randomly initialised model" in err and "brushed-metal" not in err
    _error(["generate", "--mvtec-root", str(root), "--category", "bottle", "--defect", "crack", "--out", str(out)],
           capsys, "defect 'crack' not found", "broken_large")


def _error(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_input_errors(files, capsys):
    f = files
    base = ["generate", "--out", str(f / "out"), *FAST]
    good = ["--ref", str(f / "ref.png"), "--ref-mask", str(f / "mask.png"), "--normal", str(f / "normal.png")]
    _error(base + ["--ref", str(f / "nope.png"), "--ref-mask", str(f / "mask.png"), "--normal", str(f / "normal.png")],
           capsys, "not found", "nope.png")
    _error(base + ["--ref", str(f / "broken.png"), "--ref-mask", str(f / "mask.png"),
                   "--normal", str(f / "normal.png")], capsys, "cannot read", "broken.png")
    _error(base + ["--ref", str(f / "ref.png"), "--ref-mask", str(f / "small_mask.png"),
                   "--normal", str(f / "normal.png")], capsys, "--ref-mask", "64x64")
    _error(base + ["--ref", str(f / "ref.png"), "--ref-mask", str(f / "empty.png"),
                   "--normal", str(f / "normal.png")], capsys, "empty")
    _error(base + ["--ref", str(f / "ref.png"), "--ref-mask", str(f / "mask.png"),
                   "--normal", str(f / "missing_dir")], capsys, "--normal not found")
    _error(base + ["--ref", str(f / "ref.png")], capsys, "go together", "--ref-mask", "--normal")
    _error(base + good + ["--model", str(f / "notamodel")], capsys, "not a diffusers pipeline")
    _error(base + good + ["--masks", str(f / "no_masks_here")], capsys, "--masks folder not found")
    _error(base + good + ["--masks", str(f / "masks"), "--mask-mode", "perlin"], capsys, "--masks")
    _error(base + good + ["--mask-mode", "folder"], capsys, "needs --masks")
    _error(base + good + ["--foreground", str(f / "nofg.png")], capsys, "--foreground")
    _error(base + good + ["--prompt", "a photo of a dent", "--anomaly-word", "crack"], capsys, "does not occur")
    _error(base + good + ["--device", "cpu", "--dtype", "fp16"], capsys, "fp16 needs CUDA")
    _error(base + good + ["--size", "8"], capsys, "--size", "at least 16")  # a 1-pixel latent
    _error(base + ["--mvtec-root", str(f / "no_mvtec"), "--category", "bottle", "--defect", "crack"], capsys,
           "not found")
    _error(base + ["--mvtec-root", str(f)], capsys, "--category and --defect")
    _error(base + good + ["--mvtec-root", str(f), "--category", "a", "--defect", "b"], capsys, "do not also give")
    if not torch.cuda.is_available():
        _error(base + good + ["--device", "cuda"], capsys, "CUDA is not available")
    else:
        _error(base + good + ["--device", f"cuda:{torch.cuda.device_count()}"], capsys, "CUDA device(s)")
    assert not (f / "out").exists() or not any((f / "out").rglob("*.png"))  # nothing was generated


@pytest.mark.parametrize("opt,value,needle", [
    ("--num", "0", "--num must be >= 1"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--steps", "1", "--steps must be >= 2"),
    ("--ago-steps", "-1", "--ago-steps must be >= 0"),
    ("--ago-lr", "0", "--ago-lr must be > 0"),
    ("--guidance", "nan", "--guidance must be a finite number >= 0"),
    ("--num", "many", "--num must be an integer"),
    ("--dtype", "fp64", "invalid choice"),
    ("--size", "16", "--size 16"),  # the embedded sample is drawn at 32..1024 px only
])
def test_impossible_options(opt, value, needle, tmp_path, capsys):
    _error(["generate", "--out", str(tmp_path), opt, value], capsys, needle)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


@pytest.mark.parametrize("exc, needle", [
    (FloatingPointError("AGO: every step overflowed ...; use --dtype fp32 or bf16"), "--dtype fp32"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "--batch-size"),
])
def test_run_failures_the_user_can_fix_end_in_one_line(tmp_path, capsys, monkeypatch, exc, needle):
    from o2mag.pipeline import O2MAGPipeline

    def fail(self, *a, **k):
        raise exc

    monkeypatch.setattr(O2MAGPipeline, "optimize_embedding", fail)
    assert main(["generate", "--out", str(tmp_path), *FAST]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.strip().splitlines()[-1].startswith("o2mag: error:")


def test_disk_cache_is_reused_by_a_later_process(tmp_path):
    """A rerun in a NEW process (other hash seed) must find AGO and the inversions on disk."""
    import os

    def run(num, seed):
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        proc = subprocess.run([sys.executable, "-m", "o2mag.cli", "generate", "--out", str(tmp_path),
                               "--num", str(num), *FAST], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "inversions 2, AGO runs 1" in run(1, 1)
    assert "inversions 0, AGO runs 0" in run(2, 2)


def test_no_anomaly_word_is_guessed_from_the_object(files, capsys):
    # "--prompt ... on a bottle" without --anomaly-word, defect name not in the prompt: the old rule
    # took the prompt's last word ("bottle") and amplified the object; now the user is asked
    args = ["generate", "--ref", str(files / "ref.png"), "--ref-mask", str(files / "mask.png"),
            "--normal", str(files / "normal.png"), "--out", str(files / "out"), "--defect", "crack",
            "--prompt", "a photo of a scratch on a bottle", *FAST]
    _error(args, capsys, "--anomaly-word is needed", "'crack'")
    assert not (files / "out").exists() or not any((files / "out").rglob("*.png"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from o2mag.pipeline import O2MAGPipeline

    d = tmp_path_factory.mktemp("model") / "tiny"
    O2MAGPipeline.tiny(0).save_pretrained(d)
    return d


@pytest.mark.parametrize("exc, code, needle", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), 1, "out of GPU memory"),
    (OSError("Error no file named diffusion_pytorch_model.safetensors"), 2, "could not load"),
])
def test_loading_errors_keep_their_kind(model_dir, tmp_path, capsys, monkeypatch, exc, code, needle):
    # a broken folder is the user's input (exit 2); running out of memory while loading is not, and
    # must reach the out-of-memory hint (exit 1)
    from diffusers import DiffusionPipeline

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)
    assert main(["generate", "--model", str(model_dir), "--out", str(tmp_path), *FAST]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_bug_while_loading_surfaces_as_itself(model_dir, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    def fail(*a, **k):
        raise RuntimeError("a bug, not a bad folder")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", str(model_dir), "--out", str(tmp_path), *FAST])


def test_quiet_loading_of_a_model_folder_prints_only_o2mag_lines(model_dir, tmp_path):
    # a new user's run: no torch_dtype deprecation, no accelerate advice, no loading bars
    proc = subprocess.run([sys.executable, "-m", "o2mag.cli", "generate", "--model", str(model_dir), "--out",
                           str(tmp_path), "--num", "1", *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("o2mag: ") for line in lines), proc.stderr
    assert proc.stdout == ""


def test_the_command_writes_exactly_what_the_pipeline_makes(tmp_path, monkeypatch):
    """`o2mag generate` on the embedded default equals, pixel for pixel, the library called by
    hand with the settings its --help documents (the embedded sample at the model's size, affine
    masks of seed (0, i) on the otsu foreground, batches of --batch-size): deterministic by
    construction on a CPU, so any change to how the command sets up generation shows here."""
    from o2mag.masks import resolve_foreground, target_masks
    from o2mag.pipeline import O2MAGPipeline
    from o2mag.sources.sample import embedded_sample

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # main() then runs the tiny model on 1 thread
    assert main(["generate", "--out", str(tmp_path), "--num", "3", "--batch-size", "2", *FAST]) == 0
    d = tmp_path / "synthetic_surface" / "scratch"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command did: another thread count may round differently
    try:
        pipe = O2MAGPipeline.tiny(0)
        pipe.set_progress_bar_config(disable=True)
        size = pipe.default_size
        s = embedded_sample(size)
        fg = resolve_foreground("otsu", np.asarray(s.normal), (size, size))
        masks = target_masks("affine", [0, 1, 2], ref_mask=s.ref_mask, shape=(size, size), foreground=fg, seed=0)
        made = list(pipe.generate_iter(s.reference, s.ref_mask, s.normal, [m.mask for m in masks], s.prompt,
                                       s.anomaly_word, num_inference_steps=2, guidance_scale=7.5, batch_size=2,
                                       seed=0, ago_steps=1, ago_lr=3e-3, blend_background=True))
    finally:
        torch.set_num_threads(threads)
    lines = {r["index"]: r for r in _lines(d / "manifest.jsonl")}
    for k, image, mask in made:
        assert np.array_equal(np.asarray(Image.open(d / "image" / f"{k:03d}.png")), np.asarray(image)), k
        assert np.array_equal(np.asarray(Image.open(d / "mask" / f"{k:03d}.png")), np.asarray(mask)), k
        assert lines[k]["mask_params"] == json.loads(json.dumps(masks[k].params))
