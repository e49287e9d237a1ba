"""``o2mag-kernels check``: the quick parity-and-speed report exits 0 only when parity holds."""
import pytest

import o2mag_kernels
from o2mag_kernels.tools.cli import main


def test_check_reports_parity_and_timing(capsys):
    assert main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "all parity checks passed" in out
    assert "torch   torch.float32" in out and "plain SDPA" in out and "x of SDPA" in out
    # auto's choices per GPU family and layer, from the committed sweeps (the H200's at least)
    assert "auto's choices on sm_9x" in out and "head dim  40,  4096 tokens" in out
    assert "torch:stitch" in out and "-> " in out


def test_check_fails_when_a_backend_is_wrong(capsys, monkeypatch):
    real = o2mag_kernels.tri_source_attention

    def off_by_a_bit(*args, backend="auto", **kwargs):
        out = real(*args, backend=backend, **kwargs)
        return out if backend == "reference" else out + 1e-2

    monkeypatch.setattr(o2mag_kernels, "tri_source_attention", off_by_a_bit)
    assert main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


NO_NUMPY = """
import sys
sys.modules["numpy"] = None  # as if numpy were not installed (torch and triton are)
import torch, o2mag_kernels
from o2mag_kernels.tools.cli import main
ok, why = o2mag_kernels.available_backends()["triton"]
assert not ok and why, why
q = torch.randn(1, 1, 8, 8)
m = torch.ones(1, 8, dtype=torch.bool)
try:
    o2mag_kernels.tri_source_attention(q, q, q, q, q, m, backend="triton")
except RuntimeError as exc:
    assert "not usable here" in str(exc), exc
else:
    raise AssertionError("backend='triton' ran without numpy on CPU")
assert o2mag_kernels.tri_source_attention(q, q, q, q, q, m, backend="torch").shape == q.shape
assert main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]) == 0
print("TRITON", why)
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_without_numpy_the_backends_report_instead_of_crashing(interpret):
    """A kernels-only environment without numpy (Triton's interpreter imports it): the report,
    the check command and an explicit backend='triton' say why, the torch backend runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": interpret}
    done = subprocess.run([sys.executable, "-c", NO_NUMPY], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TRITON" in done.stdout


def test_check_says_when_a_committed_sweep_is_stale(capsys, monkeypatch):
    """A sweep of another kernel source proves nothing: ``check`` names it stale and says what to
    run on a card; a sweep of this kernel is reported current."""
    from o2mag_kernels import tuning

    fake = ({"path": "sweeps/fake-gpu.json", "device": "Fake GPU", "kernel_hash": "0" * 16,
             "valid": False},
            {"path": "sweeps/other-gpu.json", "device": "Other GPU",
             "kernel_hash": tuning.kernel_hash(), "valid": True})
    monkeypatch.setattr(tuning, "load_sweeps", lambda *a: fake)
    assert main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "fake-gpu.json: STALE" in out and "bash tests/kernels/gpu_check.sh sweep" in out
    assert f"other-gpu.json: current (kernel {tuning.kernel_hash()})" in out
