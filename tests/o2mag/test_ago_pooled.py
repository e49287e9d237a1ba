"""AGO on SDXL with the pooled text embedding optimised too (``ago_pooled``), on the tiny SDXL-shaped
model at 64 px as in test_sdxl.py: off, everything is what it was (the pooled embedding stays the
prompt's); on, one Adam moves both tensors, the optimised pooled embedding conditions the
conditional rows only, the AGO cache keeps the two apart, SD 1.x refuses it before any model call,
the command line hands it to the pipeline and records it, and the measuring script runs."""
import io
import json
import warnings

import numpy as np
import pytest
import torch

from o2mag import O2MAGPipeline
from o2mag.cli import main
from o2mag.errors import DataWarning
from o2mag.method.ago import ago_draws, ago_loss, optimize_conditioning, optimize_embedding
from o2mag.pipeline.caches import content_key, scheduler_settings

from .test_sdxl import STEPS, XL_SIZE, _call, _image, _inside

PROMPT = "a photo of a scratch on a brushed metal surface"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _ago_inputs(xl, sample):
    """(latent, sequence embedding, pooled embedding, added_cond_kwargs) of the sample's reference."""
    z0 = xl.encode_image(_image(sample))
    init, pooled = xl._encode(PROMPT)
    return z0, init, pooled, xl._added_cond(pooled, z0)


def test_without_init_pooled_it_is_the_sequence_only_run(xl, sample):
    z0, init, pooled, added = _ago_inputs(xl, sample)

    def gen():
        return torch.Generator().manual_seed(3)

    seq, none = optimize_conditioning(xl.unet, xl.scheduler, z0, init, steps=2, lr=1e-2, generator=gen(),
                                      progress=False, added_cond_kwargs=added)
    # one loop: exactly the same computation, so exactly the same numbers
    assert none is None
    assert torch.equal(seq, optimize_embedding(xl.unet, xl.scheduler, z0, init, steps=2, lr=1e-2, generator=gen(),
                                               progress=False, added_cond_kwargs=added))
    assert torch.equal(added["text_embeds"], pooled)  # never written to


def test_the_pooled_embedding_gets_gradients_and_moves_by_adams_first_step(xl, sample):
    z0, init, pooled, added = _ago_inputs(xl, sample)
    lr = 1e-3
    kw = dict(steps=1, lr=lr, progress=False, added_cond_kwargs=added)
    seq_only, _ = optimize_conditioning(xl.unet, xl.scheduler, z0, init, generator=torch.Generator().manual_seed(0),
                                        **kw)
    seq, out = optimize_conditioning(xl.unet, xl.scheduler, z0, init, init_pooled=pooled,
                                     generator=torch.Generator().manual_seed(0), **kw)
    assert out.shape == pooled.shape and out.dtype == torch.float32
    # Adam's first step moves every element by lr * |g| / (|g| + eps) <= lr: by about lr where the
    # gradient is not ~0, so a pooled embedding that got no gradient would not have moved at all
    step = (out - pooled).abs()
    assert step.max() <= lr * (1 + 1e-3) and (step > 0.5 * lr).float().mean() > 0.5
    # the first step's draw and the pooled value it sees are the same in both runs, and Adam steps
    # each tensor on its own gradient: the sequence embedding's first step is the sequence-only one
    assert torch.equal(seq, seq_only)
    # later steps see the moved pooled embedding: the two runs part (the pooled one took effect)
    more = dict(kw, steps=3)
    a, _ = optimize_conditioning(xl.unet, xl.scheduler, z0, init, generator=torch.Generator().manual_seed(0), **more)
    b, _ = optimize_conditioning(xl.unet, xl.scheduler, z0, init, init_pooled=pooled,
                                 generator=torch.Generator().manual_seed(0), **more)
    assert not torch.equal(a, b)


def test_init_pooled_needs_an_sdxl_unets_added_conditioning(xl, sample):
    z0, init, pooled, added = _ago_inputs(xl, sample)
    with pytest.raises(ValueError, match="init_pooled needs added_cond_kwargs"):
        optimize_conditioning(xl.unet, xl.scheduler, z0, init, init_pooled=pooled, steps=1, progress=False)
    with pytest.raises(ValueError, match="init_pooled has shape"):
        optimize_conditioning(xl.unet, xl.scheduler, z0, init, init_pooled=pooled[:, :-1], steps=1,
                              progress=False, added_cond_kwargs=added)


def test_held_out_draws_are_fixed_and_the_loss_sees_the_pooled_embedding(xl, sample):
    """The measuring script's held-out loss: the same generator seed gives the same draws, the
    prompt's pooled embedding given explicitly is the call without it, another one changes it."""
    z0, init, pooled, added = _ago_inputs(xl, sample)
    draws = ago_draws(xl.scheduler, z0, 2, torch.Generator().manual_seed(5))
    again = ago_draws(xl.scheduler, z0, 2, torch.Generator().manual_seed(5))
    assert [t for t, _ in draws] == [t for t, _ in again] and all(torch.equal(a[1], b[1]) for a, b in zip(draws, again))
    base = ago_loss(xl.unet, xl.scheduler, z0, init, draws, added_cond_kwargs=added)
    # the prompt's pooled embedding given explicitly is the same call
    assert ago_loss(xl.unet, xl.scheduler, z0, init, draws, added_cond_kwargs=added, pooled=pooled) == base
    assert ago_loss(xl.unet, xl.scheduler, z0, init, draws, added_cond_kwargs=added, pooled=pooled * 2) != base
    with pytest.raises(ValueError, match="draws"):
        ago_loss(xl.unet, xl.scheduler, z0, init, [], added_cond_kwargs=added)


