"""Which configs may run where: the AOT report and committed hardware sweeps (no GPU needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from o2mag_kernels.backends import triton_kernel as K
from o2mag_kernels import tuning
from o2mag_kernels.tools import aot


def test_no_dot_narrower_than_64_for_any_head_dim():
    """The Hopper miscompile class needs a dot of width <= 32: every head dim up to 256 is padded
    to pieces of at least 64 (and covers the head dim)."""
    for d in range(1, K.MAX_HEAD_DIM + 1):
        d0, d1 = K.split_head_dim(d)
        assert d0 >= 64 and (d1 == 0 or d1 >= 64) and d0 + d1 >= d, d
        assert d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0
    assert [K.split_head_dim(d) for d in (40, 64, 80, 160, 256)] == [
        (64, 0), (64, 0), (128, 0), (128, 64), (256, 0)]
    assert all(bm >= 64 and bn in K.TILE_SIZES for bm, bn, _, _ in K.CONFIGS)
    assert K.chunking(64, 4) == (0, 0) and K.chunking(65, 4) == (64, 64) and K.chunking(256, 2) == (0, 0)


def test_min_dot_is_read_from_ttgir():
    sm90 = ('%s = ttng.warp_group_dot %q, %k, %c {inputPrecision = 0 : i32, isAsync = true} : '
            '!ttg.memdesc<64x128xf16, #shared, #smem> * !ttg.memdesc<128x64xf16, #shared1> -> t')
    sm80 = ('%a = tt.dot %p, %v, %c, inputPrecision = tf32 : tensor<64x64xf16, #x> * '
            'tensor<64x32xf16, #y> -> tensor<64x32xf32, #mma>')
    assert aot.min_dot_dim(sm90) == 64 and aot.min_dot_dim(sm80) == 32
    assert aot.min_dot_dim(sm90 + "\n" + sm80) == 32 and aot.min_dot_dim("no dots") is None


def _fake(**kw):
    r = dict(arch=90, dtype="fp16", head_dim=64, config=[128, 64, 8, 3], ok=True, error="",
             regs=168, stack=0, static_smem=0, dyn_smem=50000, local=0, wgmma=True, mma=False,
             min_dot=64)
    r.update(kw)
    return r


def test_judge_rules():
    assert tuning.judge(_fake()) == ""
    assert tuning.judge(_fake(stack=tuning.SPILL_TOLERANCE)) == ""  # a few registers' worth is tolerated
    assert "spill" in tuning.judge(_fake(stack=tuning.SPILL_TOLERANCE + 8))
    assert "spill" in tuning.judge(_fake(local=200))
    assert tuning.judge(_fake(dtype="fp32", stack=4000)) == ""  # fp32 spills are reported, not failed
    assert "Hopper" in tuning.judge(_fake(min_dot=32)) and "Hopper" in tuning.judge(_fake(min_dot=None))
    assert "wgmma" in tuning.judge(_fake(wgmma=False, mma=True))
    assert "shared memory" in tuning.judge(_fake(arch=80, wgmma=False, mma=True, dyn_smem=200000))
    assert "mma" in tuning.judge(_fake(arch=80, wgmma=False, mma=False))
    assert "boom" in tuning.judge(_fake(ok=False, error="boom"))
    # a tma build must use the TMA on sm_90; load counts are reported, not judged
    assert "TMA" in tuning.judge(_fake(variant="tma", cp_async_bulk=0))
    assert tuning.judge(_fake(variant="tma", cp_async_bulk=4)) == ""
    assert tuning.judge(_fake(arch=80, wgmma=False, mma=True, variant="tma")) == ""
    assert tuning.judge(_fake(ld_global_b16=224, cp_async=0)) == ""


def test_the_committed_aot_report_belongs_to_this_kernel():
    """aot_report.json must be rewritten (``o2mag-kernels aot-check --write-report``) whenever the
    kernel's source or configs change: the tables of what may run come from it."""
    assert tuning.aot_status() == "", tuning.aot_status()
    with open(tuning.AOT_REPORT) as f:
        report = json.load(f)
    variants = {aot.variant_key(r) for r in report["results"]}
    want = {aot.variant_key(v) for v in aot.variants([80, 90])}
    assert variants == want
    for arch in (80, 90):  # every SD head dim keeps something to run, fp16/bf16 and fp32
        for d in (40, 64, 80, 160):
            for dt in ("fp16", "bf16", "fp32"):
                assert tuning.spill_free(d, dt, arch), (arch, d, dt)
    for d in (40, 64, 80, 160):  # and every variant a card can choose, on Hopper
        for v in K.VARIANTS:
            assert tuning.spill_free(d, "fp16", 90, variant=v.name), (d, v.name)


