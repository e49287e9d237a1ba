"""``pipe(...)`` as a diffusers pipeline, on the tiny components: output types, return_dict, the
step-end callback, generators, save/load, ``to()`` and model offloading (GPU only)."""
import numpy as np
import pytest
import torch
from PIL import Image

from o2mag import O2MAGPipeline
from o2mag.pipeline import O2MAGPipelineOutput

from .calls import SIZE, STEPS, call
from .numerics import float_order_bound



def test_every_output_type(pipe, sample, masks):
    n = len(masks)
    outs = {t: call(pipe, sample, masks, output_type=t) for t in ("pil", "np", "pt", "latent")}
    for out in outs.values():
        assert isinstance(out, O2MAGPipelineOutput)
    pil = outs["pil"]
    assert len(pil.images) == n and all(isinstance(im, Image.Image) and im.mode == "RGB"
                                        and im.size == (SIZE, SIZE) for im in pil.images)
    assert [m.mode for m in pil.masks] == ["L"] * n
    for m, want in zip(pil.masks, masks):
        assert np.array_equal(np.asarray(m) > 127, want) and set(np.unique(np.asarray(m))) <= {0, 255}
    npo = outs["np"]
    assert npo.images.shape == (n, SIZE, SIZE, 3) and npo.images.dtype == np.float32
    assert 0 <= npo.images.min() and npo.images.max() <= 1
    assert npo.masks.shape == (n, SIZE, SIZE, 1) and np.array_equal(npo.masks[..., 0] > 0.5, np.stack(masks))
    # the same pictures in every format: PIL is the np array rounded to 8 bits
    assert np.abs(np.stack([np.asarray(im) for im in pil.images]).astype(int)
                  - np.round(npo.images * 255).astype(int)).max() <= 1
    pt = outs["pt"]
    assert pt.images.shape == (n, 3, SIZE, SIZE) and pt.images.dtype == torch.float32
    torch.testing.assert_close(pt.images.permute(0, 2, 3, 1).numpy(), npo.images, atol=1e-6, rtol=0)
    assert pt.masks.shape == (n, 1, SIZE, SIZE)
    lat = outs["latent"]
    assert lat.images.shape == (n, 4, SIZE // 8, SIZE // 8) and lat.masks.shape == (n, 1, SIZE, SIZE)
    # decoding the latents gives the images
    decoded = pipe.decode_latents(lat.images)
    assert all(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
               for a, b in zip(decoded, pil.images))


def test_return_dict_false_gives_the_tuple(pipe, sample, masks):
    out = call(pipe, sample, masks, output_type="np")
    images, ms = call(pipe, sample, masks, output_type="np", return_dict=False)
    assert np.array_equal(images, out.images) and np.array_equal(ms, out.masks)
    assert out.to_tuple()[0] is out.images  # a diffusers BaseOutput


def test_callback_once_per_step_with_the_named_tensors(pipe, sample, masks):
    calls = []
    empty = pipe.encode_prompt("")

    def callback(p, step, timestep, kwargs):
        calls.append((step, int(timestep), sorted(kwargs), kwargs["latents"].shape))
        assert p is pipe and kwargs["prompt_embeds"].shape == empty.shape
        if "negative_prompt_embeds" in kwargs:
            assert torch.equal(kwargs["negative_prompt_embeds"], empty)
        return {}

    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    call(pipe, sample, masks[:2], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)
    pipe.scheduler.set_timesteps(STEPS)
    assert [(c[0], c[1]) for c in calls] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    assert all(c[2] == sorted(names) and c[3] == (2, 4, SIZE // 8, SIZE // 8) for c in calls)
    # several batches: once per step of each batch, only the names asked for
    calls.clear()
    call(pipe, sample, masks, batch_size=2, callback_on_step_end=callback,
          callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [c[0] for c in calls] == list(range(STEPS)) * 2
    assert [c[3][0] for c in calls] == [2] * STEPS + [1] * STEPS


def test_callback_can_replace_the_latents(pipe, sample, masks):
    def zero_last(p, step, timestep, kwargs):
        if step == STEPS - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    plain = call(pipe, sample, masks[:1], output_type="latent").images
    out = call(pipe, sample, masks[:1], output_type="latent", callback_on_step_end=zero_last).images
    assert plain.abs().max() > 0 and torch.equal(out, torch.zeros_like(out))


def test_same_generator_same_images(pipe, sample, masks):
    def run(seed, **kw):
        return call(pipe, sample, masks, output_type="np", eta=1.0,
                     generator=torch.Generator().manual_seed(seed), **kw).images

    a, b, c = run(0), run(0), run(1)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # eta > 0: the generator's noise really is used

    # one generator per target: target k depends on its own generator only, whatever the batching
    def per_target(batch_size, base=100):
        gens = [torch.Generator().manual_seed(base + k) for k in range(len(masks))]
        return call(pipe, sample, masks, output_type="np", eta=1.0, generator=gens,
                     batch_size=batch_size).images

    together, alone = per_target(3), per_target(1)
    # equal up to float32 batching noise (another batch size takes other kernel paths: a bound
    # from this computation's own rounding error, tests/o2mag/numerics.py), far below what
    # another generator changes
    gens = [torch.Generator().manual_seed(100 + k) for k in range(len(masks))]
    exact = call(_float64(pipe), sample, masks, output_type="np", eta=1.0, generator=gens,
                  batch_size=3).images
    tol = float_order_bound(together, exact)
    assert np.abs(together - alone).max() <= tol, (np.abs(together - alone).max(), tol)
    assert tol < 4e-3
    assert np.abs(per_target(3, base=200) - together).max() > 1e-2
    # eta = 0 (the paper) is deterministic and ignores the generator
    d0 = call(pipe, sample, masks, output_type="np", generator=torch.Generator().manual_seed(0)).images
    d1 = call(pipe, sample, masks, output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert np.array_equal(d0, d1)


def _float64(pipe):
    """The same components in float64: the near-exact run that measures float32's rounding."""
    import copy

    p = copy.deepcopy(pipe).to(dtype=torch.float64)
    p.set_progress_bar_config(disable=True)
    return p


def _settings(config) -> dict:
    """A component's config as its JSON file holds it (tuples become lists), without the
    bookkeeping that names the folder and versions (``_name_or_path``, ``*_version``)."""
    import json

    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if not k.startswith("_") and not k.endswith("_version")}
    return json.loads(json.dumps(d, default=str))


def test_save_pretrained_from_pretrained_round_trip(tmp_path, pipe, sample, masks):
    before = call(pipe, sample, masks[:1], output_type="np").images
    pipe.save_pretrained(tmp_path / "saved")
    loaded = O2MAGPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is O2MAGPipeline and loaded.model_id == str(tmp_path / "saved")
    # what was saved comes back bit for bit (a byte copy: deterministic by construction)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name), getattr(loaded, name)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert _settings(a.config) == _settings(b.config), name
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert _settings(loaded.scheduler.config) == _settings(pipe.scheduler.config)
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    # the images: equal weights at other memory offsets may take another float order (seen on an
    # AMD EPYC: 1.25e-6 in a UNet output, 7.5e-5 in the images after inversion and AGO), so the
    # bound is this computation's own rounding error (tests/o2mag/numerics.py)
    after = call(loaded, sample, masks[:1], output_type="np").images
    exact = call(_float64(pipe), sample, masks[:1], output_type="np").images
    tol = float_order_bound(before, exact)
    assert np.abs(after - before).max() <= tol, (np.abs(after - before).max(), tol)
    assert tol < 4e-3  # below one 8-bit grey level: the bound itself is not vacuous


def test_to_moves_every_component(sample, masks):
    p = O2MAGPipeline.tiny(0)
    p.set_progress_bar_config(disable=True)
    assert p.to("cpu") is p and p._execution_device == torch.device("cpu")
    q = p.to(dtype=torch.bfloat16)
    assert q is p
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(p, name)
        assert module.dtype == torch.bfloat16 and module.device.type == "cpu", name
    out = call(p, sample, masks[:1], output_type="pt", num_inference_steps=2)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def _gpu_ready():
    from diffusers.utils import is_accelerate_available

    return torch.cuda.is_available() and is_accelerate_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_ready(), reason="model offloading needs a CUDA GPU and accelerate")
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offloading_gives_the_same_images(offload, sample, masks):
    # AGO is left out: its backward pass is not run-to-run deterministic on CUDA (cuDNN's
    # backward algorithms with TF32 convolutions): on an H200, two identical un-offloaded runs
    # with one AGO step differed by 2.9e-2, and by 0 without AGO -- as offloaded vs not did
    ref = O2MAGPipeline.tiny(0).to("cuda")
    ref.set_progress_bar_config(disable=True)
    want = call(ref, sample, masks[:2], output_type="np", ago_steps=0).images
    del ref
    p = O2MAGPipeline.tiny(0)
    p.set_progress_bar_config(disable=True)
    getattr(p, offload)()
    assert p._execution_device.type == "cuda"
    got = call(p, sample, masks[:2], output_type="np", ago_steps=0).images
    # offloading moves weights, not arithmetic: the same kernels on the same values, so without
    # AGO's backward the images are equal bit for bit (an H200 showed 0), not within a tolerance
    assert np.array_equal(got, want), float(np.abs(got - want).max())
    assert p.unet.device.type in ("cpu", "meta")  # handed back to the CPU after the call


def test_custom_processors_keep_running_during_generation(pipe, sample, masks):
    """A LoRA-style custom processor stays in charge of every layer the paper preset never grafts
    and of every grafted layer's idle calls, during ``pipe(...)``, and is in place afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from o2mag.graft import transformer_layers

    calls = {}

    class Recording(AttnProcessor2_0):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls[self.name] = calls.get(self.name, 0) + 1
            return super().__call__(attn, hidden_states, *args, **kwargs)

    unet = pipe.unet
    before = dict(unet.attn_processors)
    unet.set_attn_processor({name: Recording(name) for name in before})
    try:
        run = dict(num_inference_steps=10, ago_steps=0, batch_size=1)
        call(pipe, sample, masks[:1], **run)  # fills the inversion cache
        calls.clear()
        call(pipe, sample, masks[:1], **run)  # denoising only
        for info in transformer_layers(unet):
            # Q graft: every self-attention at step 0; TriAG: layers 9-15 at steps 1-9 -- so the
            # custom processor ran on layers 0-8 (steps 1-9) and never on 9-15; DAE (steps 4-7)
            # leaves every cross-attention to it on the other steps
            assert (calls.get(info.self_name, 0) > 0) == (info.index < 9), info
            assert calls.get(info.cross_name, 0) > 0, info
        assert all(isinstance(p, Recording) for p in unet.attn_processors.values())
    finally:
        unet.set_attn_processor(before)
