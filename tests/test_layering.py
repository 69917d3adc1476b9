"""The package's layers, held against its imports.

Each subpackage belongs to a layer; a module may import its own subpackage and any
lower layer, never a higher one or a sibling of its own layer; only the Lightning
glue imports ``lightning``; and no chain of imports comes back to where it started.
The checks read the source (every import, lazy ones inside functions included), so
a violation fails here even on a code path no other test runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_pp"

#: Lowest first. A module's layer is that of its first name under ``lightning_pp``.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("platform",),
    ("tree",),
    ("distributed",),
    ("pipeline", "parallel"),
    ("tracing", "checkpoint"),
    ("generation",),
    ("models",),
    ("integration",),
    ("_deferred",),  # registers with Lightning once Lightning is imported
    ("__init__",),  # the package entry: the public names
)
GLUE = "integration"

Graph = Dict[str, Set[str]]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / relative
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def read_imports(root: Path = PACKAGE) -> Tuple[Graph, Dict[str, Set[str]]]:
    """Every module's imports of the package's modules, and of third-party top-level names."""
    graph: Graph = {}
    external: Dict[str, Set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        targets: Set[str] = set()
        others: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    (targets if alias.name.split(".")[0] == root.name else others).add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                if module.split(".")[0] != root.name:
                    others.add(module)
                    continue
                for alias in node.names:
                    candidate = f"{module}.{alias.name}"
                    targets.add(candidate if _is_module(candidate, root) else module)
        graph[name] = {t for t in targets if t != name}
        external[name] = {o.split(".")[0] for o in others}
    return graph, external


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    part = _part(module)
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no layer: add {part!r} to LAYERS in {__file__}")


def upward_imports(graph: Graph) -> List[str]:
    """Imports of a higher layer, or of another subpackage of the same layer."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _part(target) == _part(module):
                continue
            if _layer(target) >= _layer(module):
                bad.append(f"{module} imports {target} (layer {_layer(module)} -> {_layer(target)})")
    return bad


def lightning_outside_glue(external: Dict[str, Set[str]]) -> List[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in external.items()
        for name in names & {"lightning", "pytorch_lightning", "lightning_fabric"}
        if _part(module) != GLUE
    )


def find_cycle(graph: Graph) -> Optional[List[str]]:
    """One import cycle, as the modules along it, or ``None``."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(module: str) -> Optional[List[str]]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


# -- the package ------------------------------------------------------------------------------
def test_every_module_is_in_a_layer():
    graph, _ = read_imports()
    assert len(graph) > 40
    for module in graph:
        _layer(module)


def test_no_import_points_up_the_layers():
    graph, _ = read_imports()
    assert upward_imports(graph) == []


def test_only_the_glue_imports_lightning():
    _, external = read_imports()
    assert lightning_outside_glue(external) == []
    assert any("lightning" in names for module, names in external.items() if _part(module) == GLUE)


def test_no_import_cycle():
    graph, _ = read_imports()
    assert find_cycle(graph) is None


def test_every_exported_name_exists():
    import importlib

    graph, _ = read_imports()
    for name in sorted(graph):
        module = importlib.import_module(name)
        missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_subpackages_say_what_lives_there():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init} needs a docstring saying what lives in its subpackage"
        assert 2 <= len(docstring.splitlines()) <= 8, f"{init}: two or three lines, please"


# -- the checks can fail ----------------------------------------------------------------------
def test_the_checks_catch_violations():
    graph = {
        "lightning_pp.platform": {"lightning_pp.pipeline.schedules"},  # up
        "lightning_pp.pipeline.schedules": {"lightning_pp.parallel.layers"},  # sideways
        "lightning_pp.parallel.layers": {"lightning_pp.distributed.p2p"},  # fine
        "lightning_pp.distributed.p2p": {"lightning_pp.distributed.topology"},
        "lightning_pp.distributed.topology": {"lightning_pp.distributed.p2p"},  # cycle
    }
    assert [line.split(" (")[0] for line in upward_imports(graph)] == [
        "lightning_pp.pipeline.schedules imports lightning_pp.parallel.layers",
        "lightning_pp.platform imports lightning_pp.pipeline.schedules",
    ]
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "lightning_pp.distributed.p2p" in cycle
    external = {"lightning_pp.tree": {"lightning", "torch"}, "lightning_pp.integration.strategy": {"lightning"}}
    assert lightning_outside_glue(external) == ["lightning_pp.tree imports lightning"]


def test_the_reader_resolves_relative_and_submodule_imports(tmp_path):
    root = tmp_path / "lightning_pp"
    (root / "pipeline").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "platform.py").write_text("")
    (root / "pipeline" / "__init__.py").write_text("from . import schedules\n")
    (root / "pipeline" / "schedules.py").write_text(
        "def f():\n    from .. import platform\n    from lightning_pp.pipeline import helper_name\n"
    )
    graph, _ = read_imports(root)
    assert graph["lightning_pp.pipeline"] == {"lightning_pp.pipeline.schedules"}
    assert graph["lightning_pp.pipeline.schedules"] == {"lightning_pp.platform", "lightning_pp.pipeline"}


# -- at run time ------------------------------------------------------------------------------
def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
def test_torch_only_modules_import_no_lightning():
    graph, _ = read_imports()
    torch_only = sorted(m for m in graph if _part(m) != GLUE and _part(m) not in ("__init__", "_deferred"))
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({m!r})\n" for m in torch_only)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    assert _run(code) == "[]"


@pytest.mark.slow
@pytest.mark.parametrize(
    "imports",
    [
        "import lightning_pp; import lightning",
        "import lightning; import lightning_pp",
        "from lightning_pp import PPStrategy",
    ],
)
def test_import_lightning_pp_registers_with_lightning(imports):
    check = (
        "from lightning.pytorch.accelerators import AcceleratorRegistry; "
        "from lightning.fabric.accelerators import ACCELERATOR_REGISTRY; "
        "from lightning.pytorch.strategies import StrategyRegistry; "
        "print('xpu' in AcceleratorRegistry, 'npu' in ACCELERATOR_REGISTRY, 'pp' in StrategyRegistry)"
    )
    assert _run(f"{imports}; {check}") == "True True True"


@pytest.mark.slow
def test_public_names_are_unchanged():
    names = _run(
        "import lightning_pp; print(sorted(lightning_pp.__all__)); "
        "[getattr(lightning_pp, n) for n in lightning_pp.__all__]"
    )
    assert names == str(
        sorted(
            [
                "CollectiveError",
                "GenerationModule",
                "GenerationProgress",
                "NPUAccelerator",
                "PPStrategy",
                "PipeCommError",
                "Platform",
                "PromptDataset",
                "ScoreDataset",
                "StreamingPredictionWriter",
                "XPUAccelerator",
                "__version__",
                "collate_prompts",
                "consolidate_checkpoint",
                "current_platform",
                "load_hf_checkpoint",
                "read_predictions",
                "use_platform",
            ]
        )
    )