def test_allowed_configs_load_16_bytes_at_a_time_at_diffusers_strides():
    """Issue 16: at diffusers' (B, L, H·D) strides the kernel once compiled to 2-byte scalar loads
    of q, K and V with no cp.async (head dim 40's per-head offset is not 16-divisible). Every
    config the committed report allows on sm_90 for fp16/bf16 at SD's head dims, in every
    variant, must load them with vector loads (and async copies where it pipelines): no 2-byte
    element load at all."""
    with open(tuning.AOT_REPORT) as f:
        rows = json.load(f)["results"]
    seen = 0
    for v in K.VARIANTS:
        for d in (40, 64, 80, 160):
            allowed = set(tuning.spill_free(d, "fp16", 90, variant=v.name))
            for r in rows:
                if (r["arch"], r["head_dim"], r.get("strides"), r.get("variant")) == \
                        (90, d, "diffusers", v.name) and r["dtype"] in ("fp16", "bf16") \
                        and tuple(r["config"]) in allowed:
                    seen += 1
                    assert r["ld_global_b16"] == 0, (v.name, d, r["config"], r["ld_global_b16"])
                    if r["config"][3] > 1:  # one stage: no pipeline, plain (vector) loads
                        assert r["cp_async"] > 0, (v.name, d, r["config"])
                    assert r["aligned"], (v.name, d, r["config"])
    assert seen >= 12


def test_a_config_must_compile_clean_at_every_stride_specialisation(tmp_path):
    """tuning allows a config only when every stride specialisation compiled for it is clean:
    a build that spills at diffusers' strides must not run on such inputs, even if its contiguous
    build is clean; another variant's rows do not gate the default's."""
    a, b = K.CONFIGS[0], K.CONFIGS[1]
    rows = [_fake(config=list(a), strides="contiguous"), _fake(config=list(a), strides="diffusers"),
            _fake(config=list(b), strides="contiguous"),
            _fake(config=list(b), strides="diffusers", stack=tuning.SPILL_TOLERANCE + 64),
            _fake(config=list(b), strides="diffusers", variant="bg_dense")]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"kernel_hash": tuning.kernel_hash(), "results": rows}))
    table = tuning.aot_table(str(path))
    assert table[(90, "half", 64, "default")] == (a,)
    assert table[(90, "half", 64, "bg_dense")] == (b,)
    path.write_text(json.dumps({"kernel_hash": "0" * 16, "results": rows}))
    tuning.aot_table.cache_clear()
    assert table != tuning.aot_table(str(path))  # a stale report: everything, unchecked
    tuning.aot_table.cache_clear()


def _sweep(cap=(9, 0), results=(), **kw):
    data = {"device": "Fake GPU", "capability": list(cap), "kernel_hash": tuning.kernel_hash(),
            "interpreted": False, "results": list(results), "path": "x.json"}
    data.update(kw)
    data["valid"] = data["kernel_hash"] == tuning.kernel_hash() and not data["interpreted"]
    return data


def _rows(dtype, d, cfg, status="ok", ms=None, cases=("a", "b")):
    out = []
    for c in cases:
        r = {"dtype": dtype, "head_dim": d, "config": list(cfg), "case": c, "status": status}
        if ms is not None and c == cases[0]:
            r["ms"] = ms
        out.append(r)
    return out


