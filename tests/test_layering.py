"""The package's import graph, read from the source (top-level *and* function-local imports, and
the package `__init__`s an import runs): no cycles, every module in a stage, no import from a stage
up to a later one, and the training stage never loads publishing, applications or the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "mmcl"

# The stages in the order data flows through them; a module may import only its own stage and earlier
# ones. Evaluation comes before training because the loop evaluates while it trains; config_loader
# reads files and flags for the command line (and the Python API) and checks them with the data and
# towers stages' own rules, so it sits with the command line, after everything it checks.
STAGES = [
    ("foundation", ("mmcl", "mmcl.config", "mmcl.artifacts", "mmcl.progress")),
    ("data", ("mmcl.data",)),
    ("towers", ("mmcl.towers",)),
    ("losses", ("mmcl.losses",)),
    ("evaluation", ("mmcl.evaluation",)),
    ("training", ("mmcl.training",)),
    ("publish", ("mmcl.publish",)),
    ("apps", ("mmcl.apps",)),
    ("front door", ("mmcl.config_loader", "mmcl.cli")),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ancestors(name: str) -> list[str]:
    """`a.b.c` -> ["a", "a.b"]: the packages whose `__init__` runs before `a.b.c` does."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body (relative imports resolved;
    `from pkg import name` points at `pkg.name` when that is a module, else at `pkg`). Importing a
    module also runs each package `__init__` above it, so an import depends on those too, except the
    importer's own ancestors (already running when it is)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = set(ancestors(name)) | {name}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import mmcl.data.sources` -> that module
                    target = target.rpartition(".")[0]
                if target.split(".")[0] != top:
                    continue
                graph[name] |= {m for m in [target, *ancestors(target)] if m in files and m not in own}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def stage_of(module: str, stages: list[tuple[str, tuple[str, ...]]] = STAGES) -> int:
    """The index of the stage whose longest prefix names `module`."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(stages) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no stage: add it to STAGES"
    return best[1]


def upward(graph: dict[str, set[str]], stages: list[tuple[str, tuple[str, ...]]] = STAGES) -> list[str]:
    """Every import that runs from a stage up to a later one."""
    return sorted(f"{m} ({stages[stage_of(m, stages)][0]}) -> {t} ({stages[stage_of(t, stages)][0]})"
                  for m, targets in graph.items() for t in targets if stage_of(t, stages) > stage_of(m, stages))


def test_the_package_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "mmcl.data.sources" in reachable(graph, "mmcl.training.loop")
    assert cycles(graph) == []


def test_no_import_runs_up_the_stage_order():
    graph = import_graph(PACKAGE)
    for module in graph:
        stage_of(module)  # every module is in a stage
    assert upward(graph) == []


def test_training_never_reaches_publishing_apps_or_the_cli():
    graph = import_graph(PACKAGE)
    reached = reachable(graph, "mmcl.training.loop")
    assert {"mmcl.towers.model", "mmcl.losses.clip", "mmcl.evaluation.evaluators", "mmcl.training.setup"} <= reached
    assert not [m for m in reached if m.startswith(("mmcl.publish", "mmcl.apps", "mmcl.cli"))]


def test_importing_training_loads_no_publishing_apps_or_cli_module():
    """The same at run time: what `import` really loads (lazy imports, `__init__`s and all)."""
    probe = ("import sys, mmcl.training, mmcl.training.loop, mmcl.training.setup; "
             "print(sorted(m for m in sys.modules if m.startswith(('mmcl.publish', 'mmcl.apps', 'mmcl.cli'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_argparse_lives_only_in_the_cli():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "argparse" not in imported or "cli" in path.relative_to(PACKAGE).parts, path


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_a_planted_cycle_behind_a_function_local_import_is_found(tmp_path):
    pkg = plant(tmp_path, {"pkg/__init__.py": "", "pkg/sub/__init__.py": "",
                           "pkg/a.py": "from .sub.b import helper\n",
                           "pkg/sub/b.py": "def helper():\n    from .. import a  # hidden in a function\n",
                           "pkg/c.py": "import pkg.a\n"})
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.sub"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_a_planted_cycle_through_a_package_init_is_found_and_breaks_the_import(tmp_path):
    """`data/__init__.py` importing the loop, which imports `data.pairs`: `import pkg.train` fails at
    run time, and the graph shows the cycle (an import of `data.pairs` runs `data/__init__.py`)."""
    files = {"pkg/__init__.py": "", "pkg/data/__init__.py": "from ..train import train\n",
             "pkg/data/pairs.py": "X = 1\n", "pkg/train.py": "from .data.pairs import X\n\ndef train():\n    pass\n"}
    pkg = plant(tmp_path, files)
    assert cycles(import_graph(pkg)) == [["pkg.data", "pkg.train"]]
    done = subprocess.run([sys.executable, "-c", "import pkg.train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "ImportError" in done.stderr
    # a package face that hands on its own modules is no cycle
    pkg = plant(tmp_path / "face", {**files, "pkg/data/__init__.py": "from .pairs import X\n"})
    assert cycles(import_graph(pkg)) == []


def test_an_import_up_the_stage_order_is_found(tmp_path):
    pkg = plant(tmp_path, {"pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/high/__init__.py": "",
                           "pkg/high/b.py": "from ..low import a\n",
                           "pkg/low/a.py": "def f():\n    from ..high.b import g  # runs up\n"})
    stages = [("base", ("pkg",)), ("low", ("pkg.low",)), ("high", ("pkg.high",))]
    assert upward(import_graph(pkg), stages) == ["pkg.low.a (low) -> pkg.high (high)",
                                                 "pkg.low.a (low) -> pkg.high.b (high)"]


def test_the_training_step_does_not_load_the_data_libraries():
    """`mmcl.training.loop` (its `training_step`, what benchmarks and the harness import) loads neither
    `datasets` nor pyarrow / pandas (about 90 MB of memory); a run loads them when it reads data."""
    probe = ("import sys, mmcl.training.loop; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'datasets', 'pyarrow', 'pandas'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
