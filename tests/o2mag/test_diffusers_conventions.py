"""What diffusers users rely on beyond the call itself, on the tiny components: ``from_pipe`` in
both directions (components shared, same images), the callback state diffusers' callbacks read
and write (``num_timesteps``, ``guidance_scale``, ``do_classifier_free_guidance``, ``interrupt``),
and ``encode_prompt`` on a pipeline that holds only the text components."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback

from o2mag import O2MAGPipeline
from o2mag.sources.tiny import tiny_components

from .calls import SIZE, STEPS, call

NAMES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _sd(**overrides):
    parts = {**tiny_components(0), **overrides}
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------- from_pipe
def test_from_pipe_shares_the_components_and_makes_the_same_images(sample, masks):
    sd = _sd()
    pipe = _quiet(O2MAGPipeline.from_pipe(sd))
    assert isinstance(pipe, O2MAGPipeline)
    for name in NAMES:  # the same objects: no copy, no reload
        assert getattr(pipe, name) is getattr(sd, name), name
    # one built directly on the same components computes the same thing, bit for bit
    direct = _quiet(O2MAGPipeline(**{name: getattr(sd, name) for name in NAMES}))
    a = call(pipe, sample, masks[:2], output_type="np").images
    b = call(direct, sample, masks[:2], output_type="np").images
    assert np.array_equal(a, b)


def test_from_pipe_back_to_stable_diffusion(sample, masks):
    sd = _sd()
    pipe = O2MAGPipeline.from_pipe(sd)
    # O2MAG has no safety checker: going back, the components it lacks are passed, as diffusers'
    # from_pipe asks of every pipeline pair
    back = StableDiffusionPipeline.from_pipe(pipe, safety_checker=None, feature_extractor=None)
    back.set_progress_bar_config(disable=True)
    for name in NAMES:
        assert getattr(back, name) is getattr(sd, name), name
    public = lambda p: {k: v for k, v in p.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(back) == public(sd)  # requires_safety_checker=False came back through O2MAG's config

    def txt2img(p):
        return p("a photo of a scratch", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    assert np.array_equal(txt2img(back), txt2img(sd))


def test_from_pipe_converts_a_clipping_scheduler_and_leaves_the_original_alone():
    config = dict(tiny_components(0)["scheduler"].config)
    sd = _sd(scheduler=PNDMScheduler.from_config(config))
    before = dict(sd.scheduler.config)
    pipe = O2MAGPipeline.from_pipe(sd)
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.scheduler.config.clip_sample
    assert pipe.scheduler.config.beta_schedule == before["beta_schedule"]
    assert isinstance(sd.scheduler, PNDMScheduler) and dict(sd.scheduler.config) == before
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(pipe, name) is getattr(sd, name), name
    # back, with the original scheduler handed over: the Stable Diffusion pipeline as it was
    back = StableDiffusionPipeline.from_pipe(pipe, safety_checker=None, feature_extractor=None,
                                             scheduler=sd.scheduler)
    assert back.scheduler is sd.scheduler
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in sd.config.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------- encode_prompt
def test_encode_prompt_on_a_pipeline_with_only_the_text_components():
    parts = tiny_components(0)
    text_only = O2MAGPipeline(unet=None, vae=None, scheduler=None, text_encoder=parts["text_encoder"],
                              tokenizer=parts["tokenizer"])
    full = O2MAGPipeline(**parts)
    for prompt in ("a photo of a scratch", ""):
        # the same modules on the same tokens: equal by construction
        assert torch.equal(text_only.encode_prompt(prompt), full.encode_prompt(prompt))
    assert text_only.vae_scale_factor == full.vae_scale_factor == 8


# ---------------------------------------------------------------------------------- callback state
def test_callbacks_read_the_step_count_and_the_guidance(pipe, sample, masks):
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance, p.interrupt))
        if i == p.num_timesteps - 1:  # the last step of every batch, as diffusers' callbacks find it
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = call(pipe, sample, masks, guidance_scale=6.0, batch_size=2, output_type="latent",
                callback_on_step_end=record).images
    assert seen == [(i, STEPS, 6.0, True, False) for i in range(STEPS)] * 2  # two batches
    assert torch.equal(out, torch.zeros_like(out))
    seen.clear()
    call(pipe, sample, masks[:1], guidance_scale=1.0, callback_on_step_end=record)
    assert [s[3] for s in seen] == [False] * STEPS


def test_guidance_at_or_below_one_runs_only_the_conditional_half(pipe, sample, masks):
    # diffusers' rule: guidance is on when guidance_scale > 1
    rows = {}
    for g in (0.0, 0.5, 1.0, 1.5):
        pipe.stats.reset()
        call(pipe, sample, masks[:1], guidance_scale=g)
        rows[g] = pipe.stats.generation_unet_rows
    one_half = STEPS * (1 + 2)  # a target, the reference and the normal image, per step
    assert rows == {0.0: one_half, 0.5: one_half, 1.0: one_half, 1.5: 2 * one_half}


def test_a_callback_changes_the_guidance_of_the_steps_after_it(pipe, sample, masks):
    starts = []

    def increase(p, i, t, kwargs):
        if i == 0:
            starts.append(p.guidance_scale)
        p._guidance_scale += 1.0
        return kwargs

    call(pipe, sample, masks, guidance_scale=2.0, batch_size=2, callback_on_step_end=increase)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps
    assert starts == [2.0, 2.0]  # every batch starts from the call's value: batching changes nothing

    def set_to(value):
        def callback(p, i, t, kwargs):
            if i == 0:
                p._guidance_scale = value
            return kwargs
        return callback

    plain = call(pipe, sample, masks[:1], guidance_scale=7.5, output_type="np").images
    # 0 and 1 both turn guidance off (diffusers' SDCFGCutoffCallback sets 0): the conditional
    # prediction alone from step 1 on -- not the unconditional one that a scale of 0 would give
    to_zero = call(pipe, sample, masks[:1], guidance_scale=7.5, output_type="np",
                    callback_on_step_end=set_to(0.0))
    to_one = call(pipe, sample, masks[:1], guidance_scale=7.5, output_type="np",
                   callback_on_step_end=set_to(1.0))
    cutoff = call(pipe, sample, masks[:1], guidance_scale=7.5, output_type="np",
                   callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    assert np.array_equal(to_zero.images, to_one.images) and np.array_equal(cutoff.images, to_one.images)
    assert np.abs(to_one.images - plain).max() > 1e-3  # the change took effect


def test_a_callback_cannot_turn_guidance_on_mid_run(pipe, sample, masks):
    def turn_on(p, i, t, kwargs):
        p._guidance_scale = 3.0
        return kwargs

    with pytest.raises(RuntimeError, match="unconditional half was never run"):
        call(pipe, sample, masks[:1], guidance_scale=1.0, callback_on_step_end=turn_on)


def test_interrupt_stops_the_denoising(pipe, sample, masks):
    steps = []

    def stop_after_two(p, i, t, kwargs):
        steps.append(i)
        if i == 1:
            p._interrupt = True
        return kwargs

    pipe.stats.reset()
    out = call(pipe, sample, masks, num_inference_steps=4, batch_size=2, output_type="latent",
                callback_on_step_end=stop_after_two).images
    assert steps == [0, 1]  # no later step of this batch, no step of the next one
    assert pipe.stats.generation_unet_calls == 2
    assert out.shape[0] == len(masks)  # pipe(...) still returns every target, as diffusers does
    # the later batch's target was not denoised at all: it is still the starting noise, the
    # normal image's inverted latent (the same computation again, so equal bit for bit)
    noise = pipe.invert(np.asarray(sample.normal.convert("RGB")), 4).noise
    assert torch.equal(out[2:], noise.cpu().expand(1, -1, -1, -1))
    full = call(pipe, sample, masks, num_inference_steps=4, batch_size=2, output_type="latent").images
    assert pipe.interrupt is False and not torch.equal(full[2:], out[2:])  # the next call starts afresh
    pipe.stats.reset()
    streamed = list(pipe.generate_iter(sample.reference, sample.ref_mask, sample.normal, masks, sample.prompt,
                                       sample.anomaly_word, num_inference_steps=4, ago_steps=1, batch_size=2,
                                       callback_on_step_end=stop_after_two))
    assert streamed == []  # the interrupted batch is half-denoised: streaming yields none of it
    assert pipe.stats.generation_unet_calls == 2


def test_an_interrupt_at_step_0_streams_nothing_of_that_batch(pipe, sample, masks):
    """A batch interrupted at its first step is no finished sample: generate_iter ends without it,
    while the batch before it, finished, was streamed."""
    calls = []

    def stop_in_second_batch(p, i, t, kwargs):
        calls.append(i)
        if len(calls) == 3:  # step 0 of the second batch (2 steps per batch)
            p._interrupt = True
        return kwargs

    streamed = list(pipe.generate_iter(sample.reference, sample.ref_mask, sample.normal, masks, sample.prompt,
                                       sample.anomaly_word, num_inference_steps=2, ago_steps=1, batch_size=2,
                                       callback_on_step_end=stop_in_second_batch))
    assert calls == [0, 1, 0]
    assert [k for k, _, _ in streamed] == [0, 1]
