"""The package's layering (gunicorn_llm/__init__.py says it): each layer imports only the layers below it, and the
repository root keeps only the entry points users know. The benchmark toolkit, benchkit/, drives servers from
outside: the server never imports it, and the scripts import it rather than each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.inprocess

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gunicorn_llm"
SCRIPTS = ROOT / "scripts"
# what gunicorn loads: the package and the entry points at the root that serve
SERVER_FILES = [*PACKAGE.rglob("*.py"), *(ROOT / name for name in ("gunicorn_conf.py", "dispatcher.py",
                                                                    "transformers_url_m.py", "vllm_url_m.py"))]
# the package's layers, lowest first; a module may import its own layer and those ranked below it
RANK = {"settings": 0, "request_schema": 0, "ops": 1, "engines": 2, "http": 3, "preflight": 3, "launcher_options": 3}


def layer(module: str) -> str:
    """gunicorn_llm.ops.metrics -> ops; gunicorn_llm.settings -> settings."""
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    """The modules (or the names in them) a file imports absolutely, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def package_imports(path: Path) -> set[str]:
    """The gunicorn_llm modules (or subpackages) a file imports, anywhere in it."""
    return {name for name in imports(path) if name.startswith("gunicorn_llm.")}


def test_each_layer_imports_only_the_layers_below_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module.endswith("__init__") and path.parent == PACKAGE:
            continue
        own = layer(module)
        for target in package_imports(path):
            if layer(target) != own and RANK[layer(target)] >= RANK[own]:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_the_layering_check_sees_every_module():
    layers = {layer(".".join(path.relative_to(ROOT).with_suffix("").parts)) for path in PACKAGE.rglob("*.py")}
    assert layers - {"__init__"} == set(RANK)


def test_the_root_keeps_only_the_entry_points():
    assert sorted(path.name for path in ROOT.glob("*.py")) == [
        "bench.py", "dispatcher.py", "gunicorn_conf.py", "transformers_url_m.py", "vllm_url_m.py"]


def test_the_server_never_imports_the_benchmark_toolkit():
    importing = [str(path.relative_to(ROOT)) for path in SERVER_FILES
                 if any(name.split(".")[0] == "benchkit" for name in imports(path))]
    assert importing == []


def test_scripts_import_the_toolkit_not_each_other():
    scripts = {path.stem for path in SCRIPTS.glob("*.py")}
    importing = [f"{path.name} imports {name}" for path in SCRIPTS.glob("*.py") for name in imports(path)
                 if name.split(".")[0] in scripts or name.startswith("scripts.")]
    assert importing == []
