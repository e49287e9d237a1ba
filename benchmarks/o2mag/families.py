"""Memory and time per generated sample for each model family o2mag runs, in one command.

    python -m benchmarks.o2mag.families [--family sd1 sd2-768 sdxl sd2] [--num 8] [--steps 20]
                                        [--seconds 400] [--results-dir DIR] [--no-plot]
    bash tests/kernels/gpu_check.sh families        # the same on a GPU, results to $OUT if set

Families (``--family``, run in the order given; default all four in this order: SD v1.5 first,
the baseline the end-to-end suite has measured, SD 2 base last, the least new):

- ``sd1``: SD v1.5 at 512 px (:func:`~benchmarks.o2mag.e2e.sd15_shaped_pipeline`);
- ``sd2-768``: SD 2.1 at 768 px, v-prediction, OpenCLIP-H text encoder;
- ``sdxl``: SDXL base 1.0 at 1024 px, CLIP-L and OpenCLIP-bigG text encoders, "text_time"
  conditioning, the VAE upcast to float32 for encoding and decoding (``force_upcast``);
- ``sd2``: SD 2 base at 512 px, epsilon, the same UNet shapes as ``sd2-768``.

On a GPU each family is a random-weight model with the published checkpoint's full shapes (the
config dicts below name the checkpoint each mirrors; weights do not change speed), in fp16, with
the shipped tiny tokenizer (the vocabulary size does not change speed either). The models are
built directly on the GPU: SDXL's UNet alone is 2.6B parameters, and random initialisation of the
pipeline's 3.5B parameters in fp32 on a CPU is what takes long -- expected tens of seconds on 16
cores, a few seconds on the GPU (the row ``init_s`` records it; the tiny models take 0.05 to 0.1 s
on a CPU). On a CPU each family is its tiny seeded model (:meth:`o2mag.O2MAGPipeline.tiny`;
``sd2`` is the tiny SD 2.x model with epsilon prediction) at the tiny size: a check that the
harness runs, not a performance claim; the file records the device and the model so the two are
never mixed up.

Per family, rows written to ``<results-dir>/<device>-families.json`` as each lands (a run cut
short keeps what it measured), each printed as one JSON line:

``model``     working size, transformer blocks, the TriAG layers ``GraftConfig.for_unet`` picks,
              UNet parameters, seconds to build, GPU memory the weights hold;
``generate``  seconds per generated sample for N targets in one batch (``batch_size=N``,
              ``ago_steps=0``, ``--steps`` DDIM steps, the inversions of the reference and normal
              image included, decoded to PIL), after one untimed 2-step run of the same call
              (kernels load, cuDNN and the op's autotuner pick their configs); peak GPU memory;
``ago``       AGO seconds per step (embedding optimisation, forward and backward through the UNet,
              one row), a few steps timed after a warm-up step, and the paper's 500 steps;
``unet call`` one UNet call at a TriAG + DAE step, grafted against stock, on the N-target batch
              (:func:`~benchmarks.o2mag.e2e.unet_call_rows`, eager);
``txt2img``   diffusers' own pipeline on the same components (``StableDiffusionPipeline``, SDXL:
              ``StableDiffusionXLPipeline``), N images in one batch, same steps, guidance 7.5,
              after a 2-step warm-up: the cost of an ordinary image, the yardstick.

VAE slicing is on (one image decoded at a time, in both pipelines): SDXL's VAE decodes in float32,
and eight 1024 px images at once would need tens of GB for the decoder alone. Each family's
pipeline is freed before the next starts, so its peak memory is its own. Every section is guarded:
an error is recorded in ``errors`` and the next section runs. ``--seconds`` is a time budget: a
family not started when it is spent is skipped and listed in ``skipped`` (a started family
finishes), so that with the default (400 s on a GPU) the command ends inside one 10-minute call.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from o2mag import GraftConfig, O2MAGPipeline
from o2mag.graft.unet_layers import transformer_layers
from o2mag.masks.targets import affine_masks
from o2mag.method.ago import dilate_mask, optimize_embedding
from o2mag.sources.sample import embedded_sample
from o2mag.sources.tiny import (SD2_SCHEDULER_CONFIG, SD15_SCHEDULER_CONFIG, tiny_sd2_components,
                                tiny_tokenizer)
from o2mag_kernels import available_backends

from ..kernels.decide import Recorder
from ..measure import ROOT, environment, slug
from ..report import families_table, header, plot
from .e2e import added_cond_inputs, sd15_shaped_pipeline, txt2img_pipeline, unet_call_rows

ORDER = ("sd1", "sd2-768", "sdxl", "sd2")
AGO_PAPER_STEPS = 500

# ------------------------------------------------------------------ the published shapes
# UNet2DConditionModel configs: only the entries that differ from diffusers' defaults.

# stabilityai/stable-diffusion-2-1 (unet/config.json): 768 px, OpenCLIP-H cross-attention
SD21_UNET = dict(
    sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True)
# stabilityai/stable-diffusion-2-base (unet/config.json): the same UNet trained at 512 px
SD2_BASE_UNET = dict(SD21_UNET, sample_size=64, upcast_attention=False)
# stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# the SD VAE (vae/config.json of every checkpoint above; sample_size is the checkpoint's size)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# stabilityai/stable-diffusion-xl-base-1.0 (vae/config.json): SDXL's scaling, fp16 overflow flag
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# CLIPTextConfig entries. stabilityai/stable-diffusion-2-1 (text_encoder/config.json): OpenCLIP-H
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
# stabilityai/stable-diffusion-xl-base-1.0 (text_encoder/config.json): OpenAI CLIP ViT-L/14
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
# stabilityai/stable-diffusion-xl-base-1.0 (text_encoder_2/config.json): OpenCLIP-bigG, with projection
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)

CHECKPOINTS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "sd2-768": "stabilityai/stable-diffusion-2-1",
               "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
               "sd2": "stabilityai/stable-diffusion-2-base"}


def full_components(family: str, device="cpu", seed: int = 0) -> Dict[str, object]:
    """The components of ``family`` ("sd2-768", "sd2" or "sdxl"; "sd1" is
    :func:`~benchmarks.o2mag.e2e.sd15_shaped_pipeline`) with the published checkpoint's shapes and
    random float32 weights, built on ``device`` ("meta": shapes only, nothing allocated)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in ("sd2-768", "sd2", "sdxl"):
        raise ValueError(f"family must be 'sd2-768', 'sd2' or 'sdxl', got {family!r}")
    tokenizer = tiny_tokenizer()

    def text(cls, cfg):
        return cls(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.eos_token_id, **cfg))

    sched = dict(SD15_SCHEDULER_CONFIG) if family == "sdxl" else dict(
        SD2_SCHEDULER_CONFIG, prediction_type="v_prediction" if family == "sd2-768" else "epsilon")
    out: Dict[str, object] = dict(tokenizer=tokenizer, scheduler=DDIMScheduler(**sched))  # CPU tensors
    torch.manual_seed(seed)
    with torch.device(device):
        if family == "sdxl":
            out.update(unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
                       text_encoder=text(CLIPTextModel, CLIP_L),
                       text_encoder_2=text(CLIPTextModelWithProjection, OPENCLIP_BIGG),
                       tokenizer_2=tiny_tokenizer())
        else:
            unet = SD21_UNET if family == "sd2-768" else SD2_BASE_UNET
            out.update(unet=UNet2DConditionModel(**unet),
                       vae=AutoencoderKL(**SD_VAE, sample_size=8 * unet["sample_size"]),
                       text_encoder=text(CLIPTextModel, OPENCLIP_H))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in out:
            out[name].eval().requires_grad_(False)
    return out


