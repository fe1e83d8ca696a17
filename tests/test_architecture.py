"""The shape docs/architecture.md describes, checked: packages import only the packages below them (lazy
imports inside functions count too), no import circle, the ground floor imports nothing from the package,
the library imports nothing from the benchmarks beside it, modules stay small, entry scripts thin, neither
the loop nor the tools branch on a method's name, and the page lists every module and the package order
that this test enforces."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dist_glm"
DOC = REPO / "docs" / "architecture.md"
MAX_MODULE_LINES = 450
MAX_LAUNCH_LINES = 60

# Bottom to top: a package may import itself and the packages before it, never one after it.
LAYERS = (
    "errors",
    "llamafactory",
    "options",
    "value_checks",
    "config",
    "runtime",
    "methods",
    "data",
    "checkpointing",
    "models",
    "objectives",
    "training",
    "planning",
    "tools",
    "cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], prefix: str = "dist_glm") -> set[str]:
    """Modules starting with `prefix` that `path` imports anywhere in its body (`from a import b` counts
    a.b when that is a module, else a)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == prefix:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == prefix)
    return out - {module_name(path)} if path.is_relative_to(REPO) else out


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    # Importing a.b runs a's __init__ first; a package's own __init__ importing its children is not a circle.
    return {module_name(f): {m for m in imports_of(f, modules) if m != "dist_glm"} for f in files}


def layer_of(module: str) -> str:
    return module.split(".")[1]  # dist_glm.training.loop -> training; dist_glm.cli -> cli


def test_packages_import_only_the_packages_below_them():
    rank = {name: i for i, name in enumerate(LAYERS)}
    graph = import_graph()
    unplaced = sorted({layer_of(m) for m in graph if m != "dist_glm"} - set(rank))
    assert not unplaced, f"packages missing from LAYERS (and docs/architecture.md): {unplaced}"
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module != "dist_glm"
        for target in targets
        if rank[layer_of(target)] > rank[layer_of(module)]
    ]
    assert not upward, upward


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # The check above must see lazy imports inside functions, where upward arrows usually hide.
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from dist_glm.training.loop import train\n")
    assert imports_of(module, {"dist_glm.training.loop"}) == {"dist_glm.training.loop"}


def test_no_import_circle():
    graph = import_graph()
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        assert module not in visiting, "import circle: " + " -> ".join(visiting[visiting.index(module) :] + [module])
        visiting.append(module)
        for target in graph.get(module, ()):
            if not (module.startswith(target + ".") or target.startswith(module + ".")):  # package <-> child
                visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_ground_floor_imports_nothing_upward():
    graph = import_graph()
    assert graph["dist_glm.errors"] == set()
    assert graph["dist_glm.options"] == {"dist_glm.errors", "dist_glm.llamafactory"}
    assert graph["dist_glm.value_checks"] == set()
    assert graph["dist_glm.config"] == {"dist_glm.errors", "dist_glm.options", "dist_glm.value_checks"}
    assert graph["dist_glm.llamafactory"] == set()
    assert graph["dist_glm.runtime.doctor"] == set()  # runs before anything else is known to work
    assert graph["dist_glm.runtime.supervise"] == set()  # stdlib only: it outlives the ranks it supervises


def test_the_library_never_imports_the_benchmarks():
    hits = [
        f"{f.relative_to(REPO)} imports {sorted(found)}"
        for f in PACKAGE.rglob("*.py")
        if (found := imports_of(f, set(), prefix="benchmarks"))
    ]
    assert not hits, hits


def test_modules_are_small_and_entry_scripts_thin():
    big = {f.name: n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, big
    fat = {
        f.name: n for f in (REPO / "launch").glob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LAUNCH_LINES
    }
    for tool in ("build_demo_assets.py", "gpu_check.py"):  # tools of their own, not entries
        fat.pop(tool, None)
    assert not fat, fat


def test_nothing_outside_methods_branches_on_a_method_name():
    pattern = re.compile(r"art\.method\s*(==|!=|in)|finetuning_type\s*(==|!=|in)\s*[\"'(\[]|method\s*==\s*[\"']")
    hits = [
        f"{f.relative_to(REPO)}:{i}: {line.strip()}"
        for f in PACKAGE.rglob("*.py")
        if "methods" not in f.parts
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


def test_the_method_and_the_teacher_are_resolved_once():
    # validate_inputs (training/checks.py) resolves the recipe's method and the teacher's artifact once and
    # passes them on (Inputs); the loop, continued training and the objectives never look them up again.
    text = {str(f.relative_to(PACKAGE)): f.read_text() for f in PACKAGE.rglob("*.py")}
    again = [
        f
        for f in ("training/loop.py", "training/continued.py", "objectives/__init__.py", "objectives/teacher.py")
        if "get_method(cfg.method" in text[f]
    ]
    assert not again, again
    assert text["training/checks.py"].count("get_method(cfg.method.finetuning_type)") == 1
    resolves = {f: n for f, t in text.items() if (n := t.count("resolve_artifact(d.teacher_model_name_or_path"))}
    assert resolves == {"objectives/teacher.py": 1}, resolves


def test_docs_architecture_lists_every_module_and_the_package_order():
    doc = DOC.read_text()
    missing = [
        str(f.relative_to(PACKAGE))
        for f in sorted(PACKAGE.rglob("*.py"))
        if f.name != "__init__.py" and f"`{f.relative_to(PACKAGE)}`" not in doc and f"`{f.name}`" not in doc
    ]
    assert not missing, f"docs/architecture.md does not mention: {missing}"
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", doc))
    tree = [p.relative_to(REPO).as_posix() for p in REPO.glob("*/**/*.py") if ".venv" not in p.parts]
    tree += [p.name for p in REPO.glob("*.py")]
    gone = sorted(n for n in named if not any(t == n or t.endswith("/" + n) for t in tree))
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
    rows = re.findall(r"^\| `([a-z_]+)(?:/|\.py)?`", doc, flags=re.M)
    assert [r for r in rows if r in LAYERS] == list(LAYERS), "the package table's order is not LAYERS' order"
