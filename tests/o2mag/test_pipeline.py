"""O2MAGPipeline on the tiny model: replay, shared source branches, background blending, one-to-more
cost, K/V cache, the per-sample baseline, loading and argument errors."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from o2mag.method.config import GraftConfig
from o2mag.errors import InputError, MissingInputError
from o2mag.method.inversion import ddim_step
from o2mag.method.layout import BranchLayout
from o2mag.masks.targets import affine_masks
from o2mag.pipeline import O2MAGPipeline, token_indices
from o2mag.sources.sample import embedded_sample

from .calls import SIZE  # the size of the shared sample fixture
from .numerics import float_order_bound

STEPS = 5


@pytest.fixture(scope="module")
def targets(sample):
    return [t.mask for t in affine_masks(sample.ref_mask, 6, seed=0)]


def _run(pipe, sample, masks, **kw):
    kw.setdefault("num_steps", STEPS)
    kw.setdefault("ago_steps", 2)
    return pipe.generate(sample.reference, sample.ref_mask, sample.normal, masks, sample.prompt,
                         sample.anomaly_word, **kw)


class Recorder:
    """Forward hook on the UNet: every call's input rows and output."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.calls.append((args[0].detach().clone(), output.sample.detach().clone()))

    def close(self):
        self.handle.remove()


def _arr(img):
    return np.asarray(img).astype(np.int16)


def test_one_to_more_cost_and_shared_sources(pipe, sample, targets):
    pipe.clear_caches()
    pipe.stats.reset()
    rec = Recorder(pipe.unet)
    try:
        out = _run(pipe, sample, targets, batch_size=3)
    finally:
        rec.close()
    assert len(out) == 6 and all(im.size == (SIZE, SIZE) for im, _ in out)
    s = pipe.stats
    assert s.inversion_runs == 2 and s.ago_runs == 1  # once per reference/normal pair, not per sample
    gen = rec.calls[-2 * STEPS:]  # the denoising calls (after AGO and the two inversions)
    layout = BranchLayout(3)
    assert all(x.shape[0] == 2 * (2 + 3) == layout.batch_size for x, _ in gen)
    assert s.generation_unet_calls == 2 * STEPS and s.generation_unet_rows == 2 * STEPS * 10
    assert s.unet_rows == sum(x.shape[0] for x, _ in rec.calls) and s.unet_calls == len(rec.calls)
    # reference and normal branches: identical inputs and outputs in both batches, at every step
    for i in range(STEPS):
        (x1, o1), (x2, o2) = gen[i], gen[STEPS + i]
        for branch in ("reference", "normal"):
            rows = layout.rows(branch)
            assert torch.equal(x1[rows], x2[rows])
            assert torch.equal(o1[rows], o2[rows])  # same shapes, row-wise ops: bit for bit
    # the normal rows replay the normal image's inversion
    inv_n = pipe.invert(np.asarray(sample.normal.convert("RGB")), STEPS)
    for i in range(STEPS):
        x = gen[i][0]
        for r in layout.rows("normal"):
            assert torch.equal(x[r], inv_n.before_step(i)[0])
        for r in layout.rows("target"):  # targets start from the normal image's z_T
            if i == 0:
                assert torch.equal(x[r], inv_n.noise[0])
    assert torch.equal(inv_n.latents[0], pipe.encode_image(np.asarray(sample.normal.convert("RGB"))))


def test_background_blend_keeps_the_normal_latent_outside_the_mask(pipe, sample):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[48:72, 40:80] = True
    _run(pipe, sample, [m])
    x, normal = pipe.last_run["target_latents"], pipe.last_run["normal_latent"]
    inside = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(m).float()[None, None], x.shape[-2:])[0, 0] > 0
    assert torch.equal(x[0][:, ~inside], normal[0][:, ~inside])  # latents outside M_T: exact
    assert (x[0][:, inside] - normal[0][:, inside]).abs().max() > 1e-3  # inside: a new defect
    # without blending the background drifts away from the normal image
    _run(pipe, sample, [m], blend_background=False)
    assert not torch.allclose(pipe.last_run["target_latents"][0][:, ~inside], normal[0][:, ~inside], atol=1e-3)