def _rows_seen(pipe):
    """Every UNet call's (rows, text_embeds) during a run (a forward pre-hook with kwargs)."""
    seen = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append(added.get("text_embeds").detach().float().clone())

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("on", [False, True])
def test_the_conditional_rows_get_the_optimised_pooled_embedding(xl, sample, xl_mask, on):
    steps = 2
    results = []
    real = xl.optimize_conditioning

    def keep(*a, **k):  # the AGO result the run used
        results.append(real(*a, **k))
        return results[-1]

    seen, handle = _rows_seen(xl)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(xl, "optimize_conditioning", keep)
            _call(xl, sample, [xl_mask], output_type="latent", ago_steps=steps, ago_lr=1e-2, ago_pooled=on)
    finally:
        handle.remove()
    layout = xl.last_run["layout"]
    calls = [e for e in seen if e.shape[0] == layout.batch_size]  # denoising (AGO, inversions: 1 row)
    assert len(calls) == STEPS and len(results) == 1
    seq, pooled_c = results[0]
    prompt_pooled, empty_pooled = xl.encode_pooled(sample.prompt), xl.encode_pooled("")
    half = layout.rows_per_half
    want_c = pooled_c if on else prompt_pooled
    for rows in calls:
        assert torch.equal(rows[:half], empty_pooled.expand(half, -1))  # the unconditional: the empty prompt's
        assert torch.equal(rows[half:], want_c.expand(half, -1))
    if on:
        assert not torch.equal(pooled_c, prompt_pooled)
    else:
        assert pooled_c is None


def test_off_is_todays_run_and_on_changes_the_inside_only(xl, sample, xl_mask):
    kw = dict(output_type="latent", ago_steps=2, ago_lr=1e-2)
    plain = _call(xl, sample, [xl_mask], **kw).images  # the keyword not given: as before it existed
    off = _call(xl, sample, [xl_mask], ago_pooled=False, **kw).images
    assert torch.equal(off, plain)
    on = _call(xl, sample, [xl_mask], ago_pooled=True, **kw).images
    inside = _inside(xl_mask, on.shape[-2:])
    assert torch.equal(on[0][:, ~inside], plain[0][:, ~inside])  # the blend: the normal branch outside
    assert not torch.equal(on[0][:, inside], plain[0][:, inside])


def test_the_cache_keeps_the_variants_apart_and_recomputes_an_entry_without_pooled(sample, tmp_path):
    from o2mag.files import read_checked, write_checked

    image = _image(sample)
    p = O2MAGPipeline.tiny(0, family="sdxl")
    p.progress = False
    p.cache_dir = str(tmp_path)
    seq, none = p.optimize_conditioning(image, PROMPT, steps=1, seed=0)
    # the key of a run without ago_pooled is the one it always was: caches written before stay valid
    old_key = content_key("ago", image, PROMPT, p._family_key(), p._identity(), 1, 3e-3, 0, str(p.unet.dtype),
                          None, scheduler_settings(p.scheduler))
    assert [f.stem for f in (tmp_path / "embeddings").glob("*.pt")] == [old_key]
    seq_p, pooled = p.optimize_conditioning(image, PROMPT, steps=1, seed=0, pooled=True)
    files = {f.stem for f in (tmp_path / "embeddings").glob("*.pt")}
    assert p.stats.ago_runs == 2 and len(files) == 2 and none is None and pooled is not None
    new = tmp_path / "embeddings" / f"{(files - {old_key}).pop()}.pt"
    def record(path):
        return torch.load(io.BytesIO(read_checked(str(path))))

    assert torch.equal(record(new)["pooled"], pooled) and torch.equal(record(new)["embedding"], seq_p)
    assert "pooled" not in record(tmp_path / "embeddings" / f"{old_key}.pt")
    # an entry under the pooled key without a pooled tensor (intact file, wrong record): not used
    buf = io.BytesIO()
    torch.save({k: v for k, v in record(new).items() if k != "pooled"}, buf)
    write_checked(str(new), buf.getbuffer())
    q = O2MAGPipeline.tiny(0, family="sdxl")
    q.progress = False
    q.cache_dir = str(tmp_path)
    with pytest.warns(DataWarning, match="damaged"):
        again, pooled_again = q.optimize_conditioning(image, PROMPT, steps=1, seed=0, pooled=True)
    assert q.stats.ago_runs == 1 and pooled_again is not None
    assert torch.equal(record(new)["pooled"], pooled_again)  # replaced
    # and the entries that are right are used as they are
    r = O2MAGPipeline.tiny(0, family="sdxl")
    r.progress = False
    r.cache_dir = str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        r.optimize_conditioning(image, PROMPT, steps=1, seed=0, pooled=True)
        r.optimize_conditioning(image, PROMPT, steps=1, seed=0)
    assert r.stats.ago_runs == 0 and r.stats.ago_cache_hits == 2


