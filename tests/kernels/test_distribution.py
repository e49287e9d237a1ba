"""The kernels-only distribution (``kernels/pyproject.toml``): the op with torch, triton and numpy.

The generator's install (the root ``pyproject.toml``) brings diffusers, transformers and the
evaluation's libraries; ``pip install ./kernels`` installs ``o2mag_kernels`` and the
``o2mag-kernels`` command alone. These tests read that distribution's build configuration (no
network, no build) and run the package with every generator dependency blocked from importing.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
KERNELS_TOML = ROOT / "kernels" / "pyproject.toml"
# distribution names of what the generator needs and the kernels must not
GENERATOR_DISTS = {"diffusers", "transformers", "accelerate", "torchmetrics", "scipy", "matplotlib",
                   "pillow", "tqdm"}
# their import names (pillow is PIL; scikit-learn comes with the tests and evaluation)
GENERATOR_MODULES = {"diffusers", "transformers", "accelerate", "torchmetrics", "scipy",
                     "matplotlib", "PIL", "tqdm", "sklearn"}


def _toml(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _dist_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def test_kernels_only_dependencies_are_torch_triton_and_numpy():
    deps = _toml(KERNELS_TOML)["project"]["dependencies"]
    names = {_dist_name(d) for d in deps}
    assert not names & GENERATOR_DISTS, f"a generator dependency in the kernels-only install: {deps}"
    assert names == {"torch", "triton", "numpy"}, deps
    # the same requirements (versions, markers) as the generator's install, so the two cannot drift
    root_deps = _toml(ROOT / "pyproject.toml")["project"]["dependencies"]
    assert set(deps) <= set(root_deps), set(deps) - set(root_deps)


def test_kernels_distribution_ships_the_whole_package_and_command():
    """Every folder of o2mag_kernels (the data-only sweeps/ too), built from the repository's one
    copy, with the same data files and console command as the generator's install."""
    kernels, root = _toml(KERNELS_TOML), _toml(ROOT / "pyproject.toml")
    setup = kernels["tool"]["setuptools"]
    package = ROOT / "o2mag_kernels"
    folders = {"o2mag_kernels"} | {
        ".".join(p.relative_to(ROOT).parts) for p in package.rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.iterdir())}
    assert set(setup["packages"]) == folders
    assert (KERNELS_TOML.parent / setup["package-dir"]["o2mag_kernels"]).resolve() == package
    data = setup["package-data"]["o2mag_kernels"]
    assert data == root["tool"]["setuptools"]["package-data"]["o2mag_kernels"]
    assert all(list(package.glob(pattern)) for pattern in data), data
    assert kernels["project"]["scripts"] == {
        "o2mag-kernels": root["project"]["scripts"]["o2mag-kernels"]}


def test_the_package_runs_with_generator_dependencies_blocked():
    """Importing every module of the package and running ``o2mag-kernels check`` imports none of
    them."""
    script = textwrap.dedent(f"""
        import importlib.abc
        import sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {sorted(GENERATOR_MODULES)!r}:
                    raise ImportError(f"the kernels imported a generator dependency: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import importlib
        import pkgutil

        import o2mag_kernels

        for module in pkgutil.walk_packages(o2mag_kernels.__path__, "o2mag_kernels."):
            importlib.import_module(module.name)
        from o2mag_kernels.tools.cli import main

        sys.exit(main(["check", "--device", "cpu", "--length", "64", "--repeats", "1"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all parity checks passed" in proc.stdout
