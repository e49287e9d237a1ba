"""pytest-benchmark view of the kernel suite: ``python -m pytest benchmarks/kernels --benchmark-enable``.

Each case is a benchmark group holding every usable backend and baseline, so pytest-benchmark's own
table shows them side by side; outputs are checked against the float64 reference before timing.
"""
import pytest
import torch

from .cases import runner
from .suite import cases, make_inputs, methods, reference_output, tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=True)
METHODS, _ = methods(DEVICE)


@pytest.fixture(scope="module")
def inputs_and_expected():
    memo = {}

    def get(case):
        if case not in memo:
            inputs = make_inputs(case, DEVICE)
            memo[case] = (inputs, reference_output(inputs))
        return memo[case]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel(benchmark, inputs_and_expected, case, method):
    inputs, expected = inputs_and_expected(case)
    fn = runner(method, inputs)
    out = fn()
    if method != "sdpa_plain":
        assert (out.double() - expected).abs().max().item() <= tolerance(case.dtype)
    benchmark.group = case.name
    benchmark.extra_info["method"] = method
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