def full_pipeline(family: str, device, dtype=torch.float16, seed: int = 0) -> O2MAGPipeline:
    """Random-weight :class:`O2MAGPipeline` with ``family``'s published shapes, built on ``device``."""
    if family == "sd1":
        pipe = sd15_shaped_pipeline(device, dtype, seed)
    else:
        pipe = O2MAGPipeline(**full_components(family, device, seed)).to(device=device, dtype=dtype)
    pipe.model_id = f"random-weight {CHECKPOINTS[family]} shapes, {str(dtype).replace('torch.', '')}"
    return pipe


def tiny_pipeline(family: str, seed: int = 0) -> O2MAGPipeline:
    """The tiny seeded model of ``family`` (sd2-768: tiny SD 2.x with v-prediction, sd2: epsilon)."""
    if family == "sd2":
        pipe = O2MAGPipeline(**tiny_sd2_components(seed, prediction_type="epsilon"))
        pipe.model_id = f"o2mag-tiny-seed{seed}-sd2-epsilon"
        return pipe
    return O2MAGPipeline.tiny(seed, family={"sd2-768": "sd2"}.get(family, family))


# ------------------------------------------------------------------ measuring


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device):
    """(seconds, peak GPU memory in GiB or None off CUDA) of one call of ``fn``."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def _gib(device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


class _Family:
    """One family's measurements, each a method that records one row."""

    def __init__(self, rec: Recorder, name: str, device, *, num: int, steps: int, ago_steps: int,
                 repeats: int, size: Optional[int]):
        self.rec, self.name, self.device = rec, name, device
        self.num, self.steps, self.ago_steps, self.repeats = num, steps, ago_steps, repeats
        t0 = time.perf_counter()
        if device.type == "cuda":
            self.pipe = full_pipeline(name, device)
        else:
            self.pipe = tiny_pipeline(name)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.vae.enable_slicing()
        _sync(device)
        self.init_s = time.perf_counter() - t0
        self.size = size or self.pipe.default_size
        self.sample = embedded_sample(size=self.size)
        self.targets = [t.mask for t in affine_masks(np.asarray(self.sample.ref_mask), num, seed=0)]

    def row(self, what: str, **fields) -> None:
        self.rec.row(family=self.name, what=what, **fields)

    def model(self) -> None:
        unet = self.pipe.unet
        config = GraftConfig.for_unet(unet)
        self.row("model", model=self.pipe.model_id, checkpoint=CHECKPOINTS[self.name], size=self.size,
                 blocks=len(transformer_layers(unet)), triag_layers=list(config.graft_layers),
                 layers=config.describe_layers(), unet_params=sum(p.numel() for p in unet.parameters()),
                 prediction_type=self.pipe.scheduler.config.prediction_type,
                 dtype=str(unet.dtype).replace("torch.", ""), init_s=round(self.init_s, 3),
                 weights_gib=_gib(self.device))

    def _generate(self, steps: int):
        s = self.sample
        self.pipe(s.reference, s.ref_mask, s.normal, self.targets, s.prompt, s.anomaly_word,
                  num_inference_steps=steps, ago_steps=0, seed=0, batch_size=self.num, size=self.size)

    def generate(self) -> None:
        self._generate(2)  # warm-up: kernels load, autotuners pick their configs
        self.pipe.clear_caches()  # the timed run inverts again, as a new reference would
        self.pipe.stats.reset()
        seconds, peak = _timed(lambda: self._generate(self.steps), self.device)
        stats = self.pipe.stats.as_dict()
        self.row("generate", num=self.num, batch_size=self.num, steps=self.steps, seconds=seconds,
                 seconds_per_sample=seconds / self.num, peak_gib=peak,
                 unet_rows_per_sample=stats["unet_rows"] / self.num, unet_calls=stats["unet_calls"])

    def ago(self) -> None:
        pipe, dev = self.pipe, self.device
        z0 = pipe.encode_image(np.asarray(self.sample.reference.convert("RGB"), dtype=np.uint8))
        init = pipe.encode_prompt(self.sample.prompt)
        added = added_cond_inputs(pipe, 1, dev, self.size)  # SDXL: pooled text + size ids
        weight = dilate_mask(torch.from_numpy(np.asarray(self.sample.ref_mask)), z0.shape[-2:])
        gen = torch.Generator().manual_seed(0)

        def run(steps):
            try:
                optimize_embedding(pipe.unet, pipe.scheduler, z0, init, steps=steps, weight=weight,
                                   generator=gen, progress=False, added_cond_kwargs=added)
                return False
            except FloatingPointError:  # random fp16 weights: every loss overflowed; the steps ran
                return True

        run(1)  # warm-up step (backward kernels load)
        overflowed = []
        seconds, peak = _timed(lambda: overflowed.append(run(self.ago_steps)), dev)
        per_step = seconds / self.ago_steps
        self.row("ago", steps=self.ago_steps, s_per_step=per_step, s_for_500=per_step * AGO_PAPER_STEPS,
                 peak_gib=peak, overflowed=overflowed[0])

    def unet_call(self) -> None:
        for r in unet_call_rows(self.pipe, self.device, (self.num,), compiled=False, repeats=self.repeats):
            self.row("unet call", **r)

    def txt2img(self) -> None:
        sd = txt2img_pipeline(self.pipe)
        prompts = [self.sample.prompt] * self.num

        def run(steps):
            sd(prompts, height=self.size, width=self.size, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="pil")

        run(2)  # warm-up
        seconds, peak = _timed(lambda: run(self.steps), self.device)
        self.row("txt2img", num=self.num, batch_size=self.num, steps=self.steps, seconds=seconds,
                 seconds_per_image=seconds / self.num, peak_gib=peak,
                 pipeline=type(sd).__name__)

    def close(self) -> None:
        del self.pipe
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run_families(rec: Recorder, families, device, *, num: int, steps: int, ago_steps: int,
                 repeats: int, size: Optional[int] = None) -> None:
    """Measure each family in turn into ``rec`` (see the module docstring); a family not started
    before ``rec``'s budget is spent is listed in ``rec.data["skipped"]``."""
    always = -math.inf  # sections of a started family always run; only whole families are skipped
    for name in families:
        if rec.left() <= 0:
            rec.data["skipped"].append({"family": name, "why": "out of time: the --seconds budget was spent"})
            rec.save()
            print(f"families: {name} skipped, out of time", flush=True)
            continue
        fam = rec.guard(f"{name} build", lambda name=name: _Family(
            rec, name, device, num=num, steps=steps, ago_steps=ago_steps, repeats=repeats, size=size),
            need=always)
        if fam is None:
            continue
        try:
            for section in ("model", "generate", "ago", "unet_call", "txt2img"):
                rec.guard(f"{name} {section}", getattr(fam, section), need=always)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # an out-of-memory section leaves the next one its room
        finally:
            fam.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.o2mag.families",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=ORDER, default=list(ORDER),
                        help="families to measure, in this order (default: %(default)s)")
    parser.add_argument("--num", type=int, default=None,
                        help="targets generated in one batch (default: 8 on a GPU, 2 on a CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM steps of the timed runs (default: 20 on a GPU, 3 on a CPU)")
    parser.add_argument("--size", type=int, default=None,
                        help="working image side for every family (default: each family's own)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time budget: families not started when it is spent are skipped "
                             "(default: 400 on a GPU, 120 on a CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where <device>-families.json (and its PNG) go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    gpu = device.type == "cuda"
    num = args.num if args.num is not None else (8 if gpu else 2)
    steps = args.steps if args.steps is not None else (20 if gpu else 3)
    budget = args.seconds if args.seconds is not None else (400.0 if gpu else 120.0)
    if num < 1:
        parser.error("--num must be at least 1")
    if steps < 2:
        parser.error("--steps must be at least 2")
    if args.size is not None and (args.size < 64 or args.size % 8):
        parser.error("--size must be a multiple of 8, at least 64")
    if not budget > 0:
        parser.error("--seconds must be more than 0")
    families = list(dict.fromkeys(args.family))

    env = environment(device)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{slug(env['device'])}-families.json"
    rec = Recorder(str(path), budget=budget)
    model = ("random-weight models with the published checkpoints' shapes, fp16" if gpu else
             "tiny seeded models (o2mag.sources.tiny), float32")
    note = "" if gpu else ("Tiny seeded models on a CPU: a check that the harness runs, not a "
                           "performance claim.")
    rec.data = {"environment": env, "mode": "families", "note": note, "model": model,
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "op_auto": str(available_backends()["auto"]),
                "settings": {"families": families, "num": num, "steps": steps, "size": args.size,
                             "seconds": budget, "ago_steps_timed": 5 if gpu else 2,
                             "guidance_scale": 7.5, "vae_slicing": True},
                "rows": [], "errors": [], "skipped": [], "done": False}
    rec.save()
    print(header(rec.data), flush=True)
    run_families(rec, families, device, num=num, steps=steps,
                 ago_steps=rec.data["settings"]["ago_steps_timed"], repeats=5 if gpu else 3, size=args.size)
    rec.data["done"] = True
    rec.data["wall_s"] = round(time.time() - rec.t0, 1)
    rec.save()
    print("\n" + families_table(rec.data))
    for err in rec.data["errors"]:
        print(f"  (error in {err['section']}: {err['error']})")
    print(f"\nresults: {path} ({rec.data['wall_s']} s)")
    if not args.no_plot:
        try:
            for png in plot(rec.data, path.with_suffix("")):
                print(f"plot:    {png}")
        except ImportError:
            print("plot:    skipped (matplotlib is not installed: pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