def test_background_blend_keeps_far_pixels(pipe):
    # Decoded pixels far from M_T equal the normal reconstruction when the VAE decoder is local.
    # AutoencoderKL's decoder is not (GroupNorm statistics and mid-block attention span the whole
    # image; the tiny random one amplifies that hugely), so this uses a small AutoencoderTiny
    # (TAESD-style, convolutions only) at 256 px.
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                          num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).eval()
    local = O2MAGPipeline(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    local.progress = False
    big = embedded_sample(256)
    m = np.zeros((256, 256), dtype=bool)
    m[160:200, 150:210] = True
    (image, _), = local.generate(big.reference, big.ref_mask, big.normal, [m], big.prompt, big.anomaly_word,
                                 num_steps=3, ago_steps=0, size=256)
    recon = _arr(local.decode_latents(local.last_run["normal_latent"])[0])
    diff = np.abs(_arr(image) - recon).max(axis=-1)
    far = np.ones((256, 256), dtype=bool)
    far[160 - 80:, 150 - 80:] = False  # everything within 80 px (10 latent px) of M_T
    assert diff[far].max() <= 1, diff[far].max()
    assert diff[160:200, 150:210].mean() > 1 and diff[160:200, 150:210].max() > 5  # a new defect inside


def _images(p, sample, masks, **kw):
    """Float images in [0, 1] (``output_type="np"``) and masks of one call."""
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("ago_steps", 2)
    out = p(sample.reference, sample.ref_mask, sample.normal, masks, prompt=sample.prompt,
            anomaly_word=sample.anomaly_word, output_type="np", **kw)
    return out.images, out.masks


@pytest.fixture(scope="module")
def float64_pipe(pipe):
    """The same components in float64: the near-exact run that measures float32's rounding."""
    import copy

    p = copy.deepcopy(pipe).to(dtype=torch.float64)
    p.progress = False
    return p


def test_kv_cache_gives_the_same_images_with_fewer_rows(pipe, float64_pipe, sample, targets):
    pipe.stats.reset()
    plain, plain_masks = _images(pipe, sample, targets[:4], batch_size=2)
    rows_plain = pipe.stats.generation_unet_rows
    pipe.stats.reset()
    cached, cached_masks = _images(pipe, sample, targets[:4], batch_size=2, kv_cache=True,
                                   kv_cache_device="cpu")
    rows_cached = pipe.stats.generation_unet_rows
    assert rows_plain == STEPS * 2 * (2 * (2 + 2))
    assert rows_cached == STEPS * (2 * (2 + 2) + 2 * 2)
    # the replayed sources are the recorded ones, but later batches run fewer rows: other GEMM
    # blockings, so equal up to this computation's own float32 rounding (tests/o2mag/numerics.py)
    exact, _ = _images(float64_pipe, sample, targets[:4], batch_size=2)
    tol = float_order_bound(plain, exact)
    assert np.abs(plain - cached).max() <= tol, (np.abs(plain - cached).max(), tol)
    assert np.array_equal(plain_masks, cached_masks)


def test_per_sample_baseline_costs_more_and_gives_the_same_images(pipe, float64_pipe, sample, targets):
    pipe.stats.reset()
    shared, _ = _images(pipe, sample, targets[:2], batch_size=2)
    pipe.stats.reset()
    baseline, _ = _images(pipe, sample, targets[:2], scheme="per_sample")
    s = pipe.stats
    assert s.inversion_runs == 4  # both inversions again for every sample
    assert s.generation_unet_rows == 2 * STEPS * 2 * 3  # three branches per sample
    exact, _ = _images(float64_pipe, sample, targets[:2], batch_size=2)
    tol = float_order_bound(shared, exact)  # other batch sizes: other float orders, as above
    assert np.abs(shared - baseline).max() <= tol, (np.abs(shared - baseline).max(), tol)


def test_loop_without_grafting_is_plain_ddim_sampling(pipe, float64_pipe, sample):
    # grafting off, guidance 1, no blending: the target is DDIM sampling from the normal's z_T
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[10:20, 10:20] = True
    off = dict(num_steps=STEPS, graft_config=GraftConfig.disabled(), guidance_scale=1.0, blend_background=False,
               ago_steps=0)
    pipe.generate(sample.reference, sample.ref_mask, sample.normal, [m], "", "", **off)
    got = pipe.last_run["target_latents"]
    inv = pipe.invert(np.asarray(sample.normal.convert("RGB")), STEPS)
    emb = pipe.encode_prompt("")

    def sample_from(unet, z, emb):
        with torch.no_grad():
            for t in inv.timesteps:
                z = ddim_step(pipe.scheduler, unet(z, t, encoder_hidden_states=emb).sample, t, z)
        return z

    z = sample_from(pipe.unet, inv.noise, emb)
    exact = sample_from(float64_pipe.unet, inv.noise.double(), emb.double())
    # the pipeline's batch holds other rows (another GEMM blocking than this one-row loop): equal
    # up to float32's own rounding of this computation (tests/o2mag/numerics.py)
    tol = float_order_bound(z.numpy(), exact.numpy())
    assert float((got - z).abs().max()) <= tol
    # with grafting off the reference rows share the UNet batch but must not reach the target:
    # another reference image leaves the target's latents as they were (the same batch shapes and
    # the same rows for the target: bit for bit)
    other = np.ascontiguousarray(np.asarray(sample.reference)[::-1, ::-1])
    pipe.generate(other, sample.ref_mask[::-1, ::-1].copy(), sample.normal, [m], "", "", **off)
    assert torch.equal(pipe.last_run["target_latents"], got)


def test_bf16_on_cpu(sample):
    p = O2MAGPipeline.tiny(0).to(dtype=torch.bfloat16)
    p.progress = False
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[50:70, 50:70] = True
    (image, _), = _run(p, sample, [m], num_steps=2, ago_steps=1)
    assert image.size == (SIZE, SIZE)
    assert torch.isfinite(p.last_run["target_latents"]).all()


def test_token_indices(pipe):
    tok = pipe.tokenizer
    idx = token_indices(tok, "a photo of a scratch on metal", "scratch")
    ids = tok("a photo of a scratch on metal").input_ids
    word = tok("scratch", add_special_tokens=False).input_ids
    assert [ids[i] for i in idx] == word and idx[0] >= 1
    assert token_indices(tok, "anything", None) == []
    with pytest.raises(InputError, match="does not occur"):
        token_indices(tok, "a photo of a dent", "scratch")


def test_argument_errors(pipe, sample, targets):
    ok = dict(reference=sample.reference, ref_mask=sample.ref_mask, normal=sample.normal, target_masks=targets[:1])
    for bad, kind, match in [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(scheme="nope"), ValueError, "scheme"),
        (dict(scheme="per_sample", kv_cache=True), ValueError, "kv_cache"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(ref_mask=np.zeros((SIZE, SIZE), bool)), InputError, "empty"),
        (dict(ref_mask=np.eye(64, dtype=bool)), InputError, "ref_mask is 64x64"),
        (dict(ref_mask=np.ones((SIZE, SIZE), np.uint8)), InputError, "ref_mask covers the whole image"),
        (dict(num_steps=1), ValueError, "num_steps must be >= 2"),
        (dict(target_masks=[]), ValueError, "target_masks"),
        (dict(reference="/no/such/file.png"), MissingInputError, "reference: image not found"),
        (dict(ref_mask="/no/such/mask.png"), MissingInputError, "ref_mask: mask not found"),
        (dict(size=100), ValueError, "multiple of 8"),
        (dict(size=8), ValueError, "at least 16"),
        (dict(graft_config={"fg_gain": 2.0}), TypeError, "graft_config"),
        (dict(kv_cache=True, kv_cache_device="nowhere"), ValueError, "kv_cache_device"),
        (dict(anomaly_word=None), ValueError, "anomaly_word is required"),
        (dict(anomaly_word=3), TypeError, "anomaly_word must be a str"),
        (dict(anomaly_word="bottle"), InputError, "does not occur"),
        (dict(prompt=None), ValueError, "prompt is required"),
        (dict(eta=2.0), ValueError, "eta"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(generator=0), TypeError, "generator"),
        (dict(generator=[torch.Generator()] * 2), ValueError, "one per target mask"),
        (dict(callback_on_step_end=1), TypeError, "callback_on_step_end"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
        (dict(target_masks="masks.png"), TypeError, "target_masks"),
        (dict(num_steps=2, num_inference_steps=2), ValueError, "not both"),
    ]:
        kw = {**ok, **bad}
        pipe.stats.reset()
        with pytest.raises(kind, match=match):
            # generate_iter checks when called (a generator function would wait for next())
            pipe.generate_iter(kw.pop("reference"), kw.pop("ref_mask"), kw.pop("normal"), kw.pop("target_masks"),
                               kw.pop("prompt", "a photo of a scratch"), kw.pop("anomaly_word", "scratch"), **kw)
        assert pipe.stats.unet_calls == 0  # rejected before any work


def test_tiny_components_and_save_load_round_trip(tmp_path, pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.default_size == SIZE
    pipe.save_pretrained(tmp_path / "model")
    loaded = O2MAGPipeline.from_pretrained(str(tmp_path / "model"))
    assert isinstance(loaded, O2MAGPipeline) and isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.model_id == str(tmp_path / "model")
    for a, b in zip(pipe.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)
    # a Stable-Diffusion-shaped folder: other pipeline class, PNDM scheduler, safety checker entries
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionPipeline", scheduler=["diffusers", "PNDMScheduler"],
                 safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    sd = O2MAGPipeline.from_pretrained(str(tmp_path / "model"))
    assert isinstance(sd, O2MAGPipeline) and isinstance(sd.scheduler, DDIMScheduler)
    # a Stable Diffusion folder ships PNDM: it is converted to DDIM with the same config
    other = O2MAGPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                          PNDMScheduler.from_config(pipe.scheduler.config))
    assert isinstance(other.scheduler, DDIMScheduler)
    assert other.scheduler.config.beta_schedule == pipe.scheduler.config.beta_schedule


def test_from_pretrained_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        O2MAGPipeline.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        O2MAGPipeline.from_pretrained(str(tmp_path / "file.bin"))
    with pytest.raises(MissingInputError, match="not found"):
        O2MAGPipeline.from_pretrained(str(tmp_path / "missing" / "model"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(InputError, match="could not load"):
        O2MAGPipeline.from_pretrained(str(broken))


@pytest.mark.parametrize("make", [
    lambda cfg: DDIMScheduler(**{**cfg, "clip_sample": True}),  # DDIMScheduler() clips by default
    lambda cfg: PNDMScheduler(**{k: v for k, v in cfg.items() if k not in ("clip_sample", "set_alpha_to_one")}),
])
def test_scheduler_never_clips_so_inversion_mirrors_denoising(pipe, make):
    # A clipping DDIM step is not the mirror of the inversion: denoising the inverted latent with the
    # same noise predictions must give the start latent back (SD latents often exceed [-1, 1]).
    from o2mag.method.inversion import ddim_invert
    from o2mag.sources.tiny import SD15_SCHEDULER_CONFIG

    p = O2MAGPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, make(dict(SD15_SCHEDULER_CONFIG)))
    assert isinstance(p.scheduler, DDIMScheduler) and not p.scheduler.config.clip_sample
    z0 = 2 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def round_trip(dtype):
        import copy

        scheduler = copy.deepcopy(p.scheduler)  # its alphas in the run's precision too
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dtype)
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=dtype)
        e = eps.to(dtype)
        inv = ddim_invert(lambda z, t: e, scheduler, z0.to(dtype), 10, progress=False)
        z = inv.noise
        for t in inv.timesteps:
            z = ddim_step(scheduler, e, t, z)
        return z

    # exact in exact arithmetic (each step inverts the other with the same alphas): float64 shows
    # it, float32 may differ by its own rounding only (a clipping step would be off by O(1))
    exact = round_trip(torch.float64)
    assert exact.dtype == torch.float64 and float((exact - z0.double()).abs().max()) < 1e-9
    z = round_trip(torch.float32)
    tol = float_order_bound(z.numpy(), exact.numpy())
    assert float((z.double() - z0.double()).abs().max()) <= tol


