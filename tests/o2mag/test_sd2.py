"""SD 2.x as a family: the tiny SD 2.x-shaped model (head dim 64, linear projections) with
v-prediction and epsilon schedulers, the inversion mirrored by the denoising step, ``pipe(...)``
for every output type, the background blend, grafting, and ``o2mag generate --model``."""
import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

from o2mag import GraftConfig, O2MAGPipeline
from o2mag.cli import main
from o2mag.masks.targets import affine_masks
from o2mag.method.inversion import ddim_invert, ddim_step, to_epsilon
from o2mag.pipeline.loading import detect_family
from o2mag.sources import tiny

from .calls import SIZE, call, check_every_output_type  # SIZE: the shared sample fixture's
from .numerics import float_order_bound

PREDICTIONS = ("epsilon", "v_prediction")
STEPS = 2


@pytest.fixture(scope="module")
def masks(sample):
    return [t.mask for t in affine_masks(sample.ref_mask, 2, seed=1)]


@pytest.fixture(scope="module", params=PREDICTIONS)
def sd2(request):
    p = O2MAGPipeline(**tiny.tiny_sd2_components(0, prediction_type=request.param))
    p.progress = False
    return p


def _call(pipe, sample, masks, **kw):
    """:func:`.calls.call` with this file's steps, no AGO."""
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("ago_steps", 0)
    return call(pipe, sample, masks, **kw)