def test_sweeps_decide_what_runs_and_whether_auto_picks_it(monkeypatch):
    monkeypatch.delenv("O2MAG_TRITON", raising=False)
    clean = tuning.spill_free(40, "fp16", 90)
    assert len(clean) >= 3
    a, b, c = clean[:3]
    # no sweep: compiled-clean configs, unproven, auto does not pick the kernel
    assert tuning.proven(40, "fp16", 90, sweeps=()) is None
    assert tuning.allowed_configs(40, "fp16", 90, sweeps=()) == clean
    assert not tuning.trusted((9, 0), "fp16", sweeps=())[0]
    # an H100 sweep: a crashed config is out, the rest ordered by measured time, auto picks it
    rows = _rows("fp16", 40, a, ms=2.0) + _rows("fp16", 40, b, ms=1.0) + _rows("fp16", 40, c, "crash")
    h100 = _sweep(results=rows)
    assert tuning.proven(40, "fp16", 90, sweeps=(h100,)) == [b, a]
    assert tuning.prune(40, 4096, 4096, "fp16", 90, sweeps=(h100,)) == [b, a]
    ok, why = tuning.trusted((9, 0), "fp16", sweeps=(h100,))
    assert ok and "sm_9x" in why
    assert not tuning.trusted((9, 0), "bf16", sweeps=(h100,))[0]  # bf16 was not swept
    # another family (an A100) gets what passed everywhere, but auto waits for its own sweep
    assert tuning.allowed_configs(40, "fp16", 80, sweeps=(h100,)) == [
        x for x in [b, a] if x in tuning.spill_free(40, "fp16", 80)]
    assert not tuning.trusted((8, 0), "fp16", sweeps=(h100,))[0]
    # a stale sweep (other kernel source) and an interpreter sweep prove nothing
    for bad in (_sweep(results=rows, kernel_hash="0" * 16), _sweep(results=rows, interpreted=True)):
        assert tuning.proven(40, "fp16", 90, sweeps=(bad,)) is None
        assert not tuning.trusted((9, 0), "fp16", sweeps=(bad,))[0]
    # per head dim: a bucket the sweep did not reach (cut short) or where every config failed
    # stays on the torch backend, and an explicit triton call there says why
    ok, why = tuning.trusted((9, 0), "fp16", 40, sweeps=(h100,))  # proven, but not timed vs torch
    assert not ok and "did not time" in why
    assert tuning.proven(80, "fp16", 90, sweeps=(h100,)) is None
    ok, why = tuning.trusted((9, 0), "fp16", 80, sweeps=(h100,))
    assert not ok and "did not reach head dim 80" in why
    failed = _sweep(results=rows + _rows("fp16", 80, tuning.spill_free(80, "fp16", 90)[0], "wrong"))
    assert tuning.proven(80, "fp16", 90, sweeps=(failed,)) == []
    ok, why = tuning.trusted((9, 0), "fp16", 80, sweeps=(failed,))
    assert not ok and "head dim 80" in why
    with pytest.raises(RuntimeError, match="head dim 80"):
        tuning.prune(80, 1024, 1024, "fp16", 90, sweeps=(failed,))
    # the sweep's torch-backend baseline: auto takes the kernel only where it measured faster
    fast = {"dtype": "fp16", "head_dim": 40, "baseline": "torch", "case": "timed-sd",
            "status": "ok", "ms": 1.5}
    assert tuning.trusted((9, 0), "fp16", 40, sweeps=(_sweep(results=rows + [fast]),))[0]
    ok, why = tuning.trusted((9, 0), "fp16", 40, sweeps=(_sweep(results=rows + [fast]),))
    assert ok and "1.50x the torch backend" in why
    slow = dict(fast, ms=0.9)  # torch 0.9 ms beats the kernel's best, 1.0 ms
    ok, why = tuning.trusted((9, 0), "fp16", 40, sweeps=(_sweep(results=rows + [slow]),))
    assert not ok and "torch backend measured faster" in why and "0.900" in why
    # head dims 40 and 64 share a bucket but are timed on different layers: never mixed
    # (at 64 the order is the reverse of 40's: a is faster there)
    d64 = _rows("fp16", 64, a, ms=0.05) + _rows("fp16", 64, b, ms=0.06) + [dict(fast, head_dim=64, ms=0.2)]
    mixed = _sweep(results=rows + [slow] + d64)
    assert not tuning.trusted((9, 0), "fp16", 40, sweeps=(mixed,))[0]  # 40: torch 0.9 < 1.0
    ok, why = tuning.trusted((9, 0), "fp16", 64, sweeps=(mixed,))  # 64: kernel 0.05 < torch 0.2
    assert ok and "4.00x" in why
    assert tuning.proven(64, "fp16", 90, sweeps=(mixed,)) == [a, b]  # ordered by 64's own times
    assert tuning.proven(40, "fp16", 90, sweeps=(mixed,)) == [b, a]
    # a baseline row neither proves nor fails a config
    assert tuning.proven(40, "fp16", 90, sweeps=(_sweep(results=rows + [slow]),)) == [b, a]
    # the user's switch
    monkeypatch.setenv("O2MAG_TRITON", "on")
    assert tuning.trusted((9, 0), "fp16", 40, sweeps=(_sweep(results=rows + [slow]),))[0]
    assert tuning.trusted((9, 0), "fp16", 80, sweeps=(h100,))[0]  # not reached: the user's call
    assert not tuning.trusted((9, 0), "fp16", 80, sweeps=(failed,))[0]  # nothing could run there
    assert tuning.trusted((8, 6), "fp16", sweeps=())[0]
    monkeypatch.setenv("O2MAG_TRITON", "off")
    assert not tuning.trusted((9, 0), "fp16", sweeps=(h100,))[0]


