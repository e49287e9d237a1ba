"""The benchmark harness itself: baselines compute the same op, reports and README update work.

Timings are not asserted here (performance claims live in benchmarks/); this checks that what the
runner times is the right computation and that its outputs are well formed.
"""
import json

import pytest
import torch

from benchmarks.kernels.cases import Case, make_inputs, runner, useful_flops
from benchmarks.kernels.suite import reference_output, run_case
from benchmarks.report import README_BEGIN, README_END, e2e_table, kernel_table, readme_section, update_readme

SMALL = Case(tokens=77, heads=2, head_dim=40, density=0.2, targets=3, dtype="fp32")


@pytest.mark.parametrize("method", ["torch", "reference", "sdpa_stitch"])
def test_baselines_compute_the_op(method):
    inputs = make_inputs(SMALL, "cpu")
    expected = reference_output(inputs)
    out = runner(method, inputs)()
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_masks_follow_the_case():
    q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm = make_inputs(SMALL, "cpu")
    assert qm.shape == (SMALL.targets, SMALL.tokens) and fgm.shape == (1, SMALL.tokens)
    frac = qm.float().mean(1)
    assert ((frac > 0.1) & (frac < 0.35)).all()  # blobs of about the case's density
    assert torch.equal(bgm, ~qm)  # normal keys inside each target's defect are excluded
    assert k_fg.shape[0] == 1 and v_bg.shape[0] == 1  # one source pair shared by the targets
    assert q.stride(-1) == 1 and not q.is_contiguous()  # diffusers' (B, L, H*D) projection views
    for t in (q, k_fg, v_fg, k_bg, v_bg):
        assert 0.8 < t.std().item() < 1.2  # seeded random normals, never zeros
    scattered = make_inputs(Case(77, 2, 40, 0.2, 3, "fp32", "scattered"), "cpu")[5]
    assert not torch.equal(scattered, qm)


def test_gpu_cases_cover_the_acceptance_matrix():
    """The GPU quick run holds every SD v1.5 layer size at N = 1, 8 and 32 with blob masks, and the
    head-dim-64 layers of SD 2.x (1024, 4096 tokens), SD 2.1 at 768 px (9216) and SDXL (32x32)."""
    from benchmarks.kernels.suite import SD15_LAYERS, cases

    quick = cases(torch.device("cuda"), quick=True)
    got = {(c.tokens, c.head_dim, c.targets) for c in quick if c.masks == "blob"}
    assert got == {(t, d, n) for t, d in SD15_LAYERS for n in (1, 8, 32)} | {
        (t, 64, 8) for t in (1024, 2304, 4096, 9216)}
    cpu = {(c.tokens, c.head_dim) for c in cases(torch.device("cpu"), quick=True)}
    assert {(1024, 64), (4096, 64)} <= cpu
    full = cases(torch.device("cuda"), quick=False)
    assert {c.masks for c in full} == {"blob", "scattered"} and {c.dtype for c in full} >= {"fp16", "bf16"}


def test_useful_flops_counts_only_needed_keys():
    inputs = make_inputs(SMALL, "cpu")
    qm, fgm, bgm = inputs[5:]
    visits = sum(int(qm[b].sum()) * int(fgm.sum()) + int((~qm[b]).sum()) * int(bgm[b].sum())
                 for b in range(SMALL.targets))
    assert useful_flops(SMALL, inputs) == 4 * SMALL.head_dim * SMALL.heads * visits


def test_run_case_reports_checked_results_and_ratios():
    rec = run_case(SMALL, torch.device("cpu"), ["torch", "reference", "sdpa_stitch", "sdpa_plain"],
                   repeats=1)
    res = rec["results"]
    for m in ("torch", "reference", "sdpa_stitch"):
        assert res[m]["ok"] and res[m]["max_err"] < 1e-4
    assert "max_err" not in res["sdpa_plain"]  # a different computation: timed, never compared
    assert res["torch"]["speedup_vs_reference"] == pytest.approx(
        res["reference"]["median_ms"] / res["torch"]["median_ms"])
    result = {"environment": {"device": "test cpu", "torch": "x", "triton": None}, "mode": "quick",
              "timestamp": "now", "kernels": {"methods": ["torch", "reference", "sdpa_stitch",
                                                          "sdpa_plain"], "cases": [rec]}}
    table = kernel_table(result)
    assert SMALL.name in table and table.count("\n") == 2


