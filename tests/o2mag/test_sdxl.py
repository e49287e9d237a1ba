"""SDXL as a family: the tiny SDXL-shaped model (70 transformer blocks, two CLIP text encoders, the
second with projection, "text_time" added conditioning): its conditioning as diffusers'
StableDiffusionXLPipeline defines it, ``pipe(...)`` for every output type, the background blend,
grafting and DAE, the fp16 VAE upcast, and ``o2mag generate --model`` on a saved folder.

The tests run at 64 px (8x8 latents, attention at 4x4 and 2x2 tokens), 2 steps and no AGO steps
unless AGO is what they test: the 70-block UNet is several times the SD 1.5-shaped tiny's cost."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from o2mag import GraftConfig, O2MAGPipeline
from o2mag.cli import main
from o2mag.errors import InputError
from o2mag.pipeline.inputs import token_indices
from o2mag.pipeline.loading import detect_family
from o2mag.sources import tiny

from .calls import call, check_every_output_type

XL_SIZE = 64  # the conftest fixture xl_mask is at this size
STEPS = 2


def _call(pipe, sample, masks, **kw):
    """:func:`.calls.call` with this file's steps and size, no AGO."""
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("ago_steps", 0)
    kw.setdefault("size", XL_SIZE)
    return call(pipe, sample, masks, **kw)


