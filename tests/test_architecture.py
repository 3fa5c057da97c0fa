"""The one-way import rule of ARCHITECTURE.md, checked on the source: every import of a project module
(inside functions too) points to the same layer or one below, none closes a circle, and shared/
imports neither framework nor backend."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top, as ARCHITECTURE.md draws them; a package name stands for all its modules, so shared/'s
# layers are its folders.
LAYERS = [
    ["shared.runtime", "shared.algorithms"],
    ["shared.tasks"],
    ["shared.checkpoints"],
    ["shared.models"],
    ["shared.training"],
    ["shared.pipeline", "shared.sweep", "reasoning_torch", "reasoning_mlx"],
    ["backends", "cli"],
]
MOST_TOP_LEVEL_ENTRIES = 12
MOST_LINES = 300  # cli.py and each file of bench/
FRAMEWORKS = ("torch", "mlx", "mlx_lm", "peft")


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("shared/**/*.py"), *ROOT.glob("reasoning_torch/*.py"), *ROOT.glob("reasoning_mlx/*.py"),
             ROOT / "cli.py", ROOT / "backends.py"]
    modules = {}
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {other for other in imported_names(path) if other in modules and other != name}
            for name, path in modules.items()}


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == entry or module.startswith(entry + ".") for entry in layer):
            return index
    raise AssertionError(f"{module} is in no layer: add it to ARCHITECTURE.md and LAYERS")


def test_every_module_has_a_layer():
    for module in project_modules():
        if module != "shared":  # the package itself: a docstring
            layer_of(module)


def test_no_module_imports_one_above_it():
    upward = [f"{module} (layer {layer_of(module)}) imports {other} (layer {layer_of(other)})"
              for module, others in import_graph().items() if module != "shared"
              for other in others if layer_of(other) > layer_of(module)]
    assert upward == []


def test_no_import_circle():
    graph, finished, path = import_graph(), set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in finished:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        finished.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_backends_do_not_import_each_other_and_shared_imports_neither_nor_a_framework():
    for module, path in project_modules().items():
        names = imported_names(path)
        if module.startswith("shared"):
            assert not {n for n in names if n.split(".")[0] in (*FRAMEWORKS, "reasoning_torch", "reasoning_mlx")}, \
                module
        if module.startswith("reasoning_torch"):
            assert not {n for n in names if n.split(".")[0] in ("reasoning_mlx", "mlx", "mlx_lm")}, module
        if module.startswith("reasoning_mlx"):
            assert not {n for n in names if n.split(".")[0] in ("reasoning_torch", "torch", "peft")}, module


def test_shared_shows_its_layers_in_a_few_folders_each_drawn_in_architecture_md():
    entries = [path.name for path in (ROOT / "shared").iterdir() if path.name != "__pycache__"]
    assert len(entries) <= MOST_TOP_LEVEL_ENTRIES, sorted(entries)
    picture = (ROOT / "ARCHITECTURE.md").read_text().split("```")[1]
    folders = [name for name in entries if (ROOT / "shared" / name).is_dir()]
    assert folders and all(f"shared/{name}/" in picture for name in folders), folders


def test_the_cli_and_every_benchmark_file_stay_short():
    files = [ROOT / "cli.py", *sorted(ROOT.glob("bench/*.py"))]
    too_long = {path.name: lines for path in files if (lines := len(path.read_text().splitlines())) > MOST_LINES}
    assert too_long == {}, f"over {MOST_LINES} lines: split by what they hold"
