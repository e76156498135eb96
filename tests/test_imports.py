"""Import hygiene: no cycles among the project's modules, leaves that stay light, Ray kept out of the engine."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("helios", "deployments", "telemetry", "controller")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in the file (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in modules}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work: not a cycle
    graph = {name: {d for d in deps if not d.startswith(name + ".")} for name, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("modules, banned", [
    ("helios.config, helios.stats, telemetry.metrics", ("torch", "ray")),  # what a controller or dashboard needs
    ("controller.slo, controller.selector, controller.reassess, deployments.config", ("torch",)),
    ("helios.engine, helios.async_engine", ("ray",)),  # the engine runs without Ray
])
def test_light_modules_stay_light(modules, banned):
    code = f"import sys, {modules}; print([name for name in {banned!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {modules} loads {result.stdout.strip()}"


def test_shared_data_is_the_folder_beside_the_checkout():
    from helios.tuning.datasets import SHARED_DATA

    assert SHARED_DATA == ROOT.parent / "shared" / "data"


def test_building_the_cli_leaves_engine_config_untouched():
    """The CLI reads EngineConfig's fields; it must not change them (the docs page renders their types)."""
    import dataclasses

    from helios.cli import build_parser
    from helios.config import EngineConfig

    before = [(f.name, f.type) for f in dataclasses.fields(EngineConfig)]
    build_parser()
    assert [(f.name, f.type) for f in dataclasses.fields(EngineConfig)] == before


def test_every_benchmark_script_imports():
    """A bench script that imports a helper the code no longer has fails here, not hours into a run
    (bench/head_forms.py imported a tuning helper that a refactor had removed)."""
    scripts = sorted((ROOT / "bench").glob("*.py"))
    code = ("import importlib.util, sys\n"
            f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]\n"
            "for path in sys.argv[1:]:\n"
            "    name = 'bench_' + path.rsplit('/', 1)[-1][:-3]\n"
            "    spec = importlib.util.spec_from_file_location(name, path)\n"
            "    sys.modules[name] = module = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(module)\n")
    result = subprocess.run([sys.executable, "-c", code, *map(str, scripts)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
