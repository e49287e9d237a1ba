"""Fixtures of the ``o2mag_kernels`` tests: the case builders of ``helpers.py`` and the
independent float64 formula of ``formula.py``, session-scoped so Hypothesis tests may use them."""
from __future__ import annotations

import pytest

from tests.kernels.formula import formula_attention
from tests.kernels.helpers import build_case, low_precision_bound


@pytest.fixture(scope="session")
def make_case():
    """Factory fixture: ``make_case(**kwargs)`` is :func:`build_case`."""
    return build_case


@pytest.fixture(scope="session")
def lowp_bound():
    """Factory fixture: :func:`low_precision_bound`."""
    return low_precision_bound


@pytest.fixture(scope="session")
def formula():
    """The independent float64 formula: ``formula(*case.args, scale=..., fg_gain=...) -> (out, lse)``."""
    return formula_attention