def test_the_tiny_sdxl_model_has_sdxls_parts():
    c = tiny.tiny_sdxl_components(0)
    assert type(c["text_encoder"]).__name__ == "CLIPTextModel"
    assert type(c["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert c["unet"].config.addition_embed_type == "text_time"
    assert c["unet"].config.cross_attention_dim == (c["text_encoder"].config.hidden_size
                                                    + c["text_encoder_2"].config.hidden_size)
    # seeded: the same seed builds the same weights, and the two encoders differ
    again = tiny.tiny_sdxl_components(0)
    assert all(torch.equal(a, b) for a, b in zip(c["unet"].parameters(), again["unet"].parameters()))
    w1 = c["text_encoder"].get_input_embeddings().weight
    assert not torch.equal(w1, c["text_encoder_2"].get_input_embeddings().weight)
    with pytest.raises(ValueError, match="text_encoder_2"):
        O2MAGPipeline(**{k: v for k, v in c.items() if k != "text_encoder_2"})


def test_conditioning_is_diffusers_sdxl_definition(xl):
    prompt = "a photo of a scratch"
    states, pooled = xl._encode(prompt)
    parts, pooled_ref = [], None
    for tok, enc in ((xl.tokenizer, xl.text_encoder), (xl.tokenizer_2, xl.text_encoder_2)):
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        parts.append(out.hidden_states[-2])  # the penultimate layer, no clip skip
        pooled_ref = out.text_embeds if hasattr(out, "text_embeds") else pooled_ref
    # the same modules on the same ids: exactly equal
    assert torch.equal(states, torch.cat(parts, dim=-1)) and torch.equal(pooled, pooled_ref)
    assert torch.equal(xl.encode_prompt(prompt), states) and torch.equal(xl.encode_pooled(prompt), pooled)
    z = torch.zeros(3, 4, 8, 8)
    added = xl._added_cond(pooled.expand(3, -1), z)
    # (original size, crop top-left, target size), one row per latent row
    assert added["time_ids"].tolist() == [[XL_SIZE, XL_SIZE, 0, 0, XL_SIZE, XL_SIZE]] * 3
    assert torch.equal(added["text_embeds"], pooled.expand(3, -1))
    with pytest.raises(RuntimeError, match="pooled"):
        xl._added_cond(pooled, z)


def test_every_output_type(xl, sample, xl_mask):
    masks = [xl_mask, np.roll(xl_mask, 8, axis=1)]
    check_every_output_type(lambda **kw: _call(xl, sample, masks, **kw), masks, XL_SIZE)


def _image(sample):
    """The reference as a uint8 (XL_SIZE, XL_SIZE, 3) array."""
    return np.asarray(Image.fromarray(np.asarray(sample.reference)).convert("RGB").resize((XL_SIZE, XL_SIZE)))


def _inside(m, shape):
    return torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(m).float()[None, None], shape)[0, 0] > 0


def test_blend_keeps_the_normal_outside_and_grafting_and_dae_change_the_inside(xl, sample, xl_mask):
    grafted = _call(xl, sample, [xl_mask], output_type="latent").images
    x, normal = xl.last_run["target_latents"], xl.last_run["normal_latent"]
    inside = _inside(xl_mask, x.shape[-2:])
    assert torch.equal(x[0][:, ~inside], normal[0][:, ~inside])  # outside M_T: the normal branch, exactly
    plain = _call(xl, sample, [xl_mask], output_type="latent", graft_config=GraftConfig.disabled()).images
    assert torch.equal(plain[0][:, ~inside], grafted[0][:, ~inside])
    assert (plain[0][:, inside] - grafted[0][:, inside]).abs().max() > 1e-3  # grafting acts inside
    # DAE on the anomaly word: the same run with its gain at 1 (DAE off) differs inside M_T only
    config = GraftConfig.for_unet(xl.unet)
    assert config.dae_layers == tuple(range(70))  # every cross-attention layer of SDXL's layout
    no_dae = _call(xl, sample, [xl_mask], output_type="latent",
                   graft_config=dataclasses.replace(config, dae_gain=1.0)).images
    assert torch.equal(no_dae[0][:, ~inside], grafted[0][:, ~inside])
    assert not torch.equal(no_dae[0][:, inside], grafted[0][:, inside])


def test_the_anomaly_word_is_found_in_both_tokenizers(xl, sample, monkeypatch):
    job = xl._request(dict(_bound(xl, sample)), "latent")
    first = token_indices(xl.tokenizer, sample.prompt, sample.anomaly_word)
    assert job.tokens == first == token_indices(xl.tokenizer_2, sample.prompt, sample.anomaly_word) and first

    real = xl.tokenizer_2

    class Shifted:  # a second tokenizer that puts one more token in front of the prompt
        model_max_length = real.model_max_length

        def __call__(self, text, **kw):
            out = real(text, **kw)
            if kw.get("add_special_tokens", True):
                out["input_ids"] = out["input_ids"][:1] + out["input_ids"]
            return out

    monkeypatch.setattr(xl, "tokenizer_2", Shifted())
    with pytest.raises(InputError, match="anomaly_word.*tokenizer_2"):
        xl._request(dict(_bound(xl, sample)), "latent")


def _bound(pipe, sample):
    from o2mag.pipeline.settings import CALL, bind
    m = np.zeros((XL_SIZE, XL_SIZE), dtype=bool)
    m[8:16, 8:16] = True
    return bind(CALL, "t", (pipe, sample.reference, sample.ref_mask, sample.normal, [m]),
                dict(prompt=sample.prompt, anomaly_word=sample.anomaly_word, size=XL_SIZE))


def test_ago_optimises_the_sequence_embedding_with_the_pooled_one_fixed(xl, sample, monkeypatch):
    from o2mag.pipeline import preparation

    seen = {}
    real = preparation.optimize_conditioning

    def spy(unet, scheduler, z0, init, **kw):
        seen.update(kw, init=init)
        return real(unet, scheduler, z0, init, **kw)

    monkeypatch.setattr(preparation, "optimize_conditioning", spy)
    emb = xl.optimize_embedding(_image(sample), sample.prompt, steps=1, lr=1e-2, seed=0)
    states, pooled = xl._encode(sample.prompt)
    assert emb.shape == states.shape and not torch.equal(emb, states)
    assert torch.equal(seen["init"], states) and torch.equal(seen["added_cond_kwargs"]["text_embeds"], pooled)
    assert seen["init_pooled"] is None  # the pooled embedding is not optimised (ago_pooled, test_ago_pooled.py)
    # the family is part of the key: the same request on another family's pipeline is not this entry
    sd = O2MAGPipeline.tiny(0)
    assert xl._family_key() == "sdxl" and sd._family_key() != "sdxl"


def test_an_fp16_vae_is_upcast_where_diffusers_upcasts_it(sample):
    pipe = O2MAGPipeline.tiny(0, family="sdxl")
    image = _image(sample)
    z32 = pipe.encode_image(image)
    x32 = pipe._decode(z32)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    # the upcast VAE is the float32 one (float16 weights are the float32 weights rounded, so the
    # comparison is against a float32 VAE holding those rounded weights)
    ref = O2MAGPipeline.tiny(0, family="sdxl")
    ref.vae.load_state_dict({k: v.to(torch.float16).float() for k, v in ref.vae.state_dict().items()})
    assert torch.equal(pipe.encode_image(image), ref.encode_image(image))
    assert torch.equal(pipe._decode(z32), ref._decode(z32))
    assert pipe.vae.dtype == torch.float16  # back to float16 afterwards
    assert x32.dtype == torch.float32


def test_generate_from_a_saved_sdxl_folder(tmp_path):
    model = tmp_path / "tiny-sdxl"
    O2MAGPipeline.tiny(0, family="sdxl").save_pretrained(model)
    fam = detect_family(str(model))
    assert (fam.name, fam.label, fam.default_size) == ("sdxl", "SDXL", tiny.TINY_IMAGE_SIZE)
    loaded = O2MAGPipeline.from_pretrained(model)
    assert loaded.family == fam and type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--out", str(out), "--num", "2", "--batch-size", "2",
                 "--steps", "2", "--ago-steps", "1", "--size", str(XL_SIZE), "--quiet"]) == 0
    d = out / "synthetic_surface" / "scratch"
    assert sorted(p.name for p in (d / "image").glob("*.png")) == ["000.png", "001.png"]
    assert sorted(p.name for p in (d / "mask").glob("*.png")) == ["000.png", "001.png"]
    lines = [json.loads(s) for s in (d / "manifest.jsonl").read_text().splitlines() if s.strip()]
    assert [r["index"] for r in lines] == [0, 1] and lines[0]["settings"]["size"] == XL_SIZE
    assert Image.open(d / "image" / "000.png").size == (XL_SIZE, XL_SIZE)


