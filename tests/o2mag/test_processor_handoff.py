"""A grafting processor replaces a layer's processor only while grafting is active there; every
other call goes to the processor it replaced exactly as diffusers would have made it: the encoder
states and the mask by name, the ``cross_attention_kwargs`` that processor's own signature takes
(diffusers filters them by the signature it reads off the installed processor, so a grafting
processor shows the wrapped one's). Checked with every processor diffusers ships that our UNets
accept (the default 2.0, the classic one, sliced attention, fused QKV projections), a LoRA adapter
loaded through peft, and user processors with the bare signature or a keyword of their own.

Idle calls are compared bit for bit with the same UNet without o2mag (the same calls in the same
order: deterministic by construction). Grafted calls under another processor are compared with
grafting under the default one within the float-order bound of tests/o2mag/numerics.py (the same
math in another float order)."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0,
                                                  FusedAttnProcessor2_0, SlicedAttnProcessor)

from o2mag import AttentionGraft, BranchLayout, GraftConfig
from o2mag.graft.processors import GraftCrossAttnProcessor, GraftSelfAttnProcessor
from o2mag.sources.tiny import tiny_unet

from .numerics import float_order_bound

# Q graft off so every grafted step runs TriAG and DAE; idle: a config whose windows miss the step
ACTIVE = GraftConfig.paper(backend="torch")
IDLE = GraftConfig.paper(backend="torch", qgraft_steps=None, dae_steps=None, graft_steps=(0.5, 1.0))


def _inputs(layout, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(layout.batch_size, 4, 16, 16, generator=g).to(dtype)
    emb = torch.randn(layout.batch_size, 77, 32, generator=g).to(dtype)
    return lat, emb


def _graft(config, layout):
    g = AttentionGraft(config, layout)
    m = torch.zeros(128, 128)
    m[30:70, 40:90] = 1
    g.set_masks(m, torch.stack([m, m.flip(1)])[: layout.num_targets])
    g.set_token_indices([3])
    return g


def _run(unet, layout, config=None, step=25, seed=0, **kwargs):
    lat, emb = _inputs(layout, seed, unet.dtype)
    with torch.no_grad():
        if config is None:
            return unet(lat, 500, encoder_hidden_states=emb, **kwargs).sample
        g = _graft(config, layout)
        with g.installed(unet):
            g.set_step(step, 50)
            return unet(lat, 500, encoder_hidden_states=emb, **kwargs).sample


def _with(processor_setup):
    """A fresh tiny UNet (seed 0) with a processor setup applied."""
    unet = tiny_unet(seed=0)
    processor_setup(unet)
    return unet


SETUPS = {
    "AttnProcessor2_0": lambda u: u.set_attn_processor(AttnProcessor2_0()),
    "AttnProcessor": lambda u: u.set_attn_processor(AttnProcessor()),
    "SlicedAttnProcessor": lambda u: u.set_attention_slice(1),
    "fused QKV": lambda u: u.fuse_qkv_projections(),
}


@pytest.fixture(scope="module")
def grafted_default():
    """Grafting under the default processor, in float32 and float64 (the near-exact run)."""
    layout = BranchLayout(2)
    unet = tiny_unet(seed=0)
    fp32 = _run(unet, layout, ACTIVE)
    fp64 = _run(copy.deepcopy(unet).to(torch.float64), layout, ACTIVE)
    return fp32, fp64


@pytest.mark.parametrize("name", list(SETUPS))
def test_each_diffusers_processor_gets_idle_calls_exactly_and_grafting_is_unchanged(name, grafted_default):
    layout = BranchLayout(2)
    unet = _with(SETUPS[name])
    kind = type(next(iter(unet.attn_processors.values())))
    if name == "fused QKV":
        assert kind is FusedAttnProcessor2_0
    elif name == "SlicedAttnProcessor":
        assert kind is SlicedAttnProcessor
    before = dict(unet.attn_processors)
    stock = _run(unet, layout)
    idle = _run(unet, layout, IDLE, step=10)
    assert torch.equal(idle, stock)  # every call reached the layer's own processor, as diffusers made it
    grafted = _run(unet, layout, ACTIVE)
    fp32, fp64 = grafted_default
    tol = float_order_bound(fp32.numpy(), fp64.numpy())
    assert float((grafted - fp32).abs().max()) <= tol
    assert float((grafted - stock).abs().max()) > 100 * tol  # grafting did act
    assert dict(unet.attn_processors) == before  # the processors are given back


def test_a_lora_adapter_loaded_through_peft_takes_part_in_idle_and_grafted_calls(grafted_default):
    peft = pytest.importorskip("peft", reason="peft is in the test extra; LoRA loading needs it")
    layout = BranchLayout(2)
    unet = tiny_unet(seed=0)
    torch.manual_seed(5)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    stock = _run(unet, layout)
    assert torch.equal(_run(unet, layout, IDLE, step=10), stock)
    grafted = _run(unet, layout, ACTIVE)
    fp32, _ = grafted_default
    assert float((grafted - fp32).abs().max()) > 1e-3  # the adapter changed the grafted call too
    # and exactly as folding the adapter into the weights does (the same math, other float order)
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    folded = _run(merged, layout, ACTIVE)
    exact = _run(copy.deepcopy(merged).to(torch.float64), layout, ACTIVE)
    tol = float_order_bound(folded.numpy(), exact.numpy())
    assert float((grafted - folded).abs().max()) <= 4 * tol  # both sides round: LoRA's extra GEMMs


class Bare:
    """A user processor with the bare signature diffusers' own pipelines run."""

    def __init__(self):
        self.inner, self.calls = AttnProcessor2_0(), 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        self.calls += 1
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


