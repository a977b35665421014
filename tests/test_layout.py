"""Layout: main.py holds the settings and main(); findpeople/ holds one module per stage, and
imports flow one way, down the list below (issue #10)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import REPO

# Each module may import only modules before it. The orchestration (runstate, pipeline, run) and
# doctor come last, so no stage module can import them; nothing in the package imports main.
LAYERS = ("errors", "settings", "outputs", "ring", "folders", "decode", "gpulibs", "providers",
          "detect", "device", "models", "references", "tracks", "worker", "index", "naming", "search",
          "clips", "reports", "resume", "snapshots", "people", "runstate", "pipeline", "indexer", "cluster", "run", "doctor")
HEAVY_MODULES = ("onnxruntime", "insightface", "tensorrt", "av", "cv2", "onnx", "pyarrow", "duckdb",
                 "faiss", "usearch", "ray")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 45
PACKAGE = REPO / "findpeople"


def package_modules() -> list:
    """Return the package's module names (without __init__)."""
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def runtime_imports(source: str) -> list:
    """Return (imported name, line) for every import a module runs: package modules as their
    short name ('ring'), 'main' for main.py, other top-level names as they are. Imports inside
    `if TYPE_CHECKING:` never run (annotations only) and are left out."""
    found = []

    def visit(node, typing_only):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            typing_only = True
        if not typing_only:
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    found.append((node.module.split(".")[0], node.lineno))
                elif node.level == 1:
                    found.extend((alias.name, node.lineno) for alias in node.names)
                elif node.module and node.module.split(".")[0] == "findpeople":
                    parts = node.module.split(".")
                    found.extend([(parts[1], node.lineno)] if len(parts) > 1 else
                                 [(alias.name, node.lineno) for alias in node.names])
                elif node.module:
                    found.append((node.module.split(".")[0], node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    found.append((parts[1] if parts[0] == "findpeople" and len(parts) > 1 else parts[0],
                                  node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(ast.parse(source), False)
    return found


def upward_imports(module: str, source: str) -> list:
    """Return (imported module, line) for each import of a package module at or below this one in
    LAYERS, or of main."""
    rank = LAYERS.index(module)
    return [(name, line) for name, line in runtime_imports(source)
            if name == "main" or (name in LAYERS and LAYERS.index(name) >= rank)]


def test_every_module_of_the_package_has_its_place_in_the_layers():
    """The layer list names every module of the package, and nothing else."""
    assert sorted(LAYERS) == package_modules(), \
        f"not in LAYERS: {set(package_modules()) - set(LAYERS)}; gone: {set(LAYERS) - set(package_modules())}"


@pytest.mark.parametrize("module", LAYERS)
def test_a_module_imports_only_modules_above_it(module):
    """Imports flow down the pipeline: no cycles, no stage importing the orchestration or main."""
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    assert upward_imports(module, source) == [], \
        f"findpeople/{module}.py imports modules at or below it in LAYERS: {upward_imports(module, source)}"


@pytest.mark.parametrize("source, expected", [
    ("from .pipeline import start_pipeline\n", [("pipeline", 1)]),
    ("from findpeople.run import run_search\n", [("run", 1)]),
    ("from . import doctor\n", [("doctor", 1)]),
    ("import findpeople.tracks\n", [("tracks", 1)]),
    ("def f():\n    import main\n", [("main", 2)]),
    ("from .decode import VideoInfo\n", [("decode", 1)]),
    ("from .ring import RingLayout\n", []),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .models import FaceModels\n", []),
], ids=["relative", "absolute", "from-package", "import", "main-in-function", "same-module",
        "above", "annotations-only"])
def test_the_import_check_flags_imports_from_below(source, expected):
    """The check above can fail: for decode.py it flags imports of decode or anything below it,
    and of main, wherever they stand; TYPE_CHECKING imports (never run) are allowed."""
    assert upward_imports("decode", source) == expected, source


def test_importing_every_module_loads_no_heavy_library_and_prints_nothing():
    """Importing main and every module of the package in a fresh interpreter prints nothing and
    loads none of onnxruntime, insightface, tensorrt, onnx, av, cv2, pyarrow, duckdb, faiss or
    usearch (spawned children re-import the modules of their target, and decoders must never load
    an inference runtime)."""
    modules = ["main", *(f"findpeople.{m}" for m in LAYERS)]
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"heavy = {HEAVY_MODULES!r}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"import failed (exit {done.returncode}):\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[:-1] == [] and done.stderr == "", f"importing printed {lines[:-1]!r} {done.stderr!r}"
    assert json.loads(lines[-1]) == [], f"importing the package loaded heavy modules: {lines[-1]}"


@pytest.mark.parametrize("path", ["main.py", *(f"findpeople/{m}.py" for m in LAYERS)])
def test_modules_and_functions_stay_small_enough_to_read_in_a_sitting(path):
    """No module over 600 lines (past that it holds two jobs), no function over 45 lines."""
    source = (REPO / path).read_text(encoding="utf-8")
    long_functions = [(node.name, node.lineno, node.end_lineno - node.lineno + 1)
                      for node in ast.walk(ast.parse(source))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path}: {len(source.splitlines())} lines"
    assert long_functions == [], f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


@pytest.mark.parametrize("module", LAYERS)
def test_each_module_opens_with_a_docstring_saying_what_it_does(module):
    """Each module's docstring is its first statement: a summary line, then at least one more
    line (which process runs it, what comes in and goes out)."""
    docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")))
    assert docstring and len(docstring.strip().splitlines()) >= 3, \
        f"findpeople/{module}.py: docstring {docstring!r}"


def test_main_holds_the_settings_block_and_main_and_nothing_of_the_engine():
    """main.py defines the settings, SETTING_NAMES, the functions that read and parse them, and
    main(); the engine (any other function or class) lives in the package."""
    tree = ast.parse((REPO / "main.py").read_text(encoding="utf-8"))
    functions = sorted(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    assert functions == ["default_settings", "load_settings", "main", "parse_command_line"], functions