def test_readme_section_and_update(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    row = {"scheme": "per_sample", "num": 1, "seconds_per_sample": 1.0, "unet_rows_per_sample": 8.0,
           "unet_calls": 8}
    result = {"environment": {"device": "Card X", "torch": "2", "triton": "3"}, "mode": "full",
              "timestamp": "t", "e2e": {"rows": [row], "model": "tiny"}}
    (results / "card-x.json").write_text(json.dumps(result))
    # files of other measurements beside it (the kernel decision, AGO's pooled-embedding run) are
    # not performance tables: left out, not a KeyError
    (results / "card-x-decide.json").write_text(json.dumps({"device": "Card X", "rows": []}))
    (results / "card-x-ago-pooled.json").write_text(json.dumps({"environment": result["environment"]}))
    assert "per_sample | 1 | 1.000" in e2e_table(result)
    section = readme_section(results, tmp_path)
    assert "Card X" in section and "benchmarks/results/card-x.json" in section
    assert "decide" not in section and "ago-pooled" not in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    assert update_readme(readme, section)
    text = readme.read_text()
    assert "old" not in text and "Card X" in text and text.endswith("after\n")
    assert not update_readme(readme, section)  # already current
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, section)


def test_sweep_table_renders_the_committed_sweeps_verdicts():
    """Every (dtype, head dim) of a committed GPU sweep gets a row whose 'auto picks' column is
    tuning's own verdict; a sweep of another kernel version is marked stale and picks nothing."""
    from pathlib import Path

    from benchmarks.report import sweep_table
    from o2mag_kernels import tuning

    files = sorted(Path(tuning.SWEEP_DIR).glob("*.json"))
    assert files, "a committed hardware sweep is expected in o2mag_kernels/sweeps/"
    # the committed sweep's rows, taken as this kernel's (it may predate the current kernel
    # source: a stale sweep renders every verdict as "torch (stale sweep)", checked below)
    sweep = dict(json.loads(files[0].read_text()), path=str(files[0]),
                 kernel_hash=tuning.kernel_hash())
    table = sweep_table(sweep)
    rows = [ln for ln in table.splitlines() if ln.startswith("| fp") or ln.startswith("| bf")]
    keys = {(r["dtype"], r["head_dim"]) for r in sweep["results"]}
    assert len(rows) == len(keys)
    cap = tuple(sweep["capability"])
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        want = tuning.trusted(cap, cells[0], int(cells[1]), sweeps=(dict(sweep, valid=True),))[0]
        assert cells[-1] == ("triton" if want else "torch"), ln
    stale = sweep_table(dict(sweep, kernel_hash="0" * 16))
    assert "Stale" in stale and "| triton |" not in stale


def test_the_unet_call_rows_run_the_grafted_call_on_the_tiny_model():
    """What the e2e suite and the deciding GPU call time: one grafted UNet call and the stock one
    (timings not asserted, only that both ran on the batch the layout asks for)."""
    from o2mag import O2MAGPipeline
    from benchmarks.o2mag.e2e import grafted_call_inputs, unet_call_rows

    pipe = O2MAGPipeline.tiny(0)
    layout, lat, emb, t, graft = grafted_call_inputs(pipe, torch.device("cpu"), 2, backend="torch")
    assert lat.shape[0] == emb.shape[0] == layout.batch_size == 2 * (2 + 2)
    assert graft.config.backend == "torch" and graft.token_indices == (5,)
    (row,) = unet_call_rows(pipe, torch.device("cpu"), (2,), compiled=False, repeats=3, backend="torch")
    assert row["rows"] == layout.batch_size and row["backend"] == "torch"
    assert row["stock_ms"] > 0 and row["grafted_ms"] > 0