def test_the_tiny_sd2_model_has_sd2s_attention():
    c = tiny.tiny_sd2_components(0)
    unet = c["unet"]
    heads = [m.heads for n, m in unet.named_modules() if n.endswith("attn1")]
    dims = [m.inner_dim // m.heads for n, m in unet.named_modules() if n.endswith("attn1")]
    assert len(heads) == 16 and set(dims) == {64} and unet.config.use_linear_projection
    assert c["scheduler"].config.prediction_type == "v_prediction"
    assert tiny.tiny_sd2_components(0, "epsilon")["scheduler"].config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        tiny.tiny_sd2_components(0, "sample")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_pipeline_keeps_the_models_scheduler_settings(prediction):
    # any scheduler class becomes DDIM with the model's prediction type, spacing and final alpha
    c = tiny.tiny_sd2_components(0, prediction)
    # as a saved scheduler_config.json holds it (no record of which values were defaults)
    cfg = {k: v for k, v in c["scheduler"].config.items() if not k.startswith("_")}
    cfg.update(timestep_spacing="trailing", steps_offset=0)
    c["scheduler"] = EulerDiscreteScheduler.from_config(cfg)
    s = O2MAGPipeline(**c).scheduler
    assert isinstance(s, DDIMScheduler) and not s.config.clip_sample
    assert (s.config.prediction_type, s.config.timestep_spacing, s.config.steps_offset) == (prediction, "trailing", 0)


def _invert_and_replay(unet, scheduler, z0, emb, steps, dtype):
    """Invert ``z0`` recording each step's model output, then run every denoising step of
    ``scheduler`` on the recorded latent with that output (re-expressed at the step's input
    sample): returns (recorded latents, replayed latents), both in inversion order."""
    unet = copy.deepcopy(unet).to(dtype)
    if dtype == torch.float64:  # the step's own coefficients in float64 too (diffusers keeps float32 alphas)
        scheduler = copy.deepcopy(scheduler)
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    outs = []

    def predict(z, t):
        out = unet(z.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample
        outs.append(out)
        return out

    inv = ddim_invert(predict, scheduler, z0.to(dtype), steps, progress=False)
    n = inv.num_steps
    recorded = torch.stack([z.to(dtype) for z in inv.latents])
    replayed = [recorded[0]]
    for k in range(n):  # inversion step k ran at timestep timesteps[n-1-k]: latents[k] -> latents[k+1]
        t = inv.timesteps[n - 1 - k]
        a = scheduler.alphas_cumprod[int(t)].to(dtype)
        eps = to_epsilon(scheduler, outs[k].to(dtype), recorded[k], float(a))
        x = recorded[k + 1]
        if scheduler.config.prediction_type == "epsilon":
            out = eps
        else:  # the v that gives this eps at sample x: eps = sqrt(a) v + sqrt(1 - a) x
            out = (eps - (1 - a).sqrt() * x) / a.sqrt()
        replayed.append(ddim_step(scheduler, out, t, x))
    return recorded[:n], torch.stack(replayed[1:])


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing, final_alpha_one", [("leading", False), ("trailing", True), ("linspace", False)])
def test_the_inversion_replays_through_the_denoising_step(prediction, spacing, final_alpha_one):
    c = tiny.tiny_sd2_components(0, prediction)
    c["scheduler"] = DDIMScheduler.from_config(c["scheduler"].config, timestep_spacing=spacing,
                                               set_alpha_to_one=final_alpha_one)
    pipe = O2MAGPipeline(**c)
    s = pipe.scheduler
    assert (s.config.prediction_type, s.config.timestep_spacing, s.config.set_alpha_to_one) == (
        prediction, spacing, final_alpha_one)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 16, 16, generator=g)
    emb = torch.randn(1, 77, tiny.TINY_TEXT_HIDDEN, generator=g)
    with torch.no_grad():
        rec32, rep32 = _invert_and_replay(pipe.unet, s, z0, emb, 4, torch.float32)
        rec64, rep64 = _invert_and_replay(pipe.unet, s, z0, emb, 4, torch.float64)
    # float32: within twice the float32 replay's own rounding (its distance from the float64 replay)
    assert (rep32.double() - rec32.double()).abs().max() <= float_order_bound(rep32.numpy(), rep64.numpy())
    # float64 (model and step): the mirror is exact up to float64 rounding, the float32 rounding
    # scaled by eps64/eps32; a wrong alpha, spacing, final alpha or prediction type is far above it
    scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    bound64 = scale * float_order_bound(rep32.numpy(), rep64.numpy())
    assert (rep64 - rec64).abs().max() <= bound64


def test_v_prediction_is_converted_as_diffusers_defines_it():
    s = DDIMScheduler(**tiny.SD2_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 4, 4, 4, generator=g).unbind(0)
    for t in (1, 400, 999):
        tt = torch.tensor([t])
        xt = s.add_noise(x0, noise, tt)
        v = s.get_velocity(x0, noise, tt)
        eps = to_epsilon(s, v, xt, float(s.alphas_cumprod[t]))
        assert (eps - noise).abs().max() <= 64 * torch.finfo(torch.float32).eps * noise.abs().max()


def test_every_output_type(sd2, sample, masks):
    outs = check_every_output_type(lambda **kw: _call(sd2, sample, masks, **kw), masks, SIZE)
    assert np.abs(np.stack([np.asarray(im) for im in outs["pil"].images]).astype(int)
                  - np.round(outs["np"].images * 255).astype(int)).max() <= 1


def test_blend_keeps_the_normal_outside_and_grafting_changes_the_inside(sd2, sample):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[48:72, 40:80] = True
    grafted = _call(sd2, sample, [m], output_type="latent").images
    x, normal = sd2.last_run["target_latents"], sd2.last_run["normal_latent"]
    inside = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(m).float()[None, None], x.shape[-2:])[0, 0] > 0
    assert torch.equal(x[0][:, ~inside], normal[0][:, ~inside])  # outside M_T: the normal branch, exactly
    plain = _call(sd2, sample, [m], output_type="latent", graft_config=GraftConfig.disabled()).images
    assert torch.equal(plain[0][:, ~inside], grafted[0][:, ~inside])
    assert (plain[0][:, inside] - grafted[0][:, inside]).abs().max() > 1e-3  # grafting acts inside


def test_generate_from_a_saved_sd2_folder(tmp_path):
    model = tmp_path / "tiny-sd2"
    O2MAGPipeline(**tiny.tiny_sd2_components(0)).save_pretrained(model)
    fam = detect_family(str(model))
    assert (fam.name, fam.prediction_type, fam.default_size) == ("sd2", "v_prediction", SIZE)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--out", str(out), "--num", "2", "--batch-size", "2",
                 "--steps", "2", "--ago-steps", "1", "--quiet"]) == 0
    d = out / "synthetic_surface" / "scratch"
    assert sorted(p.name for p in (d / "image").glob("*.png")) == ["000.png", "001.png"]
    assert sorted(p.name for p in (d / "mask").glob("*.png")) == ["000.png", "001.png"]
    lines = [json.loads(s) for s in (d / "manifest.jsonl").read_text().splitlines() if s.strip()]
    assert [r["index"] for r in lines] == [0, 1] and lines[0]["settings"]["size"] == SIZE
    assert (d / "contact_sheet.png").exists()
    assert Image.open(d / "image" / "000.png").size == (SIZE, SIZE)
