"""The deciding GPU call (``benchmarks.kernels.decide``), checked on a CPU so that its one call on a
card is spent measuring, not debugging: every candidate it times computes the op (or, for plain
SDPA, the floor it stands for), rows reach the file as they are measured, a broken or late section
is recorded and the rest runs on, and the summary picks the fastest candidate whose error is within
the rule. No timing is asserted."""
import json

import pytest
import torch

from benchmarks.kernels import decide
from benchmarks.kernels.cases import FG_GAIN, Case, make_inputs
from o2mag_kernels import tri_source_attention
from o2mag_kernels.tools.parity import bound, max_abs_err
from o2mag_kernels.validation import validate

SMALL = Case(tokens=77, heads=2, head_dim=40, density=0.2, targets=3, dtype="fp32")


def _float64_reference(inputs):
    q, kf, vf, kb, vb, qm, fm, bm = inputs
    return tri_source_attention(q.double(), kf.double(), vf.double(), kb.double(), vb.double(),
                                qm, fm, bm, fg_gain=FG_GAIN, backend="reference")


def test_every_exact_candidate_computes_the_op_on_diffusers_strides():
    inputs = make_inputs(SMALL, "cpu", seed=3)
    exact = _float64_reference(inputs)
    problem = validate(*inputs, None, FG_GAIN, "reference")
    tol = bound(problem, inputs, exact, torch.float32)
    cands = decide.candidates(inputs)
    expected = {"sdpa_plain", "sdpa_stitch", "torch:routed", "torch:stitch", "torch:augmented"}
    assert expected <= set(cands)
    for name, fn in cands.items():
        out = fn()
        assert out.shape == exact.shape, name
        if name == "sdpa_plain":  # the floor: one unmasked call over the background source
            q, kb, vb = inputs[0], inputs[3], inputs[4]
            floor = torch.nn.functional.scaled_dot_product_attention(
                q.double(), kb.double().expand(3, -1, -1, -1), vb.double().expand(3, -1, -1, -1))
            assert max_abs_err(out, floor) <= tol
        else:
            assert max_abs_err(out, exact) <= tol, name


def test_the_kernel_candidates_cover_every_variant_and_the_unhinted_build():
    from o2mag_kernels.backends import load_triton

    module, why = load_triton()
    if module is None:
        pytest.skip(f"the triton backend is unavailable here: {why}")
    inputs = make_inputs(Case(64, 2, 40, 0.2, 2, "fp32"), "cpu", seed=4)
    cands = decide.candidates(inputs)
    names = {"triton", "triton[default]", "triton[bg_dense]", "triton[tma]", "triton[unhinted]"}
    assert names <= set(cands)
    real = module.inputs_aligned
    cands["triton[unhinted]"]()
    assert module.inputs_aligned is real  # the patch is undone after the call


def test_rows_reach_the_file_one_by_one_and_a_broken_section_does_not_stop_the_call(tmp_path):
    path = tmp_path / "card-decide.json"
    rec = decide.Recorder(str(path), budget=60)
    rec.row(sec="B", what="a", kernel_ms=1.0)
    assert json.loads(path.read_text())["rows"][0]["what"] == "a"

    def broken():
        raise RuntimeError("no such kernel")

    assert rec.guard("broken", broken, need=0) is None
    assert rec.guard("fine", lambda: 7, need=0) == 7
    rec.row(sec="B", what="b", kernel_ms=2.0)
    data = json.loads(path.read_text())
    assert [r["what"] for r in data["rows"]] == ["a", "b"]
    assert data["errors"][0]["section"] == "broken" and "no such kernel" in data["errors"][0]["error"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_section_that_needs_more_time_than_is_left_is_skipped_and_said(tmp_path):
    rec = decide.Recorder(str(tmp_path / "x.json"), budget=5)
    ran = []
    assert rec.guard("late", lambda: ran.append(1), need=30) is None
    assert not ran
    assert rec.data["errors"] == [{"section": "late", "error": "skipped: out of time"}]


def test_the_summary_picks_the_fastest_candidate_within_the_error_rule(tmp_path):
    rec = decide.Recorder(str(tmp_path / "x.json"), budget=60)
    rows = [("sdpa_plain", 1.0, None, 2.0), ("torch:stitch", 2.0, 1e-4, 3.0),
            ("triton", 1.1, 1e-4, 1.5), ("torch:augmented", 1.2, 1e-4, 1.4),
            ("broken-fast", 0.5, 0.5, 0.5)]  # fastest, but its error is far outside the rule
    for what, ms, err, stream in rows:
        rec.row(sec="B", case="L4096", what=what, kernel_ms=ms, err=err, stream_ms=stream, graph_ms=ms)
    decide.summary(rec)
    best = rec.data["summary"]["L4096"]
    assert best["fastest"] == "triton"
    assert best["x_plain_kernel"] == pytest.approx(1.1) and best["x_plain_eager"] == pytest.approx(0.75)
    assert json.loads((tmp_path / "x.json").read_text())["summary"] == rec.data["summary"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_call_says_so_and_exits_2(tmp_path, capsys):
    assert decide.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_the_generator_sections_import_where_diffusers_is_installed():
    unet_rows, ago_rows = decide._generator_sections()
    assert callable(unet_rows) and callable(ago_rows)
