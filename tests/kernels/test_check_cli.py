"""``o2mag-kernels check``: the quick parity-and-speed report exits 0 only when parity holds."""
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
