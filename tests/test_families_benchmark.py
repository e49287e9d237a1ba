"""The per-family benchmark (``python -m benchmarks.o2mag.families``), checked on a CPU so that its
one call on a card is spent measuring: it runs every section on the tiny SD 2.x and SDXL models and
writes well-formed rows, the full-shape builders give the published checkpoints' shapes (built on
the ``meta`` device: nothing is allocated), the time budget skips families not yet started, and the
report renders the table. No timing is asserted beyond being positive."""
import json

import pytest
import torch

from benchmarks.kernels.decide import Recorder
from benchmarks.measure import slug
from benchmarks.o2mag.e2e import added_cond_inputs
from benchmarks.o2mag import families
from benchmarks.report import families_table, readme_section
from o2mag import GraftConfig
from o2mag.graft.unet_layers import transformer_layers

SECTIONS = ("model", "generate", "ago", "unet call", "txt2img")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """One run of the command on the tiny SD 2.x (epsilon) and SDXL models, smallest settings."""
    out = tmp_path_factory.mktemp("results")
    code = families.main(["--family", "sd2", "sdxl", "--num", "1", "--steps", "2", "--size", "64",
                          "--device", "cpu", "--results-dir", str(out), "--no-plot"])
    assert code == 0
    (path,) = out.glob("*-families.json")
    return out, path, json.loads(path.read_text())


