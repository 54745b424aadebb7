"""The import rule of docs/development.md: the package's layers, and nothing imports a script."""

from __future__ import annotations

import ast
from pathlib import Path

import pu_diffusion

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(pu_diffusion.__file__).parent

#: The package's layers, lowest first. A module imports from its own layer or a lower one, never a higher.
LAYERS = {
    "foundation": ["errors", "image_files", "shapes", "objective", "flow_matching", "prompt_sets"],
    "data": ["training_data", "batches", "buckets", "builtin_datasets", "latent_cache", "prior", "unlabeled_filter"],
    "artefacts": ["checkpoints", "outputs", "classifier", "nudity", "pipelines", "metrics", "reports"],
    "command line": ["flags", "checks", "sd3_flags"],
    "run": ["run_setup", "lora", "unconditional", "frozen_models", "text_to_image", "small_pipeline"],
    "loop": ["loop"],
}
LAYER_OF = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
SCRIPTS = {path.stem for path in ROOT.glob("*.py")} - {"pu_loss"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file (``pu_diffusion.x`` kept whole)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pu_diffusion":
                names.update(f"pu_diffusion.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return {name if name.startswith("pu_diffusion.") else name.split(".")[0] for name in names}


def package_imports(path: Path) -> set[str]:
    return {name.removeprefix("pu_diffusion.") for name in imported_modules(path) if name.startswith("pu_diffusion.")}


def test_every_package_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYER_OF), "a module was added or removed: place it in LAYERS and docs/development.md"


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{path.stem} ({LAYER_OF[path.stem]}) imports {imported} ({LAYER_OF[imported]})"
        for path in PACKAGE.glob("*.py")
        if path.stem in LAYER_OF
        for imported in package_imports(path)
        if LAYER_OF[imported] > LAYER_OF[path.stem]
    ]
    assert upward == []


def test_the_package_has_no_import_cycle():
    graph = {path.stem: package_imports(path) for path in PACKAGE.glob("*.py") if path.stem in LAYER_OF}
    finished, on_path = set(), []

    def visit(module: str) -> None:
        assert module not in on_path, f"import cycle: {' -> '.join([*on_path, module])}"
        if module in finished:
            return
        on_path.append(module)
        for imported in graph[module]:
            visit(imported)
        on_path.pop()
        finished.add(module)

    for module in graph:
        visit(module)


def test_nothing_but_the_tests_imports_a_script():
    """The package, the scripts and the benchmarks never import a script; pu_loss.py imports nothing of ours."""
    importers = [*PACKAGE.glob("*.py"), *ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in importers
        for name in imported_modules(path) & SCRIPTS
        if name != path.stem
    ]
    assert offenders == []
    ours = {name for name in imported_modules(ROOT / "pu_loss.py") if name.startswith("pu_") or name in SCRIPTS}
    assert ours == set()


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checks above read real imports: a file that imports the loop from the foundation layer is caught."""
    offender = tmp_path / "errors.py"
    offender.write_text("from pu_diffusion.loop import train\nimport evaluate\n")
    assert package_imports(offender) == {"loop"}
    assert LAYER_OF["loop"] > LAYER_OF["errors"]
    assert imported_modules(offender) & SCRIPTS == {"evaluate"}
