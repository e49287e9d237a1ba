"""The layers of both packages are those of docs/architecture.md, read from its two tables ("Layers
inside `o2mag_kernels`" and "Layers inside `o2mag`"): every module is in a row, imports only from
its own row or lower ones (``o2mag`` also from ``o2mag_kernels``, never the reverse), there is no
import cycle, no module imports another's ``_private`` name, and every import inside a function
says why it is deferred, and no function is longer than ~80 lines without saying why. Building the parser (``o2mag --help``) loads neither torch nor
diffusers."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

LONG = 80  # lines: a function longer than this says why ("Long on purpose: ...")

ROOT = Path(__file__).resolve().parents[1]
HEADINGS = {"o2mag": "## 2. Layers inside `o2mag`",
            "o2mag_kernels": "### Layers inside `o2mag_kernels`"}
PACKAGES = sorted(HEADINGS)


def _table(package):
    """[(layer, [paths])] from the package's table in docs/architecture.md, bottom row first."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = re.split(r"\n##+ ", text.split(HEADINGS[package], 1)[1], maxsplit=1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].split("|")[1:4] == [" layer ", " modules ", " owns "] and set(rows[1]) <= set("|- ")
    out = []
    for line in rows[2:]:
        layer, modules = (c.strip() for c in line.split("|")[1:3])
        out.append((layer, re.findall(r"`([^`]+)`", modules)))
    return out


def _modules(package):
    """{dotted name: repo-relative path} of every module of the package."""
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        rel = f.relative_to(ROOT)
        parts = list(rel.with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = rel.as_posix()
    return out


def _layer_of(path, table):
    best = None
    for i, (_, paths) in enumerate(table):
        for p in paths:
            if path == p or (p.endswith("/") and path.startswith(p)):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def _imports(name, path, modules):
    """(line, target module, imported name or None, inside a function) of every o2mag import."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, None, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[:len(package) - child.level + 1] + ([child.module] if child.module else [])) \
                    if child.level else child.module
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.append((child.lineno, full, None, in_function) if full in modules
                                 else (child.lineno, base, a.name, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _outside_imports(package, modules):
    """The other package's modules a module of ``package`` imports: o2mag_kernels never imports o2mag."""
    for name, path in modules.items():
        for line, target, _, _ in _imports(name, path, modules):
            other = "o2mag" if package == "o2mag_kernels" else None
            if other and (target == other or target.startswith(other + ".")):
                yield f"{path}:{line} imports {target}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_in_exactly_the_layer_the_table_says_and_imports_only_downwards(package):
    table, modules = _table(package), _modules(package)
    assert [layer for layer, _ in table][0] and len(table) >= 5
    for paths in (p for _, ps in table for p in ps):
        assert paths.startswith(package + "/") and (ROOT / paths).exists(), paths
    wrong = list(_outside_imports(package, modules))
    for name, path in modules.items():
        layer = _layer_of(path, table)
        assert layer is not None, f"{path} is in no row of the {package} table in docs/architecture.md"
        for line, target, _, _ in _imports(name, path, modules):
            if target in modules and _layer_of(modules[target], table) > layer:
                wrong.append(f"{path}:{line} imports {target} from a higher layer")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_cycle_no_private_name_and_every_deferred_import_says_why(package):
    modules = _modules(package)
    edges, problems = {}, []
    for name, path in modules.items():
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        for line, target, imported, in_function in _imports(name, path, modules):
            if target in modules and target != name:
                edges.setdefault(name, set()).add(target)
            if imported and imported.startswith("_") and not imported.startswith("__") and target.startswith(("o2mag.", "o2mag_kernels.")):
                problems.append(f"{path}:{line} imports the private name {imported} of {target}")
            if in_function and "# deferred:" not in lines[line - 1]:
                problems.append(f"{path}:{line} imports inside a function without a '# deferred: why' comment")
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                problems.append("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not problems, "\n".join(problems)


def test_the_parser_loads_neither_torch_nor_diffusers():
    code = ("import sys; from o2mag.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES)
def test_a_function_over_80_lines_says_why(package):
    """The reason is in the docstring, or (for a jitted kernel, whose source keys the committed GPU
    evidence) in the comment block right above its decorators."""
    silent = []
    for path in _modules(package).values():
        text = (ROOT / path).read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.end_lineno - node.lineno + 1 <= LONG:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            above = []
            while first > 0 and lines[first - 1].lstrip().startswith("#"):
                first -= 1
                above.insert(0, lines[first])
            if "Long on purpose" not in (ast.get_docstring(node) or "") + "\n".join(above):
                silent.append(f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not silent, "functions over %d lines without 'Long on purpose: why':\n" % LONG + "\n".join(silent)
