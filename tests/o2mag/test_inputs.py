"""Every input is checked before the first model call, in ``pipe(...)`` and in the ``o2mag`` command:
a bad mask, foreground, mask folder, image or option stops with an error naming it, and no UNet,
VAE or text-encoder forward has run (counted with forward pre-hooks), and no output folder is made."""
import numpy as np
import pytest
import torch
from PIL import Image

from o2mag.cli import main
from o2mag.errors import InputError
from o2mag.pipeline import O2MAGPipeline
from o2mag.pipeline.inputs import prepare_sources
from o2mag.sources.sample import embedded_sample

SIZE = 64
FAST = ["--steps", "2", "--ago-steps", "1", "--quiet", "--size", str(SIZE)]


def _count_model_calls(pipe, calls):
    """Record every forward of the models that do the work (the VAE's encoder and decoder are
    called through ``encode``/``decode``, not the VAE's own forward)."""
    for name, module in (("unet", pipe.unet), ("vae.encoder", pipe.vae.encoder),
                         ("vae.decoder", pipe.vae.decoder), ("text_encoder", pipe.text_encoder)):
        module.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
    return pipe


@pytest.fixture
def model_calls(monkeypatch):
    """The model calls of every tiny pipeline made during the test (the command's embedded model)."""
    calls = []
    tiny = O2MAGPipeline.tiny.__func__

    def counted(cls, seed=0, **kwargs):  # the command may name the family too
        return _count_model_calls(tiny(cls, seed, **kwargs), calls)

    monkeypatch.setattr(O2MAGPipeline, "tiny", classmethod(counted))
    return calls


@pytest.fixture(scope="module")
def sample():
    return embedded_sample(SIZE)


# --------------------------------------------------------------------------------- pipe(...)
@pytest.fixture
def counted_pipe():
    calls = []
    pipe = _count_model_calls(O2MAGPipeline.tiny(0), calls)
    pipe.set_progress_bar_config(disable=True)
    return pipe, calls


def _target(sample):
    m = np.zeros((SIZE, SIZE), bool)
    m[20:30, 24:36] = True
    return m


@pytest.mark.parametrize("change, error, needle", [
    (dict(target_masks="empty second"), InputError, r"target_masks\[1\] is empty"),
    (dict(ref_mask=np.ones((SIZE, SIZE), np.uint8)), InputError, "ref_mask covers the whole image"),
    (dict(ref_mask=np.zeros((SIZE, SIZE), np.float32)), InputError, "ref_mask is empty"),
    (dict(ref_mask=torch.zeros(1, SIZE, SIZE, dtype=torch.bool)), InputError, "ref_mask is empty"),
    (dict(num_inference_steps=1), ValueError, "num_inference_steps must be >= 2"),
])
def test_pipe_checks_every_input_before_any_model_call(counted_pipe, sample, change, error, needle):
    pipe, calls = counted_pipe
    args = dict(reference=sample.reference, ref_mask=sample.ref_mask, normal=sample.normal,
                target_masks=[_target(sample)], prompt=sample.prompt, anomaly_word=sample.anomaly_word,
                num_inference_steps=2, ago_steps=1, size=SIZE)
    if change.get("target_masks") == "empty second":
        change = dict(target_masks=[_target(sample), np.zeros((SIZE, SIZE), np.uint8)])
    args.update(change)
    with pytest.raises(error, match=needle):
        pipe(**args)
    with pytest.raises(error, match=needle):
        pipe.generate_iter(**{k: v for k, v in args.items()})  # checked at the call, not at next()
    assert calls == []


def test_the_hooks_count_a_good_call(counted_pipe, sample):
    pipe, calls = counted_pipe
    pipe(sample.reference, sample.ref_mask, sample.normal, [_target(sample)], sample.prompt, sample.anomaly_word,
         num_inference_steps=2, ago_steps=1, size=SIZE)
    assert {"unet", "text_encoder", "vae.encoder", "vae.decoder"} <= set(calls)


def test_a_uint8_01_reference_mask_means_what_a_float_01_one_does(sample):
    m = np.asarray(sample.ref_mask)
    ref = np.asarray(sample.reference)
    nor = np.asarray(sample.normal)
    want = prepare_sources(ref, m.astype(np.float32), nor, SIZE)[1]
    for encoded in (m.astype(np.uint8), m.astype(np.int64), m.astype(np.uint8) * 255, torch.from_numpy(m),
                    Image.fromarray(m.astype(np.uint8))):
        assert np.array_equal(prepare_sources(ref, encoded, nor, SIZE)[1], want)
    assert want.any()


