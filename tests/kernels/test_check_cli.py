"""``o2mag-kernels check``: the quick parity-and-speed report exits 0 only when parity holds."""
import o2mag_kernels
from o2mag_kernels.tools.cli import main


def test_check_reports_parity_and_timing(capsys):
    assert main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "all parity checks passed" in out
    assert "torch   torch.float32" in out and "plain SDPA" in out and "x of SDPA" in out


def test_check_fails_when_a_backend_is_wrong(capsys, monkeypatch):
    real = o2mag_kernels.tri_source_attention

    def off_by_a_bit(*args, backend="auto", **kwargs):
        out = real(*args, backend=backend, **kwargs)
        return out if backend == "reference" else out + 1e-2

    monkeypatch.setattr(o2mag_kernels, "tri_source_attention", off_by_a_bit)
    assert main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


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