def test_every_section_of_each_family_lands_as_a_row(tiny_run):
    _, path, data = tiny_run
    assert path.name == f"{slug(data['environment']['device'])}-families.json"
    assert data["done"] and data["errors"] == [] and data["skipped"] == []
    assert data["environment"]["device_type"] == "cpu" and "tiny" in data["model"] and "not a" in data["note"]
    assert data["settings"]["families"] == ["sd2", "sdxl"]
    rows = {(r["family"], r["what"]): r for r in data["rows"]}
    assert set(rows) == {(f, s) for f in ("sd2", "sdxl") for s in SECTIONS}
    for name, blocks in (("sd2", 16), ("sdxl", 70)):
        model = rows[name, "model"]
        unet = families.tiny_pipeline(name).unet
        assert model["blocks"] == blocks == len(transformer_layers(unet))
        assert model["triag_layers"] == list(GraftConfig.for_unet(unet).graft_layers)
        assert model["size"] == 64 and model["weights_gib"] is None and "tiny" in model["model"]
        gen = rows[name, "generate"]
        assert gen["num"] == gen["batch_size"] == 1 and gen["steps"] == 2
        assert gen["seconds"] > 0 and gen["seconds_per_sample"] > 0 and gen["peak_gib"] is None
        # one batch of one target: (reference, normal, target) x CFG over 2 steps, plus the two
        # inversions (2 steps each, one row): counted by the pipeline, not by the benchmark
        assert gen["unet_rows_per_sample"] == 2 * 2 * 3 + 2 * 2 and gen["unet_calls"] == 2 + 2 * 2
        ago = rows[name, "ago"]
        assert ago["s_per_step"] > 0 and ago["s_for_500"] == pytest.approx(500 * ago["s_per_step"])
        assert ago["peak_gib"] is None and ago["overflowed"] is False
        call = rows[name, "unet call"]
        assert call["rows"] == 2 * (2 + 1) and call["stock_ms"] > 0 and call["grafted_ms"] > 0
        t2i = rows[name, "txt2img"]
        assert t2i["seconds_per_image"] > 0 and t2i["peak_gib"] is None
        xl = name == "sdxl"
        assert t2i["pipeline"] == ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    assert rows["sd2", "model"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("name, blocks, triag, size, prediction", [
    ("sd1", 16, tuple(range(9, 16)), 512, "epsilon"),
    ("sd2-768", 16, tuple(range(9, 16)), 768, "v_prediction"),
    ("sd2", 16, tuple(range(9, 16)), 512, "epsilon"),
    ("sdxl", 70, tuple(range(54, 70)), 1024, "epsilon"),
])
def test_the_full_shape_builders_give_the_published_models_without_allocating_them(
        name, blocks, triag, size, prediction):
    pipe = families.full_pipeline(name, "meta")
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    assert all(p.is_meta for p in params) and pipe.unet.dtype == torch.float16
    assert len(transformer_layers(pipe.unet)) == blocks
    assert GraftConfig.for_unet(pipe.unet).graft_layers == triag
    assert pipe.default_size == size and pipe.scheduler.config.prediction_type == prediction
    assert pipe.is_xl == (name == "sdxl")
    # the parameter counts of the published checkpoints' components (UNet; VAE; text encoders
    # without their token embedding, whose vocabulary is the tiny tokenizer's here)
    unet = {"sd1": 859_520_964, "sd2-768": 865_910_724, "sd2": 865_910_724, "sdxl": 2_567_463_684}[name]
    assert sum(p.numel() for p in pipe.unet.parameters()) == unet
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863

    def without_vocab(encoder, published, width):
        own = sum(p.numel() for p in encoder.parameters())
        return own - encoder.config.vocab_size * width == published - 49408 * width

    if name in ("sd1", "sdxl"):
        assert without_vocab(pipe.text_encoder, 123_060_480, 768)  # CLIP ViT-L/14
    if name == "sdxl":
        assert without_vocab(pipe.text_encoder_2, 694_659_840, 1280)  # OpenCLIP-bigG with projection
        assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    elif name != "sd1":
        assert without_vocab(pipe.text_encoder, 340_387_840, 1024)  # OpenCLIP-H
        assert pipe.unet.config.upcast_attention == (name == "sd2-768")
    # the UNet's forward at the working size on what the encoders give it (shapes only, on meta):
    # the text states' width (SDXL: both encoders') and SDXL's pooled embedding + six size ids
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    width = sum(e(ids, output_hidden_states=True).hidden_states[-2].shape[-1]
                for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None)
    rows, side = 2 * (2 + 8), size // 8
    lat = torch.empty(rows, 4, side, side, device="meta", dtype=torch.float16)
    states = torch.empty(rows, 77, width, device="meta", dtype=torch.float16)
    out = pipe.unet(lat, torch.tensor(500, device="meta"), encoder_hidden_states=states,
                    added_cond_kwargs=added_cond_inputs(pipe, rows, "meta")).sample
    assert out.shape == lat.shape


def test_families_not_started_when_the_budget_is_spent_are_skipped(tmp_path, one_thread):
    path = tmp_path / "x-families.json"
    rec = Recorder(str(path), budget=3600)
    rec.data = {"environment": {"device": "cpu", "torch": "x"}, "mode": "families", "timestamp": "t",
                "settings": {"families": ["sd2", "sdxl"], "num": 1, "steps": 2}, "rows": [],
                "errors": [], "skipped": [], "done": False}
    left = iter([1.0])  # time is left when the first family starts, none afterwards
    rec.left = lambda: next(left, 0.0)
    families.run_families(rec, ["sd2", "sdxl"], torch.device("cpu"), num=1, steps=2, ago_steps=1,
                          repeats=1, size=64)
    data = json.loads(path.read_text())
    assert {r["family"] for r in data["rows"]} == {"sd2"}
    assert {r["what"] for r in data["rows"]} == set(SECTIONS)  # a started family finishes
    assert [s["family"] for s in data["skipped"]] == ["sdxl"] and "out of time" in data["skipped"][0]["why"]
    table = families_table(data)
    assert "| sdxl | skipped: out of time" in table and "| sd2 |" in table


def test_bad_settings_are_refused_before_any_model_work(tmp_path, capsys):
    for argv in (["--num", "0"], ["--steps", "1"], ["--seconds", "0"], ["--size", "60"],
                 ["--family", "sd3"]):
        with pytest.raises(SystemExit) as err:
            families.main(argv + ["--results-dir", str(tmp_path / "r")])
        assert err.value.code == 2
        assert argv[0] in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_report_renders_the_families_table(tiny_run):
    out, path, data = tiny_run
    table = families_table(data)
    lines = [ln for ln in table.splitlines() if ln.startswith("| sd")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["sd2", "sdxl"]
    sdxl = [c.strip() for c in lines[1].strip("|").split("|")]
    assert sdxl[2:5] == ["64", "70", "54-69"] and "tiny" in sdxl[1]
    assert sdxl[6] == "—"  # no GPU memory on a CPU
    gen = next(r for r in data["rows"] if r["family"] == "sdxl" and r["what"] == "generate")
    assert sdxl[5] == f"{gen['seconds_per_sample']:.3f}"
    broken = dict(data, errors=[{"section": "sdxl txt2img", "error": "boom"}],
                  rows=[r for r in data["rows"] if not (r["family"] == "sdxl" and r["what"] == "txt2img")])
    row = [ln for ln in families_table(broken).splitlines() if ln.startswith("| sdxl")][0]
    assert row.startswith("| sdxl (errors) |") and row.rstrip(" |").endswith("—")
    assert families_table({"mode": "quick", "e2e": {}}) == ""
    section = readme_section(out, out.parent)
    assert table in section and path.name in section


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_the_unet_call_grafts_the_layers_the_pipeline_grafts(name):
    """The 'unet call' row times TriAG on the layers generation uses, GraftConfig.for_unet's
    (on SDXL 54-69, not the SD 1.x indices 9-15 of GraftConfig.paper())."""
    from benchmarks.o2mag.e2e import grafted_call_inputs

    pipe = families.tiny_pipeline(name)
    graft = grafted_call_inputs(pipe, torch.device("cpu"), 1, backend="torch")[4]
    want = GraftConfig.for_unet(pipe.unet, backend="torch")
    assert graft.config.graft_layers == want.graft_layers
    assert graft.config.dae_layers == want.dae_layers and graft.config.qgraft_layers == want.qgraft_layers