def test_sd_refuses_ago_pooled_before_any_model_call(sample, xl_mask):
    sd = O2MAGPipeline.tiny(0)
    sd.set_progress_bar_config(disable=True)
    calls = []
    sd.unet.register_forward_pre_hook(lambda *a: calls.append("unet"))
    sd.text_encoder.register_forward_pre_hook(lambda *a: calls.append("text_encoder"))
    sd.vae.encoder.register_forward_pre_hook(lambda *a: calls.append("vae"))
    args = (sample.reference, sample.ref_mask, sample.normal, [np.ones((8, 8), bool)])
    kw = dict(prompt=sample.prompt, anomaly_word=sample.anomaly_word, num_inference_steps=2, ago_steps=1,
              ago_pooled=True)
    with pytest.raises(ValueError, match="ago_pooled needs an SDXL model"):
        sd(*args, **kw)
    with pytest.raises(ValueError, match="ago_pooled"):
        sd.generate_iter(*args, **kw)
    with pytest.raises(ValueError, match="ago_pooled"):
        sd.check_inputs(sample.prompt, "scratch", 2, 7.5, 0.0, None, "pil", None, ["latents"], ago_pooled=True)
    with pytest.raises(ValueError, match="ago_pooled"):
        sd.optimize_conditioning(_image(sample), sample.prompt, steps=1, pooled=True)
    assert calls == []


def test_the_command_line_flag_reaches_the_pipeline_and_the_manifest(tmp_path, capsys, monkeypatch):
    seen = []
    real = O2MAGPipeline.generate_iter

    def spy(self, *a, **k):
        seen.append(k["ago_pooled"])
        return real(self, *a, **k)

    monkeypatch.setattr(O2MAGPipeline, "generate_iter", spy)
    out = tmp_path / "out"
    fast = ["generate", "--out", str(out), "--num", "1", "--steps", "2", "--ago-steps", "1", "--quiet",
            "--size", str(XL_SIZE)]
    # SD 1.x (the embedded default): refused before the model loads, naming the option
    assert main(fast + ["--ago-pooled"]) == 2
    err = capsys.readouterr().err
    assert "--ago-pooled needs an SDXL model" in err and "Traceback" not in err and not out.exists()
    assert main(fast + ["--family", "sdxl", "--ago-pooled"]) == 0
    assert seen == [True]
    d = out / "synthetic_surface" / "scratch"
    line = json.loads((d / "manifest.jsonl").read_text().splitlines()[0])
    assert line["settings"]["ago_pooled"] is True
    # a resume without --ago-pooled is a run with other settings: refused, nothing written
    assert main(fast + ["--family", "sdxl", "--num", "2"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "ago_pooled" in err
    assert len((d / "manifest.jsonl").read_text().splitlines()) == 1


def test_an_sd_model_folder_refuses_ago_pooled_before_it_loads(tmp_path, capsys, monkeypatch):
    # --model: the family is read from the folder's configs, so a model that cannot take
    # --ago-pooled is refused before its weights load (as the embedded SD 1.x model is)
    model = tmp_path / "sd1"
    O2MAGPipeline.tiny(0).save_pretrained(model)
    loads = []
    monkeypatch.setattr(O2MAGPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model), "--out", str(out), "--num", "1", "--steps", "2",
            "--ago-steps", "1", "--quiet", "--size", str(XL_SIZE), "--ago-pooled"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--ago-pooled needs an SDXL model" in err and "Traceback" not in err
    assert loads == [] and not out.exists()


def test_the_measuring_script_runs_and_writes_its_json(tmp_path):
    from benchmarks.o2mag import ago_pooled

    assert ago_pooled.main(["--steps", "2", "--seeds", "0", "--heldout", "2", "--denoise-steps", "2",
                            "--results-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-ago-pooled.json")
    result = json.loads(path.read_text())
    row = result["seeds"][0]
    assert result["tiny_random_model"] is True and result["ago_steps"] == 2 and row["seed"] == 0
    assert set(row["heldout_loss"]) == {"initial", "sequence", "sequence_pooled"}
    assert all(np.isfinite(v) and v > 0 for v in row["heldout_loss"].values())
    assert row["relative_change"]["sequence_pooled"]["pooled"] > 0
    # the blend: outside M_T both variants are the normal branch's latent, exactly
    assert row["latents_mean_abs_diff"]["outside"] == 0.0 and row["latents_mean_abs_diff"]["outside_max"] == 0.0
    assert row["latents_mean_abs_diff"]["inside"] > 0
    assert all(v > 0 for v in row["seconds_per_step"].values())
    assert result["environment"]["device"]