class WithKeyword:
    """A user processor that takes a keyword of its own through ``cross_attention_kwargs``."""

    def __init__(self, log):
        self.inner, self.log = AttnProcessor2_0(), log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain=1.0):
        self.log.append(gain)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask) * gain


def test_a_user_processor_with_the_bare_signature_runs_under_grafting():
    layout = BranchLayout(2)
    unet = tiny_unet(seed=0)
    procs = {name: Bare() for name in unet.attn_processors}
    unet.set_attn_processor(procs)
    stock = _run(unet, layout)
    calls = sum(p.calls for p in procs.values())
    assert torch.equal(_run(unet, layout, IDLE, step=10), stock)
    assert sum(p.calls for p in procs.values()) == 2 * calls
    _run(unet, layout, ACTIVE)  # grafted layers run o2mag's attention, the others the user's


def test_cross_attention_kwargs_reach_the_wrapped_processor_as_without_o2mag(caplog):
    layout = BranchLayout(2)
    unet = tiny_unet(seed=0)
    log = []
    unet.set_attn_processor({name: WithKeyword(log) for name in unet.attn_processors})
    caplog.set_level(logging.WARNING)
    stock = _run(unet, layout, cross_attention_kwargs={"gain": 0.5})
    stock_log, stock_warnings = list(log), [r for r in caplog.records if "not expected" in r.getMessage()]
    log.clear()
    caplog.clear()
    idle = _run(unet, layout, IDLE, step=10, cross_attention_kwargs={"gain": 0.5})
    assert torch.equal(idle, stock)
    assert log == stock_log and set(log) == {0.5}
    assert not [r for r in caplog.records if "not expected" in r.getMessage()] and not stock_warnings


def test_a_keyword_only_the_wrapped_processor_knows_is_a_clear_error_where_grafting_is_active():
    layout = BranchLayout(2)
    unet = tiny_unet(seed=0)
    unet.set_attn_processor({name: WithKeyword([]) for name in unet.attn_processors})
    with pytest.raises(ValueError, match=r"attn[12]\.processor.*extra arguments \['gain'\]"):
        _run(unet, layout, ACTIVE, cross_attention_kwargs={"gain": 0.5})


def test_the_processors_show_the_signature_of_the_one_they_wrap():
    import inspect

    g = _graft(ACTIVE, BranchLayout(2))
    for cls in (GraftSelfAttnProcessor, GraftCrossAttnProcessor):
        for original in (AttnProcessor2_0(), SlicedAttnProcessor(1), Bare(), WithKeyword([])):
            proc = cls(g, 0, "x.processor", original)
            assert isinstance(proc, cls)
            assert inspect.signature(proc.__call__) == inspect.signature(original.__call__)


def test_attention_slicing_on_the_pipeline_then_a_call():
    """The crash of the issue: ``enable_attention_slicing()`` then ``pipe(...)``."""
    from o2mag.pipeline import O2MAGPipeline
    from o2mag.sources.sample import embedded_sample

    sample = embedded_sample()
    pipe = O2MAGPipeline.tiny(0)
    pipe.progress = False

    target = np.roll(sample.ref_mask, 40, axis=1)

    def call(p):
        return p(sample.reference, sample.ref_mask, sample.normal, [target], prompt=sample.prompt,
                 anomaly_word=sample.anomaly_word, num_inference_steps=2, ago_steps=0,
                 output_type="np").images

    plain = call(pipe)
    exact = call(copy.deepcopy(pipe).to(dtype=torch.float64))
    pipe.enable_attention_slicing(1)
    assert any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    sliced = call(pipe)
    assert np.abs(sliced - plain).max() <= float_order_bound(plain, exact)