def test_kernel_hash_follows_the_kernel_source(monkeypatch):
    """Same hash under the interpreter and on a GPU (read from the file), different when a jit
    function or the config list changes."""
    import inspect

    h = tuning.kernel_hash()
    assert len(h) == 16
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    other = subprocess.run([sys.executable, "-c", "from o2mag_kernels import tuning; "
                            "print(tuning.kernel_hash())"], env=env, capture_output=True, text=True)
    assert other.stdout.strip() == h, other.stderr[-500:]
    src = inspect.getsource(K)
    tuning.kernel_hash.cache_clear()
    try:
        monkeypatch.setattr(inspect, "getsource", lambda m: src.replace("m_new = tl.maximum",
                                                                         "m_new  = tl.maximum"))
        assert tuning.kernel_hash() != h
        monkeypatch.undo()
        tuning.kernel_hash.cache_clear()
        monkeypatch.setattr(K, "CONFIGS", K.CONFIGS[:-1])
        assert tuning.kernel_hash() != h
    finally:
        monkeypatch.undo()
        tuning.kernel_hash.cache_clear()
    assert tuning.kernel_hash() == h


@pytest.mark.slow
def test_gpu_sweep_command_runs_each_config_in_its_own_process(tmp_path):
    """The sweep's machinery, on CPU under the interpreter: one worker process per config, a JSON
    table of every (config, case), and a crash in a worker is recorded, not fatal."""
    out = tmp_path / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "o2mag_kernels.tools.cli", "gpu-sweep", "--interpret",
                           "--dtypes", "fp16", "--head-dims", "40", "--quick", "--out", str(out),
                           "--jobs", "2"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["interpreted"] and data["kernel_hash"] == tuning.kernel_hash()
    assert data["complete"] and data["items"] == 2 * len(K.VARIANTS)  # 2 configs per variant
    configs = {tuple(r["config"]) for r in data["results"]}
    assert len(configs) == 2 and all(r["status"] == "ok" for r in data["results"])
    assert {r["variant"] for r in data["results"]} == {"default"}
    assert {r["case"] for r in data["results"]} == set(data["cases"])
    assert all(r["max_err"] <= r["bound"] for r in data["results"])
    # the other variants ran the same cases, into their own list (tuning reads "results" only)
    assert data["variants"] == [v.name for v in K.VARIANTS[1:]]
    others = data["variant_results"]
    assert {r["variant"] for r in others} == set(data["variants"])
    assert all(r["status"] == "ok" and r["max_err"] <= r["bound"] for r in others)
    assert {(r["variant"], r["case"]) for r in others} == {
        (v, c) for v in data["variants"] for c in data["cases"]}
    # tuning refuses an interpreter sweep
    data["path"], data["valid"] = str(out), False
    assert tuning.proven(40, "fp16", 90, sweeps=(data,)) is None


