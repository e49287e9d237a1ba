"""Model loading: the dtype argument's name, accelerate's absence, quiet libraries, path errors."""
import re
import warnings

import pytest
import torch

from o2mag.errors import InputError, MissingInputError
from o2mag.pipeline.loading import check_model_path, dtype_keyword, loading_kwargs, quiet_loading
from o2mag.pipeline import O2MAGPipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    O2MAGPipeline.tiny(0).save_pretrained(d)
    return d


def test_dtype_reaches_the_components_without_a_deprecation_warning(model_dir):
    for name in ("dtype", "torch_dtype"):  # the older name is translated too
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            pipe = O2MAGPipeline.from_pretrained(model_dir, **{name: torch.bfloat16})
        assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
        assert pipe.text_encoder.dtype == torch.bfloat16
        assert not [w for w in seen if "torch_dtype" in str(w.message)], [str(w.message) for w in seen]


def test_loading_kwargs():
    from diffusers.utils import is_accelerate_available

    key = dtype_keyword()
    assert key in ("dtype", "torch_dtype")
    assert loading_kwargs({"torch_dtype": torch.float16})[key] == torch.float16
    assert loading_kwargs({"dtype": torch.float16})[key] == torch.float16
    with pytest.raises(ValueError, match="not both"):
        loading_kwargs({"dtype": torch.float16, "torch_dtype": torch.float16})
    if not is_accelerate_available():  # diffusers would turn it off anyway, after a warning
        assert loading_kwargs({})["low_cpu_mem_usage"] is False
        assert loading_kwargs({"low_cpu_mem_usage": True})["low_cpu_mem_usage"] is True  # the user's choice
    else:
        assert "low_cpu_mem_usage" not in loading_kwargs({})


def test_quiet_loading_restores_the_libraries_settings():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    with quiet_loading():
        assert all(lib.get_verbosity() == lib.CRITICAL and not lib.is_progress_bar_enabled() for lib in (dlog, tlog))
    assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)] == before
    with quiet_loading(False):
        assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)] == before


def test_model_path_errors(tmp_path, model_dir):
    assert check_model_path(model_dir) == str(model_dir)
    assert check_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        check_model_path(tmp_path / "empty")
    with pytest.raises(MissingInputError, match="not found"):
        check_model_path(str(tmp_path / "missing" / "model"))
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        check_model_path(3)


@pytest.mark.parametrize("damage", ["model_index.json", "unet/config.json", "unet/weights", "no unet"])
def test_a_damaged_folder_is_an_input_error(tmp_path, model_dir, damage):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    if damage == "no unet":
        shutil.rmtree(d / "unet")
    elif damage == "unet/weights":
        next((d / "unet").glob("*.safetensors")).write_bytes(b"not weights")
    else:
        (d / damage).write_text("{not json")
    with pytest.raises(InputError, match="could not load"):
        O2MAGPipeline.from_pretrained(d)


