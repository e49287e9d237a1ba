"""The command line on SD 2.x and SDXL: ``o2mag generate --model`` on a saved tiny folder of each
family, killed with SIGKILL mid-way and rerun; ``o2mag dataset --model`` on a tiny MVTec-like tree;
``--family`` running each embedded tiny model without ``--model``, and refused with ``--model``.

Each case runs at 64 px with 2 steps and 1 AGO step (the SDXL-shaped UNet has 70 blocks)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from o2mag import O2MAGPipeline
from o2mag.cli import main
from o2mag.commands.curate import generate_argv
from o2mag.runs.store import complete_samples, read_manifest

from .test_dataset import _tree

FAMILIES = ("sd2", "sdxl")
SIDE = 64
FAST = ["--steps", "2", "--ago-steps", "1", "--size", str(SIDE), "--batch-size", "2", "--quiet"]
GROUP = Path("synthetic_surface") / "scratch"
ROOT = Path(__file__).resolve().parents[2]

# a run of the command that kills itself just before sample 2's image is put in place (samples 0
# and 1, the first batch, are complete by then)
_KILLER = textwrap.dedent("""
    import os, signal, sys
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith("002.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)

    os.replace = replace
    from o2mag.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    """(family, a saved diffusers folder of that family's tiny model)."""
    path = tmp_path_factory.mktemp(request.param) / "model"
    O2MAGPipeline.tiny(0, family=request.param).save_pretrained(path)
    return request.param, path


def _assert_complete(d, num):
    done = complete_samples(d)
    assert [i for i, *_ in done] == list(range(num))
    for _, img, mask, _ in done:
        assert Image.open(img).size == (SIDE, SIDE)
        Image.open(mask).load()
    assert (d / "contact_sheet.png").is_file()


def test_generate_from_a_saved_folder_resumes_after_sigkill(folder, tmp_path, capsys):
    family, model = folder
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model), "--out", str(out), "--num", "3", *FAST]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _KILLER, *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    d = out / GROUP
    before = {i: img.read_bytes() for i, img, *_ in complete_samples(d)}
    assert sorted(before) == [0, 1]  # killed mid-way: the first batch is there, sample 2 is not
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 of 3 samples present, generating 1" in err, err
    _assert_complete(d, 3)
    for i, data in before.items():
        assert (d / "image" / f"{i:03d}.png").read_bytes() == data  # what the killed run made is kept
    assert {r["settings"]["model"] for r in read_manifest(d / "manifest.jsonl")} == {str(model)}


def test_dataset_from_a_saved_folder(folder, tmp_path, capsys):
    family, model = folder
    root = _tree(tmp_path / "mvtec", {"bottle": {"crack": 3}})
    out = tmp_path / "synth"
    assert main(["dataset", "--model", str(model), "--mvtec-root", str(root), "--out", str(out), "--num", "2",
                 "--foreground", "all", *FAST]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "0 of 2 samples present, generating 2" in err, err
    d = out / "bottle" / "crack"
    assert [r["index"] for r in sorted(read_manifest(d / "manifest.jsonl"), key=lambda r: r["index"])] == [0, 1]
    for sub in ("image", "mask"):
        assert sorted(p.name for p in (d / sub).iterdir()) == ["000.png", "001.png"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_the_embedded_tiny_model_of_that_family(family, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--family", family, "--out", str(out), "--num", "2", *FAST]) == 0
    err = capsys.readouterr().err
    assert "EMBEDDED DEFAULT" in err and {"sd2": "SD 2.x-shaped", "sdxl": "SDXL-shaped"}[family] in err
    d = out / GROUP
    _assert_complete(d, 2)
    models = {r["settings"]["model"] for r in read_manifest(d / "manifest.jsonl")}
    assert models == {O2MAGPipeline.tiny(0, family=family).model_id} == {f"o2mag-tiny-seed0-{family}"}
    # the manifest's settings give back a command that reruns the same embedded model (as
    # o2mag curate --regenerate-rejected does): it resumes the folder and adds one sample
    settings = read_manifest(d / "manifest.jsonl")[0]["settings"]
    argv = generate_argv(settings, str(out), GROUP.parts[0], GROUP.parts[1], 3)
    assert "--model" not in argv and argv[argv.index("--family") + 1] == family
    assert main(argv) == 0
    _assert_complete(d, 3)


def test_the_tiny_families_are_their_families():
    assert not O2MAGPipeline.tiny(0, family="sd1").is_xl
    sd2 = O2MAGPipeline.tiny(0, family="sd2")
    assert sd2.scheduler.config.prediction_type == "v_prediction" and not sd2.is_xl
    assert sd2.unet.config.use_linear_projection
    assert O2MAGPipeline.tiny(0, family="sdxl").is_xl
    with pytest.raises(ValueError, match="family"):
        O2MAGPipeline.tiny(0, family="sd3")


@pytest.mark.parametrize("command", ["generate", "dataset"])
def test_family_with_model_is_refused_before_loading(command, tmp_path, capsys):
    extra = ["--mvtec-root", str(_tree(tmp_path / "mvtec", {"bottle": {"crack": 3}}))] if command == "dataset" else []
    code = main([command, "--family", "sdxl", "--model", str(tmp_path / "no-such-model"), "--out",
                 str(tmp_path / "out"), *extra, *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "--family" in err and "--model" in err
    assert "no-such-model" not in err  # refused before the folder is even looked at