def test_a_crashing_worker_is_recorded(monkeypatch):
    from o2mag_kernels.tools import sweep

    def boom(*a, **k):
        class P:
            stdout = '{"case": "blob-4096", "status": "running", "started": true}\n'
            returncode = -11
        return P()

    monkeypatch.setattr(sweep.subprocess, "run", boom)
    got = sweep.run_one({"dtype": "fp16", "head_dim": 40, "config": [64, 64, 4, 3]}, False, 10)
    assert got == [{"dtype": "fp16", "head_dim": 40, "config": [64, 64, 4, 3], "case": "blob-4096",
                    "status": "crash", "error": "worker exited with -11: "}]


def test_sweep_times_what_passed_serially_and_renames_when_complete(monkeypatch, tmp_path):
    """The sweep's two phases on a faked GPU: correctness for every config (one crashes), then
    one timing process per (dtype, head dim) for the configs that passed plus the torch backend;
    the file is ``<out>.partial`` until the end, and tuning then reads its verdicts."""
    import argparse

    from o2mag_kernels.tools import sweep

    monkeypatch.delenv("O2MAG_TRITON", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    out = tmp_path / "fake.json"
    crash = tuning.spill_free(80, "fp16", 90)[0]
    calls, seen_partial = [], []

    def fake_run_one(item, interpret, timeout):
        seen_partial.append((item, os.path.exists(str(out) + ".partial") and not out.exists()))
        calls.append(item)
        var = item.get("variant", "default")
        if "configs" in item:  # phase 2: kernel 1.0 ms per config at 80, torch 2.0; 40: torch faster
            assert item["head_dim"] != 80 or var != "default" or all(tuple(c) != crash for c in item["configs"])
            kernel, torch_ms = (1.0, 2.0) if item["head_dim"] == 80 else (3.0, 2.0)
            if var != "default":  # the bg_dense variant measures faster: it must not count
                kernel = 0.5
            rows = [{"case": "timed-sd", "config": c, "status": "ok", "ms": kernel} for c in item["configs"]]
            if var == "default":
                rows.append({"case": "timed-sd", "baseline": "torch", "status": "ok", "ms": torch_ms})
            return [dict(dtype=item["dtype"], head_dim=item["head_dim"], variant=var, **r) for r in rows]
        status = "crash" if (item["head_dim"] == 80 and tuple(item["config"]) == crash
                             and var == "default") else "ok"
        return [dict(item, case=c, status=status) for c in sweep.CASES[0][:1]]

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    args = argparse.Namespace(dtypes=["fp16"], head_dims=[40, 80], quick=False, jobs=2, timeout=5,
                              out=str(out), interpret=False, variants=["default", "bg_dense"])
    assert sweep.run(args) == 1  # one config crashed
    groups = [c for c in calls if "configs" in c]
    assert [(g["variant"], g["dtype"], g["head_dim"]) for g in groups] == [
        ("default", "fp16", 40), ("default", "fp16", 80), ("bg_dense", "fp16", 40),
        ("bg_dense", "fp16", 80)]  # the default variant first
    assert calls.index(groups[0]) == len(calls) - 4  # timing only after every correctness run
    # it crashed in the default variant only: the bg_dense variant times all its clean configs
    assert groups[3]["configs"] == [list(c) for c in tuning.spill_free(80, "fp16", 90, variant="bg_dense")]
    # while timing, the results so far are in <out>.partial and <out> does not exist yet
    assert all(p for c, p in seen_partial if "configs" in c)
    assert out.exists() and not os.path.exists(str(out) + ".partial")
    data = json.loads(out.read_text())
    assert data["complete"] and data["kernel_hash"] == tuning.kernel_hash()
    assert {r["variant"] for r in data["results"]} == {"default"}
    assert {r["variant"] for r in data["variant_results"]} == {"bg_dense"}
    data["path"], data["valid"] = str(out), True
    assert tuning.trusted((9, 0), "fp16", 80, sweeps=(data,))[0]
    ok, why = tuning.trusted((9, 0), "fp16", 40, sweeps=(data,))
    assert not ok and "torch backend measured faster" in why
    assert crash not in tuning.proven(80, "fp16", 90, sweeps=(data,))


def _timing(dtype, d, tokens, ms, *, config=None, strategy=None):
    r = {"dtype": dtype, "head_dim": d, "case": "timed-sd", "status": "ok", "tokens": tokens,
         "ms": ms}
    if config is not None:
        r["config"] = list(config)
    else:
        r["baseline"] = "torch"
        if strategy is not None:
            r["strategy"] = strategy
    return r


def test_auto_weighs_every_torch_strategy_per_head_dim_and_tokens(monkeypatch):
    """auto's evidence per (family, head dim, tokens): the kernel must beat the FASTEST torch
    strategy timed at the nearest swept layer; among the torch strategies the fastest is run."""
    monkeypatch.delenv("O2MAG_TRITON", raising=False)
    cfg = tuning.spill_free(64, "fp16", 90)[0]
    rows = _rows("fp16", 64, cfg)
    rows += [_timing("fp16", 64, 4096, 1.0, config=cfg), _timing("fp16", 64, 256, 0.050, config=cfg),
             _timing("fp16", 64, 4096, 1.2, strategy="stitch"),
             _timing("fp16", 64, 4096, 0.8, strategy="augmented"),
             _timing("fp16", 64, 256, 0.090, strategy="stitch"),
             _timing("fp16", 64, 256, 0.060, strategy="augmented")]
    sweep = _sweep(results=rows)
    # 4096 tokens: augmented (0.8) beats the kernel (1.0): no kernel, torch:augmented
    ok, why = tuning.trusted((9, 0), "fp16", 64, sweeps=(sweep,), tokens=4096)
    assert not ok and "0.800" in why
    assert tuning.torch_strategy((9, 0), "fp16", 64, 4096, sweeps=(sweep,))[0] == "augmented"
    # 256 tokens (and 200: nearest swept is 256; 3000: nearest is 4096): the kernel wins at 256
    assert tuning.trusted((9, 0), "fp16", 64, sweeps=(sweep,), tokens=256)[0]
    assert tuning.trusted((9, 0), "fp16", 64, sweeps=(sweep,), tokens=200)[0]
    assert not tuning.trusted((9, 0), "fp16", 64, sweeps=(sweep,), tokens=3000)[0]
    table = tuning.timing_table((9, 0), "fp16", sweeps=(sweep,))
    assert [(d, n, pick) for d, n, _, pick in table] == [(64, 256, "triton"), (64, 4096, "torch:augmented")]
    assert table[1][2] == {"torch:stitch": 1.2, "torch:augmented": 0.8, "triton": 1.0}
    # another family's sweep says nothing about this one
    assert tuning.torch_strategy((8, 0), "fp16", 64, 4096, sweeps=(sweep,))[0] is None


def test_torch_timings_outlive_a_stale_kernel():
    """A sweep of an older kernel proves nothing about the kernel, but its torch strategy timings
    still count (the torch backend does not depend on the kernel's source)."""
    stale = _sweep(results=[_timing("fp16", 40, 4096, 1.1),  # no strategy recorded: stitch
                            _timing("fp16", 40, 4096, 0.7, strategy="augmented")],
                   kernel_hash="0" * 16)
    assert not stale["valid"]
    assert tuning.torch_timings((9, 0), "fp16", 40, 4096, sweeps=(stale,)) == {
        "stitch": 1.1, "augmented": 0.7}
    assert not tuning.trusted((9, 0), "fp16", 40, sweeps=(stale,), tokens=4096)[0]
    assert tuning.timing_table((9, 0), "fp16", sweeps=(stale,))[0][3] == "torch:augmented"


def test_auto_registry_names_run_their_strategy(make_case):
    """``torch:<strategy>`` (what auto may pick) is the torch backend with that strategy."""
    from o2mag_kernels.backends import REGISTRY
    from o2mag_kernels.backends.torch_backend import STRATEGIES, torch_attention
    from o2mag_kernels.validation import as_mask

    case = make_case(B=3, H=2, Lq=40, Lf=30, Lb=50, D=40, dtype=torch.float64, seed=9)
    problem = case.problem()
    mask = as_mask(problem, *case.args[5:])
    for s in STRATEGIES:
        got = REGISTRY[f"torch:{s}"](problem, *case.tensors, mask, return_lse=False)
        assert torch.equal(got, torch_attention(problem, *case.tensors, mask, strategy=s))