def _quiet_command(env_extra, *args, tmp_path):
    """``o2mag generate --quiet`` in a fresh process (diffusers' log handlers and the hub's
    offline switch are set when they are imported), with an empty Hugging Face cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(root), **env_extra}
    return subprocess.run([sys.executable, "-m", "o2mag", "generate", "--out", str(tmp_path / "out"), "--quiet",
                           *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_quiet_offline_hub_id_is_one_self_contained_line(tmp_path):
    # diffusers' own message ends "Please check out the root cause in the stacktrace above.", which
    # the command does not print: the line must name the cause itself (no network is used)
    r = _quiet_command({"HF_HUB_OFFLINE": "1"}, "--model", "some-org/some-model", tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("o2mag: error: could not load"), r.stderr
    assert "stacktrace above" not in r.stderr and "HF_HUB_OFFLINE" in lines[0], r.stderr


def test_quiet_hides_diffusers_error_lines(tmp_path, model_dir):
    # a folder whose UNet weights are missing: diffusers logs "An error occurred while trying to
    # fetch ..." with logger.error before it raises; under --quiet only o2mag's line remains
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    r = _quiet_command({}, "--model", str(d), tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("o2mag: error: could not load"), r.stderr
    assert "An error occurred" not in r.stderr


def _edited_copy(model_dir, dest, index=None, unet=None, scheduler=None, drop=()):
    """A copy of the saved tiny folder with model_index.json / unet / scheduler configs edited
    (``None`` values delete a key) and component folders dropped."""
    import json
    import shutil

    shutil.copytree(model_dir, dest)
    for rel, changes in (("model_index.json", index), ("unet/config.json", unet),
                         ("scheduler/scheduler_config.json", scheduler)):
        if changes:
            path = dest / rel
            cfg = json.loads(path.read_text())
            for k, v in changes.items():
                if v is None:
                    cfg.pop(k, None)
                else:
                    cfg[k] = v
            path.write_text(json.dumps(cfg))
    for sub in drop:
        shutil.rmtree(dest / sub)
    return dest


_XL = dict(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
           tokenizer_2=["transformers", "CLIPTokenizer"])
UNSUPPORTED = {
    "inpainting": (dict(unet=dict(in_channels=9)), "9 input channels (an inpainting UNet)"),
    "sd3": (dict(index=dict(_class_name="StableDiffusion3Pipeline", unet=None,
                            transformer=["diffusers", "SD3Transformer2DModel"])), "transformer-based"),
    "flux": (dict(index=dict(_class_name="FluxPipeline", unet=None, text_encoder=None,
                             transformer=["diffusers", "FluxTransformer2DModel"])), "transformer-based"),
    "refiner": (dict(index=dict(_XL, _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                                tokenizer=[None, None]), unet=dict(addition_embed_type="text_time")),
                "SDXL refiner alone"),
    "unconditional": (dict(index=dict(_class_name="DDPMPipeline", text_encoder=None, tokenizer=None, vae=None),
                           unet=dict(_class_name="UNet2DModel")), "not a text-conditioned"),
    "no text encoder": (dict(index=dict(text_encoder=None)), "no text_encoder/tokenizer"),
    # an SDXL folder that lacks part of SDXL's base layout: a "text_time" UNet without a second
    # encoder, or a second encoder beside a UNet without SDXL's added conditioning
    "sdxl without text_encoder_2": (dict(unet=dict(addition_embed_type="text_time")), "not SDXL's base layout"),
    "sdxl with an sd unet": (dict(index=_XL), "not SDXL's base layout"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_an_unsupported_family_is_one_line_and_exit_2(tmp_path, model_dir, capsys, kind):
    from o2mag.cli import main

    edits, needle = UNSUPPORTED[kind]
    d = _edited_copy(model_dir, tmp_path / kind, **edits)
    with pytest.raises(InputError, match=re.escape(needle)):
        O2MAGPipeline.from_pretrained(d)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(d), "--out", str(out), "--num", "1", "--steps", "2",
                 "--ago-steps", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*.png"))


def test_families_and_their_default_sizes(tmp_path, model_dir):
    from o2mag.pipeline.loading import FAMILY_SIZES, detect_family

    sd1 = detect_family(str(model_dir))
    assert (sd1.name, sd1.label, sd1.prediction_type, sd1.default_size) == ("sd1", "SD 1.x", "epsilon", 128)
    pipe = O2MAGPipeline.from_pretrained(model_dir)
    assert pipe.family == sd1 and pipe.default_size == sd1.default_size
    # SD 2.x: linear projections; its size follows the UNet config like diffusers' pipelines
    v = _edited_copy(model_dir, tmp_path / "v", unet=dict(use_linear_projection=True, sample_size=96),
                     scheduler=dict(prediction_type="v_prediction"))
    assert detect_family(str(v)) == type(sd1)("sd2", "v_prediction", 768)
    base = _edited_copy(model_dir, tmp_path / "base", unet=dict(cross_attention_dim=1024, sample_size=64))
    assert detect_family(str(base)) == type(sd1)("sd2", "epsilon", 512)
    # without sample_size the family's published size: 768 for v-prediction 2.x, 512 otherwise
    nosize = _edited_copy(model_dir, tmp_path / "nosize", unet=dict(use_linear_projection=True, sample_size=None),
                          scheduler=dict(prediction_type="v_prediction"))
    assert detect_family(str(nosize)).default_size == FAMILY_SIZES["sd2-v"] == 768
    nosize1 = _edited_copy(model_dir, tmp_path / "nosize1", unet=dict(sample_size=None))
    assert detect_family(str(nosize1)).default_size == FAMILY_SIZES["sd1"] == 512
    # SDXL base: two text encoders and a "text_time" UNet; 128 latents x the VAE's 8 = 1024 px
    xl = _edited_copy(model_dir, tmp_path / "xl", index=_XL, unet=dict(addition_embed_type="text_time", sample_size=128))
    assert detect_family(str(xl)) == type(sd1)("sdxl", "epsilon", 1024)
    xl_nosize = _edited_copy(model_dir, tmp_path / "xl0", index=_XL, unet=dict(addition_embed_type="text_time",
                                                                                  sample_size=None))
    assert detect_family(str(xl_nosize)).default_size == FAMILY_SIZES["sdxl"] == 1024