# --------------------------------------------------------------------------------- the command
@pytest.fixture
def files(tmp_path):
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(tmp_path / "plain.png")  # all foreground
    obj = np.full((SIZE, SIZE, 3), 20, np.uint8)
    obj[24:40, 24:40] = 220  # a small object: otsu finds it (6% of the image)
    Image.fromarray(obj).save(tmp_path / "small_object.png")
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:44, 18:46] = 255  # 28 x 28: fits the plain image, never the 16 x 16 object
    Image.fromarray(m).save(tmp_path / "mask.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "black.png")
    return tmp_path


def _stops_before_the_model(argv, capsys, model_calls, out, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("o2mag: error:"), err
    for n in needles:
        assert n in err, err
    assert model_calls == [], err
    assert not (out / "custom").exists()  # no output folder was made
    return err


def _generate(f, out, *extra, ref_mask="mask.png", normal="plain.png"):
    return ["generate", "--out", str(out), "--ref", str(f / "ref.png"), "--ref-mask", str(f / ref_mask),
            "--normal", str(f / normal), "--prompt", "a photo of a crack", "--anomaly-word", "crack",
            "--num", "2", *FAST, *extra]


def test_an_all_white_reference_mask_says_what_is_wrong(files, tmp_path, capsys, model_calls):
    out = tmp_path / "out"
    err = _stops_before_the_model(_generate(files, out, ref_mask="white.png"), capsys, model_calls, out,
                                  "--ref-mask covers the whole image", "inverted")
    assert "no valid placement" not in err


@pytest.mark.parametrize("case, needles", [
    ("empty folder", ["--masks", "holds no mask images"]),
    ("corrupt file", ["--masks", "cannot read mask", "bad.png"]),
    ("empty mask", ["--masks", "000.png is empty"]),
])
def test_a_bad_masks_folder_stops_before_the_model(files, tmp_path, capsys, model_calls, case, needles):
    folder = tmp_path / "masks"
    folder.mkdir()
    good = np.zeros((SIZE, SIZE), np.uint8)
    good[10:20, 10:20] = 255
    if case == "corrupt file":
        Image.fromarray(good).save(folder / "000.png")
        (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    elif case == "empty mask":
        Image.fromarray(np.zeros_like(good)).save(folder / "000.png")
        Image.fromarray(good).save(folder / "001.png")
    out = tmp_path / "out"
    _stops_before_the_model(_generate(files, out, "--masks", str(folder)), capsys, model_calls, out, *needles)


def test_an_empty_foreground_mask_stops_before_the_model(files, tmp_path, capsys, model_calls):
    out = tmp_path / "out"
    _stops_before_the_model(_generate(files, out, "--foreground", str(files / "black.png")), capsys, model_calls,
                            out, "--foreground", "black.png is empty")


def test_masks_that_fit_no_normal_image_stop_before_the_model(files, tmp_path, capsys, model_calls):
    # two normal images: the reference mask fits the first, never the second's small object. The
    # first pair's masks draw fine, so a run that drew masks only when it reached a pair ran AGO
    # and both inversions of the first pair (and wrote its samples) before stopping.
    normals = tmp_path / "normals"
    normals.mkdir()
    (files / "plain.png").rename(normals / "a.png")
    (files / "small_object.png").rename(normals / "b.png")
    out = tmp_path / "out"
    argv = _generate(files, out, "--num-normals", "2", "--batch-size", "1")
    argv[argv.index("--normal") + 1] = str(normals)
    _stops_before_the_model(argv, capsys, model_calls, out, "no valid placement")


def test_dataset_reads_every_group_before_the_model(tmp_path, capsys, model_calls):
    # the second group's reference image is truncated after its header: a run that loaded a group
    # only when it got to it made the first group's samples (AGO, inversions) before stopping
    from tests.o2mag.test_dataset import _tree

    root = _tree(tmp_path / "mvtec", {"bottle": {"crack": 3}, "carpet": {"hole": 3}})
    bad = root / "carpet/test/hole/000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "synth"
    code = main(["dataset", "--mvtec-root", str(root), "--out", str(out), "--num", "2", "--steps", "2",
                 "--ago-steps", "1", "--quiet", "--size", "32", "--foreground", "all"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "carpet/hole" in err and "000.png" in err, err
    assert model_calls == [], err
    assert not (out / "bottle").exists()