def test_step_end_callbacks_get_and_replace_sdxls_added_conditioning(xl, sample, xl_mask):
    """diffusers' SDXL callback tensors: the pooled embeddings and the size ids are passed as
    named, and what a callback returns conditions the steps after it."""
    extra = ["add_text_embeds", "negative_pooled_prompt_embeds", "add_time_ids"]
    assert set(extra) <= set(xl._callback_tensor_inputs)
    seen = []

    def look(p, i, t, kwargs):
        seen.append({k: v.clone() for k, v in kwargs.items()})
        return kwargs

    plain = _call(xl, sample, [xl_mask], output_type="latent", callback_on_step_end=look,
                  callback_on_step_end_tensor_inputs=["latents"] + extra).images
    assert len(seen) == STEPS and all(set(s) == {"latents", *extra} for s in seen)
    first = seen[0]
    assert torch.equal(first["add_text_embeds"], xl.encode_pooled(sample.prompt))
    assert torch.equal(first["negative_pooled_prompt_embeds"], xl.encode_pooled(""))
    assert first["add_time_ids"].tolist() == [[XL_SIZE, XL_SIZE, 0, 0, XL_SIZE, XL_SIZE]]

    def replace(name, value):
        def callback(p, i, t, kwargs):
            return {name: value} if i == 0 else {}
        return callback

    # returning what it was given changes nothing, bit for bit
    same = _call(xl, sample, [xl_mask], output_type="latent", callback_on_step_end_tensor_inputs=extra,
                 callback_on_step_end=replace("add_time_ids", first["add_time_ids"])).images
    assert torch.equal(same, plain)
    # other size ids, or another prompt's pooled embedding, from step 1 on: the result changes
    other_ids = torch.tensor([[2 * XL_SIZE, 2 * XL_SIZE, 8, 8, XL_SIZE, XL_SIZE]], dtype=torch.float32)
    other = {"add_time_ids": other_ids, "add_text_embeds": xl.encode_pooled("a photo of a dent"),
             "negative_pooled_prompt_embeds": xl.encode_pooled("a blurry photo")}
    for name, value in other.items():
        changed = _call(xl, sample, [xl_mask], output_type="latent", callback_on_step_end=replace(name, value),
                        callback_on_step_end_tensor_inputs=extra).images
        assert (changed - plain).abs().max() > 1e-4, name
    with pytest.raises(ValueError, match="add_time_ids"):
        _call(xl, sample, [xl_mask], callback_on_step_end=replace("add_time_ids", other_ids.expand(2, -1)),
              callback_on_step_end_tensor_inputs=extra)


def test_diffusers_sdxl_cfg_cutoff_callback_runs_unchanged(xl, sample, xl_mask):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    def guidance_off(p, i, t, kwargs):
        if i == 0:
            p._guidance_scale = 0.0
        return kwargs

    off = _call(xl, sample, [xl_mask], output_type="np", guidance_scale=7.5, callback_on_step_end=guidance_off)
    # it asks for prompt_embeds, add_text_embeds and add_time_ids and keeps their last row, which
    # is each tensor itself here (one row each): exactly the run that turns guidance off at step 0
    cutoff = _call(xl, sample, [xl_mask], output_type="np", guidance_scale=7.5,
                   callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    plain = _call(xl, sample, [xl_mask], output_type="np", guidance_scale=7.5)
    assert np.array_equal(cutoff.images, off.images)
    assert np.abs(cutoff.images - plain.images).max() > 1e-4  # the cutoff took effect


def test_sd_models_refuse_sdxls_callback_tensors(sample, xl_mask):
    sd = O2MAGPipeline.tiny(0)
    assert "add_text_embeds" not in sd._callback_tensor_inputs
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        call(sd, sample, [xl_mask], callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["add_text_embeds"])
