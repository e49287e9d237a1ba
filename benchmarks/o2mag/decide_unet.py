"""Sections E and F of the deciding GPU call (:mod:`benchmarks.kernels.decide`): what the op's
speed becomes in a grafted UNet call, and what AGO costs per reference.

E  one UNet call at a TriAG + DAE step, SD v1.5 shapes (random weights), N = 8: stock against
   grafted, eager and with CUDA graphs (``torch.compile(unet, mode="reduce-overhead")``), with the
   op's ``auto`` backend and with the ``torch`` backend; then the device time of the grafted call
   by kernel and the host time by operator (profiler), so the processors' share is visible.
F  AGO (the embedding optimisation, forward and backward through the UNet) in seconds per step for
   the UNet as loaded (fp16), in channels-last memory format and compiled, extrapolated to the
   paper's 500 steps.

Both take a recorder with ``row(**fields)`` and ``guard(name, fn, need)`` (the one of
:mod:`benchmarks.kernels.decide`) and need a CUDA GPU and diffusers.
"""
from __future__ import annotations

import time

import torch

from o2mag.method.ago import optimize_embedding

from .e2e import grafted_call_inputs, sd15_shaped_pipeline, unet_call_rows

AGO_PAPER_STEPS = 500


def unet_rows(rec, num: int = 8) -> None:
    """Section E: stock vs grafted UNet call, eager and CUDA graphs, two backends; a profile."""
    device = torch.device("cuda")
    pipe = sd15_shaped_pipeline(device)
    for compiled, mode in ((False, None), (True, "reduce-overhead")):
        for backend in ("auto", "torch"):
            def one(compiled=compiled, mode=mode, backend=backend):
                for r in unet_call_rows(pipe, device, (num,), compiled=compiled, mode=mode,
                                        backend=backend):
                    rec.row(sec="E", what="unet call", **r)
            rec.guard(f"unet {backend} {mode or 'eager'}", one, need=90 if compiled else 20)
    rec.guard("unet profile", lambda: rec.row(sec="E", what="unet profile",
                                              **profile_grafted_call(pipe, device, num)), need=20)


def profile_grafted_call(pipe, device, num: int) -> dict:
    """Top device kernels and top host operators of one grafted call (TriAG + DAE step)."""
    from torch.profiler import ProfilerActivity, profile  # deferred: only on a GPU

    unet = pipe.unet
    lat_hw = pipe.default_size // pipe.vae_scale_factor
    _, lat, emb, t, graft = grafted_call_inputs(pipe, device, num)
    with torch.no_grad(), graft.installed(unet):
        graft.prepare((lat_hw, lat_hw), device, dtype=unet.dtype)
        graft.set_step(25, 50)
        for _ in range(2):
            unet(lat, t, encoder_hidden_states=emb)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                unet(lat, t, encoder_hidden_states=emb)
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_top = sorted(((e.key, e.self_device_time_total) for e in events if e.self_device_time_total > 0),
                        key=lambda x: -x[1])[:12]
    host_top = sorted(((e.key, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0),
                      key=lambda x: -x[1])[:12]
    return {"num": num, "device_ms": [(k[:100], round(v / 3e3, 4)) for k, v in device_top],
            "host_ms": [(k[:100], round(v / 3e3, 4)) for k, v in host_top]}


def ago_rows(rec, steps: int = 20) -> None:
    """Section F: AGO seconds per step, eager, channels-last and compiled, and for 500 steps."""
    device = torch.device("cuda")
    pipe = sd15_shaped_pipeline(device)
    lat_hw = pipe.default_size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, lat_hw, lat_hw, generator=g).to(device)
    init = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g).to(device)
    weight = torch.zeros(lat_hw, lat_hw)
    weight[lat_hw // 4:lat_hw // 2, lat_hw // 4:lat_hw // 2] = 1
    setups = (("fp16 eager", lambda u: u),
              ("fp16 channels_last", lambda u: u.to(memory_format=torch.channels_last)),
              ("fp16 compiled", torch.compile))
    for label, prepare in setups:
        def one(label=label, prepare=prepare):
            unet = prepare(pipe.unet)
            gen = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            optimize_embedding(unet, pipe.scheduler, z0, init, steps=3, weight=weight, generator=gen,
                               progress=False)  # warm-up (and compilation)
            torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            optimize_embedding(unet, pipe.scheduler, z0, init, steps=steps, weight=weight, generator=gen,
                               progress=False)
            torch.cuda.synchronize()
            per_step = (time.perf_counter() - t0) / steps
            rec.row(sec="F", what=f"AGO {label}", s_per_step=round(per_step, 5),
                    s_for_500=round(per_step * AGO_PAPER_STEPS, 2), warmup_s=round(warm, 2))
        try:
            rec.guard(f"ago {label}", one, need=90 if "compiled" in label else 20)
        finally:  # the next setup starts from the UNet as loaded
            pipe.unet.to(memory_format=torch.contiguous_format)
            torch._dynamo.reset()
