"""AGO on SDXL with the pooled text embedding fixed (the default) or optimised too (``ago_pooled``):
``python -m benchmarks.o2mag.ago_pooled [--model FOLDER] [--steps N] [--seeds 0 1 2] [--size S]
[--results-dir DIR]``.

For each seed both variants run AGO on the embedded brushed-metal sample with the same steps, lr
and seed (so the same training draws), and the run records:

(a) the held-out AGO loss -- the loss AGO descends (mask-weighted unless ``--no-mask-weight``) on
    a fixed set of ``--heldout`` (timestep, noise) draws from a generator of their own, not the
    training draws -- of the prompt's embeddings, of the sequence-only result and of the
    sequence + pooled result;
(b) how far each tensor moved: the relative L2 change ``|x - x0| / |x0|`` of the sequence
    embedding (both variants) and of the pooled one (``ago_pooled``);
(c) the effect on generation: ``pipe(...)`` with the background blend on, one target mask, each
    variant; the mean absolute difference of the final target latents inside M_T and outside
    it (0 by construction: outside M_T both are the normal branch's latent);
(d) AGO seconds per step of each variant (the pipeline's whole AGO call over its steps, after a
    warm-up run; it includes one VAE encode and the prompt's encoding): wall time, and the
    process's CPU time (steadier on a shared CPU; on a GPU the wall time is the one to read).

Without ``--model`` the model is the tiny random SDXL-shaped one on the CPU (it says whether the
machinery works and what it costs, not whether images get better); with ``--model`` an SDXL
folder or hub id on ``--device`` (cuda when available). Writes
``benchmarks/results/<device>-ago-pooled.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from o2mag import AttentionGraft, BranchLayout, GraftConfig, O2MAGPipeline
from o2mag.method.ago import ago_draws, ago_loss, dilate_mask
from o2mag.sources.sample import embedded_sample

from ..measure import environment, slug

ROOT = Path(__file__).resolve().parents[2]
HELDOUT_SEED = 20_240_917  # the held-out draws' generator: never a training seed
TINY_SIZE = 64
TINY_DENOISE_STEPS = 4
DENOISE_STEPS = 50


def load(model, device, dtype):
    """The tiny SDXL-shaped pipeline (``model`` None) or the SDXL folder/hub id ``model``."""
    if model is None:
        pipe = O2MAGPipeline.tiny(0, family="sdxl")
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
            # as o2mag generate runs the tiny model: its ops are far too small to gain from
            # threads, and extra threads only spin (several times slower on a shared CPU)
            torch.set_num_threads(1)
    else:
        pipe = O2MAGPipeline.from_pretrained(model, dtype=dtype)
    if not pipe.is_xl:
        raise SystemExit(f"{model}: not an SDXL model (ago_pooled is SDXL's pooled text embedding)")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.progress = False
    return pipe


def target_mask(ref_mask: np.ndarray) -> np.ndarray:
    """M_T: the reference mask moved a quarter of the image to the right (wrapping)."""
    return np.roll(ref_mask, ref_mask.shape[1] // 4, axis=1)


def rel_change(x: torch.Tensor, x0: torch.Tensor) -> float:
    return float((x.double() - x0.double()).norm() / x0.double().norm())


def timed_ago(pipe, image, prompt, mask, seed, steps, lr, pooled):
    """``((sequence, pooled or None), wall seconds, process CPU seconds)`` of one AGO call of the
    pipeline (not cached yet: each variant and seed has a key of its own). On a shared CPU the
    process time is the steadier number (other processes' load stretches the wall time)."""
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = pipe.optimize_conditioning(image, prompt, steps=steps, lr=lr, mask=mask, seed=seed, pooled=pooled)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def final_latents(pipe, sample, m_t, *, seed, steps, lr, mask_weight, pooled, denoise_steps, size):
    """The final target latent of ``pipe(...)`` (blend on) for one variant (AGO from the cache)."""
    out = pipe(sample.reference, sample.ref_mask, sample.normal, [m_t], prompt=sample.prompt,
               anomaly_word=sample.anomaly_word, num_inference_steps=denoise_steps, ago_steps=steps, ago_lr=lr,
               ago_mask_weight=mask_weight, ago_pooled=pooled, seed=seed, size=size, output_type="latent",
               blend_background=True)
    return out.images.float().cpu()


def measure_seed(pipe, sample, seed: int, args, heldout_count: int) -> dict:
    """Everything of the module docstring for one seed."""
    size = args.size
    image = np.asarray(sample.reference.convert("RGB"))
    ref_mask = np.asarray(sample.ref_mask).astype(bool)
    mask = ref_mask if args.mask_weight else None
    init, init_pooled = pipe.encode_prompt(sample.prompt), pipe.encode_pooled(sample.prompt)
    z0 = pipe.encode_image(image)
    weight = dilate_mask(torch.from_numpy(ref_mask), z0.shape[-2:], radius=1) if args.mask_weight else None
    added = pipe._added_cond(init_pooled, z0)
    draws = ago_draws(pipe.scheduler, z0, heldout_count, torch.Generator().manual_seed(HELDOUT_SEED))

    def loss(emb, pooled=None):
        return ago_loss(pipe.unet, pipe.scheduler, z0, emb, draws, weight=weight, added_cond_kwargs=added,
                        pooled=pooled)

    (seq_only, none), t_fixed, c_fixed = timed_ago(pipe, image, sample.prompt, mask, seed, args.steps, args.lr,
                                                   False)
    (seq_joint, pooled), t_pooled, c_pooled = timed_ago(pipe, image, sample.prompt, mask, seed, args.steps,
                                                        args.lr, True)
    assert none is None and pooled is not None
    m_t = target_mask(ref_mask)
    common = dict(seed=seed, steps=args.steps, lr=args.lr, mask_weight=args.mask_weight,
                  denoise_steps=args.denoise_steps, size=size)
    # the pipeline's AGO results are in its memory cache now: pipe(...) reuses them (checked)
    runs = pipe.stats.ago_runs
    x_fixed = final_latents(pipe, sample, m_t, pooled=False, **common)
    x_pooled = final_latents(pipe, sample, m_t, pooled=True, **common)
    if pipe.stats.ago_runs != runs:
        raise RuntimeError("pipe(...) ran AGO again instead of using the measured embeddings")
    graft = AttentionGraft(GraftConfig.for_unet(pipe.unet), BranchLayout(1))
    graft.set_masks(torch.from_numpy(ref_mask), torch.from_numpy(m_t[None]))
    inside = graft.stitch_masks(tuple(x_fixed.shape[-2:]), "cpu")[0, 0] > 0.5
    diff = (x_fixed - x_pooled).abs()[0]
    return {
        "seed": seed,
        "heldout_loss": {"initial": loss(init, init_pooled), "sequence": loss(seq_only, init_pooled),
                         "sequence_pooled": loss(seq_joint, pooled)},
        "relative_change": {"sequence_only": {"sequence": rel_change(seq_only, init)},
                            "sequence_pooled": {"sequence": rel_change(seq_joint, init),
                                                "pooled": rel_change(pooled, init_pooled)}},
        "latents_mean_abs_diff": {"inside": float(diff[:, inside].mean()),
                                  "outside": float(diff[:, ~inside].mean()),
                                  "outside_max": float(diff[:, ~inside].max())},
        "seconds_per_step": {"sequence": t_fixed / args.steps, "sequence_pooled": t_pooled / args.steps},
        "cpu_seconds_per_step": {"sequence": c_fixed / args.steps, "sequence_pooled": c_pooled / args.steps},
    }


def summary(rows) -> dict:
    """The mean over seeds of every number, and how many seeds the joint run beat the other on."""
    def mean(get):
        return float(np.mean([get(r) for r in rows]))

    def means(part, keys):
        return {k: mean(lambda r, k=k: r[part][k]) for k in keys}

    losses = [r["heldout_loss"] for r in rows]
    return {
        "heldout_loss": means("heldout_loss", ("initial", "sequence", "sequence_pooled")),
        "seeds_pooled_lower_heldout_loss": sum(v["sequence_pooled"] < v["sequence"] for v in losses),
        "relative_change": {
            "sequence_only.sequence": mean(lambda r: r["relative_change"]["sequence_only"]["sequence"]),
            "sequence_pooled.sequence": mean(lambda r: r["relative_change"]["sequence_pooled"]["sequence"]),
            "sequence_pooled.pooled": mean(lambda r: r["relative_change"]["sequence_pooled"]["pooled"])},
        "latents_mean_abs_diff": means("latents_mean_abs_diff", ("inside", "outside")),
        "seconds_per_step": means("seconds_per_step", ("sequence", "sequence_pooled")),
        "cpu_seconds_per_step": means("cpu_seconds_per_step", ("sequence", "sequence_pooled")),
    }


def run(args) -> dict:
    """Measure every seed; the results file's content."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and args.model else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = load(args.model, device, dtype)
    args.size = args.size or (TINY_SIZE if args.model is None else pipe.default_size)
    args.denoise_steps = args.denoise_steps or (TINY_DENOISE_STEPS if args.model is None else DENOISE_STEPS)
    sample = embedded_sample(args.size)
    # warm-up (first backward allocations, lazy inits): one short AGO run of each variant
    image = np.asarray(sample.reference.convert("RGB"))
    for pooled in (False, True):
        pipe.optimize_conditioning(image, sample.prompt, steps=2, lr=args.lr, seed=10_000, pooled=pooled)
    rows = []
    for seed in args.seeds:
        rows.append(measure_seed(pipe, sample, seed, args, args.heldout))
        print(json.dumps(rows[-1]), flush=True)
    return {"environment": environment(device),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": pipe.model_id or args.model, "tiny_random_model": args.model is None, "dtype": args.dtype,
            "size": args.size, "ago_steps": args.steps, "ago_lr": args.lr, "mask_weight": args.mask_weight,
            "heldout_draws": args.heldout, "heldout_seed": HELDOUT_SEED, "denoise_steps": args.denoise_steps,
            "guidance_scale": 7.5, "seeds": rows, "mean": summary(rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.o2mag.ago_pooled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="an SDXL diffusers folder or hub id (default: the tiny random SDXL-shaped model, CPU)")
    parser.add_argument("--steps", type=int, default=200, help="AGO steps of each variant (default 200)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AGO learning rate (default 3e-3, the pipeline's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="AGO seeds (default 0 1 2)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"working image side (default {TINY_SIZE} on the tiny model, else the model's native)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out (timestep, noise) draws (default 32)")
    parser.add_argument("--denoise-steps", type=int, default=None,
                        help=f"DDIM steps of the generation (default {TINY_DENOISE_STEPS} tiny, {DENOISE_STEPS} else)")
    parser.add_argument("--no-mask-weight", dest="mask_weight", action="store_false",
                        help="AGO's plain loss over the whole latent instead of the reference-mask-weighted one")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --model when available)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model precision")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    for name in ("steps", "heldout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.denoise_steps is not None and args.denoise_steps < 2:
        parser.error("--denoise-steps must be at least 2")
    result = run(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{slug(result['environment']['device'])}-ago-pooled.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["mean"], indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