def test_pipeline_reads_mask_files_and_images_like_the_command_line(tmp_path):
    # one reader for masks (o2mag.masks.images): a mask drawn as alpha on black and a 16-bit mask must mean
    # the same to O2MAGPipeline as to the o2mag command, as a path or as an opened PIL image
    from PIL import Image

    from o2mag.masks.images import load_mask
    from o2mag.pipeline.inputs import mask_array

    alpha = np.zeros((8, 8, 4), np.uint8)
    alpha[2:5, 3:6, 3] = 255
    Image.fromarray(alpha, "RGBA").save(tmp_path / "alpha.png")
    deep = np.zeros((8, 8), np.uint16)
    deep[1:3, 1:3] = 65535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    for name in ("alpha.png", "deep.png"):
        path = tmp_path / name
        expected = load_mask(path)
        assert expected.any()
        assert np.array_equal(mask_array(str(path), "ref_mask"), expected)
        with Image.open(path) as im:
            assert np.array_equal(mask_array(im, "ref_mask"), expected)
    assert np.array_equal(mask_array(torch.from_numpy(deep[None] > 0), "m"), deep > 0)  # (1, H, W)


def test_progress_bars_show_each_phase_unless_disabled(pipe, sample, capsys):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[50:60, 50:60] = True
    pipe.clear_caches()  # so the inversions and AGO really run
    pipe.progress = True
    try:
        _run(pipe, sample, [m, m, m], num_steps=2, ago_steps=1, batch_size=2, seed=5)
        err = capsys.readouterr().err
        for phase in ("AGO", "DDIM inversion", "denoising batch 1/2", "denoising batch 2/2", "generating"):
            assert phase in err, phase
        pipe.set_progress_bar_config(disable=True)
        _run(pipe, sample, [m], num_steps=2, ago_steps=1, seed=6)
        assert "denoising" not in capsys.readouterr().err
    finally:
        pipe.progress = False
        pipe.set_progress_bar_config(disable=False)
