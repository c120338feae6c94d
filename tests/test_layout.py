"""The import rules of spg/ and the repository's layout, checked on the source with `ast`
(nothing is imported or run).

1. No import cycles among spg's modules. Imports inside functions count as much as the ones
   at the top of a file; `from spg.pkg import name` is an import of `spg.pkg.name` when that
   is a module, else of `spg.pkg`; relative imports are resolved.
2. No module uses another module's private names: neither `from spg.x import _name` nor
   `x._name` on an imported spg module.
3. Copyable files: each method module and each model file imports only the standard library,
   numpy, torch and the few spg leaf modules listed for it below, and those leaves import
   only the standard library, numpy and torch. (A package's `__init__.py` only holds a
   docstring, so importing a submodule brings nothing else with it.)
4. The top: `spg.experiment` (building, running and summarising one experiment) is what the
   front ends train.py and evaluate.py call; no module of spg imports it.
5. A method module imports at most one shared spg module (`interface.py`, or for merging.py
   `kmeans.py`), so a copy of it takes at most one other file.
6. The file layer (our checkpoint format, the unpickler, safetensors, HF weight files, atomic
   writes) imports no other spg module: no model, no method, no training loop.
7. The training loop knows no model family: `spg.training` imports nothing of the family
   packages (`spg.wav2vec2`, `spg.whisper`) nor a family's objective (`spg.ctc_training`);
   the families plug in through its `Objective`.
8. The product stands on its own: no module of spg/, nor train.py or evaluate.py, imports
   anything from tests/ or experiments/ (as `tests.x` / `experiments.x`, or by the bare name of
   a file there, which a sys.path insert would make importable) or names a path into them (a
   string such as "tests", "tests/data" or "experiments/runner.py" outside a docstring, e.g.
   `REPO / "tests"`). The experiment scripts may import spg; spg never imports them.
9. The experiments stand beside the product, not on the tests: no script of experiments/
   imports from tests/ or names a path into it.
10. tests/bench/ holds only the benchmarks: scripts named *_speed.py that run ours and a
   reference side by side (the experiments live in experiments/).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
SPG = REPO / "spg"

# spg leaf modules: they import only the standard library, numpy and torch.
LEAVES = {
    "spg.config": "config-field checks shared by the model files' config classes",
    "spg.compress.interface": "what a method plugs into: the prunable-model interface and the training loop's Method hooks",
    "spg.whisper.audio": "Whisper's log-mel front end (the model's transcribe() computes it)",
    "spg.compress.kmeans": "NumPy k-means (what spg.compress.merging clusters units with)",
}
# file -> the spg modules it may import (besides the standard library, numpy and torch)
COPYABLE = {
    "spg.compress.self_pinching": {"spg.compress.interface"},
    "spg.compress.magnitude": {"spg.compress.interface"},
    "spg.compress.hardconcrete": {"spg.compress.interface"},
    "spg.compress.merging": {"spg.compress.kmeans"},
    "spg.wav2vec2.model": {"spg.config", "spg.compress.interface"},
    "spg.whisper.model": {"spg.config", "spg.whisper.audio", "spg.compress.interface"},
    "spg.whisper.ctc": {"spg.config", "spg.whisper.audio", "spg.whisper.model", "spg.compress.interface"},
    **{leaf: set() for leaf in LEAVES},
}
THIRD_PARTY_ALLOWED = {"numpy", "torch"}
# the method modules (copied out with at most one other file)
METHOD_MODULES = {"spg.compress.self_pinching", "spg.compress.magnitude", "spg.compress.hardconcrete",
                  "spg.compress.kmeans", "spg.compress.merging"}
# reading and writing files, below every model family
FILE_LAYER = {"spg.checkpoint", "spg.unpickler", "spg.safetensors", "spg.hf_weights", "spg.files"}
# modules only the front ends (train.py, evaluate.py) import
TOP = {"spg.experiment"}
# the generic loop, and what it must not import (modules and packages)
FAMILY_FREE = {"spg.training"}
MODEL_FAMILIES = ("spg.wav2vec2", "spg.whisper", "spg.ctc_training")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_package(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    """{module name: (file, syntax tree)}; every node gets a `_parent` link."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                child._parent = parent
        modules[module_name(path, root)] = (path, tree)
    return modules


def is_package(name: str, modules: dict) -> bool:
    return name in modules and modules[name][0].name == "__init__.py"


def resolve_from(node: ast.ImportFrom, importer: str, modules: dict) -> str:
    """The absolute module of `from X import ...` in `importer`."""
    if not node.level:
        return node.module or ""
    package = importer if is_package(importer, modules) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


class Imports:
    """What one module imports: spg modules, other top-level packages, names from spg modules,
    and which local names are bound to spg modules (for `alias._private`)."""

    def __init__(self, name: str, tree: ast.Module, modules: dict):
        self.spg: set[str] = set()
        self.external: set[str] = set()
        self.private_imports: list[str] = []
        self.module_aliases: dict[str, str] = {}     # local name -> spg module (or a prefix of one)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._add(alias.name, modules)
                    if alias.name.split(".")[0] == "spg":
                        if alias.asname:
                            self.module_aliases[alias.asname] = alias.name
                        else:
                            self.module_aliases["spg"] = "spg"
            elif isinstance(node, ast.ImportFrom):
                source = resolve_from(node, name, modules)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:                              # a submodule
                        self._add(full, modules)
                        self.module_aliases[alias.asname or alias.name] = full
                    else:
                        self._add(source, modules)
                        if source in modules and _private(alias.name):
                            self.private_imports.append(f"from {source} import {alias.name}")

    def _add(self, module: str, modules: dict) -> None:
        if module.split(".")[0] == "spg":
            # `import spg.a.b` imports spg.a.b (its parents are packages holding a docstring)
            self.spg.add(module if module in modules else module.rpartition(".")[0])
        elif module:
            self.external.add(module.split(".")[0])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def dotted(node: ast.AST) -> Optional[list[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def private_attribute_uses(tree: ast.Module, imports: Imports, modules: dict) -> list[str]:
    """`mod._name` where `mod` (or a dotted chain `spg.x.y`) is an imported spg module."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "_parent", None), ast.Attribute):
            continue
        chain = dotted(node)
        if not chain or chain[0] not in imports.module_aliases:
            continue
        module = imports.module_aliases[chain[0]]
        for attr in chain[1:]:
            if f"{module}.{attr}" in modules:
                module = f"{module}.{attr}"
                continue
            if _private(attr):
                found.append(f"{module}.{attr} (line {node.lineno})")
            break
    return sorted(set(found))


def graph_of(modules: dict) -> dict[str, Imports]:
    return {name: Imports(name, tree, modules) for name, (_path, tree) in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> Optional[list[str]]:
    state: dict[str, int] = {}                   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def layout_problems(root: Path) -> list[str]:
    """Every broken rule in the package at `root`, as readable lines (empty: all rules hold)."""
    modules = parse_package(root)
    graph = graph_of(modules)
    problems = []
    cycle = find_cycle({name: {m for m in imports.spg if m != name} for name, imports in graph.items()})
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for name, imports in sorted(graph.items()):
        for statement in imports.private_imports:
            problems.append(f"{name}: imports a private name: {statement}")
        for use in private_attribute_uses(modules[name][1], imports, modules):
            problems.append(f"{name}: uses a private name of another module: {use}")
    for name, imports in sorted(graph.items()):
        for top in sorted(imports.spg & TOP - {name}):
            problems.append(f"{name}: imports {top}, which only the front ends (train.py, evaluate.py) may import")
    for name in sorted(FAMILY_FREE & set(graph)):
        for imported in sorted(graph[name].spg):
            if any(imported == family or imported.startswith(family + ".") for family in MODEL_FAMILIES):
                problems.append(f"{name}: imports {imported}; the training loop knows no model family")
    stdlib = set(sys.stdlib_module_names)
    for name, allowed in sorted(COPYABLE.items()):
        if name not in graph:
            problems.append(f"{name}: missing (listed as copyable)")
            continue
        extra_spg = sorted(graph[name].spg - allowed)
        extra_external = sorted(graph[name].external - stdlib - THIRD_PARTY_ALLOWED)
        if extra_spg or extra_external:
            problems.append(f"{name}: should import only the standard library, numpy, torch"
                            + (f" and {', '.join(sorted(allowed))}" if allowed else "")
                            + f"; also imports {', '.join(extra_spg + extra_external)}")
    for name in sorted(METHOD_MODULES & set(graph)):
        shared = sorted(graph[name].spg - {name})
        if len(shared) > 1:
            problems.append(f"{name}: a method module imports at most one shared spg module; "
                            f"imports {', '.join(shared)}")
    for name in sorted(FILE_LAYER & set(graph)):
        outside = sorted(graph[name].spg - FILE_LAYER)
        if outside:
            problems.append(f"{name}: the file layer imports only itself; also imports {', '.join(outside)}")
    for name, (path, tree) in sorted(modules.items()):
        if path.name == "__init__.py" and name != "spg":
            code = [node for node in tree.body
                    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
            if code:
                problems.append(f"{name}: a subpackage's __init__.py holds only its docstring")
    return problems


# --- the product, the experiments and the tests (rules 8-10) ----------------------------------

FRONT_ENDS = ("train.py", "evaluate.py")
OUTSIDE_THE_PRODUCT = ("tests", "experiments")


def names_defined_in(folder: Path) -> set[str]:
    """The importable names a folder offers: its own name and every module file's stem below it
    (what `sys.path.insert(0, folder)` would make importable), less the standard library's."""
    if not folder.is_dir():
        return set()
    stems = {path.stem for path in folder.rglob("*.py") if "__pycache__" not in path.parts}
    return ({folder.name} | stems) - set(sys.stdlib_module_names) - {"__init__"}


def docstring_nodes(tree: ast.Module) -> set[int]:
    """ids of the bare string statements (docstrings and the like): prose, not paths."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def reaches_into(path: Path, folders: tuple[str, ...], repo: Path) -> list[str]:
    """Where the file at `path` imports from, or names a path into, one of `folders` of `repo`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = path.relative_to(repo).as_posix()
    offered = {folder: names_defined_in(repo / folder) for folder in folders}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            modules = [node.module or ""]
        else:
            modules = []
        for module in modules:
            for folder in folders:
                if module.split(".")[0] in offered[folder]:
                    found.append(f"{name}: imports {module} (line {node.lineno}), which is in {folder}/")
    prose = docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            first = node.value.replace("\\", "/").lstrip("./").split("/")[0]
            if first in folders:
                found.append(f"{name}: names a path into {first}/: {node.value!r} (line {node.lineno})")
    return found


def independence_problems(repo: Path) -> list[str]:
    """Every broken rule among 8-10 in the repository at `repo` (empty: all hold)."""
    problems = []
    product = sorted((repo / "spg").rglob("*.py")) + [repo / name for name in FRONT_ENDS if (repo / name).is_file()]
    for path in product:
        problems += reaches_into(path, OUTSIDE_THE_PRODUCT, repo)
    for path in sorted((repo / "experiments").rglob("*.py")):
        problems += reaches_into(path, ("tests",), repo)
    bench = repo / "tests" / "bench"
    for path in sorted(bench.rglob("*")) if bench.is_dir() else []:
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith("_speed.py"):
            problems.append(f"{path.relative_to(repo).as_posix()}: tests/bench/ holds only the *_speed.py "
                            f"benchmarks; an experiment, report or helper belongs in experiments/")
    return problems


def test_the_product_needs_neither_tests_nor_experiments():
    problems = independence_problems(REPO)
    assert not problems, "\n".join(problems)


def test_the_independence_rules_see_the_whole_repository():
    assert {"helpers", "conftest", "tests"} <= names_defined_in(REPO / "tests")
    assert {"runner", "figures", "spg_experiment", "experiments"} <= names_defined_in(REPO / "experiments")
    assert sorted(p.name for p in (REPO / "tests" / "bench").glob("*.py"))      # the benchmarks are there
    assert (REPO / "recordings" / "librivox" / "transcription").is_file()


def test_spg_obeys_the_import_rules():
    problems = layout_problems(SPG)
    assert not problems, "\n".join(problems)


def test_every_module_parses_and_the_rules_see_the_whole_package():
    modules = parse_package(SPG)
    assert {"spg", "spg.checkpoint", "spg.loading", "spg.training"} <= set(modules)
    assert set(COPYABLE) <= set(modules) and TOP <= set(modules)
    assert METHOD_MODULES <= set(COPYABLE) <= set(modules) and FILE_LAYER <= set(modules)


# --- the checker itself, on small made-up packages ------------------------------------------

def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "spg"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = write_package(tmp_path, {
        "a.py": "from spg import b\n",
        "b.py": "def f():\n    from . import a   # hidden cycle\n",
    })
    assert any(p.startswith("import cycle: spg.a -> spg.b -> spg.a") for p in layout_problems(root))


def test_from_package_import_name_resolves_to_the_submodule(tmp_path):
    root = write_package(tmp_path, {
        "pkg/x.py": "import spg.pkg.y\n",
        "pkg/y.py": "from spg.pkg import x\n",
    })
    assert any("import cycle" in p and "spg.pkg.x" in p and "spg.pkg.y" in p for p in layout_problems(root))


def test_private_names_of_other_modules_are_found(tmp_path):
    root = write_package(tmp_path, {
        "a.py": "def _helper():\n    pass\n_TABLE = {}\n",
        "b.py": "from spg import a\nfrom spg.a import _TABLE\n\ndef f():\n    return a._helper(), a.__name__\n",
        "c.py": "import spg.a\n\ndef g():\n    return spg.a._helper()\n",
    })
    problems = layout_problems(root)
    assert "spg.b: imports a private name: from spg.a import _TABLE" in problems
    assert "spg.b: uses a private name of another module: spg.a._helper (line 5)" in problems
    assert "spg.c: uses a private name of another module: spg.a._helper (line 4)" in problems
    assert not any("__name__" in p for p in problems)


@pytest.mark.parametrize("source", ["from spg.training import Method\n", "import tqdm\n",
                                    "def f():\n    from spg.wav2vec2 import surgery\n"])
def test_a_method_module_that_imports_more_than_it_may_is_found(tmp_path, source):
    files = {f"{name[4:].replace('.', '/')}.py": "import torch\nimport numpy\n" for name in COPYABLE}
    files["compress/magnitude.py"] = "import math\n" + source
    files["training.py"] = "from spg.compress import interface\n"
    files["wav2vec2/surgery.py"] = ""
    problems = layout_problems(write_package(tmp_path, files))
    assert len(problems) == 1 and problems[0].startswith("spg.compress.magnitude: should import only"), problems


def test_a_module_that_imports_the_top_is_found(tmp_path):
    root = write_package(tmp_path, {
        "experiment.py": "from spg import training\n",
        "training.py": "def f():\n    from spg.experiment import run\n",
    })
    problems = layout_problems(root)
    assert "spg.training: imports spg.experiment, which only the front ends (train.py, evaluate.py) may import" \
        in problems


def test_a_method_module_that_imports_two_shared_modules_is_found(tmp_path):
    root = write_package(tmp_path, {
        "compress/interface.py": "", "compress/kmeans.py": "",
        "compress/merging.py": "from spg.compress import kmeans\nfrom spg.compress.interface import Method\n",
    })
    assert ("spg.compress.merging: a method module imports at most one shared spg module; imports "
            "spg.compress.interface, spg.compress.kmeans") in layout_problems(root)


def test_a_file_layer_module_that_imports_a_model_is_found(tmp_path):
    root = write_package(tmp_path, {
        "files.py": "", "wav2vec2/model.py": "",
        "checkpoint.py": "from spg.files import atomic_write\n",
        "unpickler.py": "def f():\n    from spg.wav2vec2 import model\n",
    })
    problems = layout_problems(root)
    assert "spg.unpickler: the file layer imports only itself; also imports spg.wav2vec2.model" in problems
    assert not any(p.startswith("spg.checkpoint:") for p in problems)


def test_a_training_loop_that_imports_a_model_family_is_found(tmp_path):
    root = write_package(tmp_path, {
        "training.py": "def f():\n    from spg.wav2vec2.model import Wav2Vec2CTC\n",
        "wav2vec2/model.py": "",
    })
    assert "spg.training: imports spg.wav2vec2.model; the training loop knows no model family" in layout_problems(root)


def write_repository(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_product_that_reaches_into_tests_or_experiments_is_found(tmp_path):
    repo = write_repository(tmp_path, {
        "spg/__init__.py": '"""Nothing here (tests/test_layout.py checks it): prose may name tests/."""\n',
        "spg/experiment.py": 'from pathlib import Path\nREPO = Path(".")\nDATA = REPO / "tests" / "data"\n',
        "spg/plots.py": "def f():\n    from experiments.figures import plot\n",
        "spg/jobs.py": "import sys\nsys.path.insert(0, 'experiments')\nimport runner\n",
        "spg/fine.py": "import json\nfrom spg import experiment\nKEYS = {'test': 1}\n",
        "train.py": "from helpers import write_corpus\nREADME = open('experiments/README.md')\n"
                    "HELP = 'the experiments are scripts in experiments/'\n",     # prose, not a path
        "evaluate.py": "import spg\n",
        "tests/helpers.py": "", "experiments/runner.py": "", "experiments/figures.py": "",
    })
    problems = independence_problems(repo)
    assert problems == [
        "spg/experiment.py: names a path into tests/: 'tests' (line 3)",
        "spg/jobs.py: imports runner (line 3), which is in experiments/",
        "spg/jobs.py: names a path into experiments/: 'experiments' (line 2)",
        "spg/plots.py: imports experiments.figures (line 2), which is in experiments/",
        "train.py: imports helpers (line 1), which is in tests/",
        "train.py: names a path into experiments/: 'experiments/README.md' (line 2)",
    ], problems


def test_an_experiment_that_reads_tests_or_a_bench_that_is_no_benchmark_is_found(tmp_path):
    repo = write_repository(tmp_path, {
        "spg/__init__.py": "",
        "experiments/whisper_cluster.py": 'import spg\nfrom runner import Job\nREAL = "tests/data/librivox"\n',
        "experiments/runner.py": "",
        "tests/bench/kmeans_speed.py": "", "tests/bench/figures.py": "",
        "tests/bench/__pycache__/figures.cpython-312.pyc": "",
    })
    assert independence_problems(repo) == [
        "experiments/whisper_cluster.py: names a path into tests/: 'tests/data/librivox' (line 3)",
        "tests/bench/figures.py: tests/bench/ holds only the *_speed.py benchmarks; an experiment, report or "
        "helper belongs in experiments/",
    ]
