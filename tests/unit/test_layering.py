"""The layers of docs/architecture.md, checked on the source: the domain (`mailbox/`) imports
no Celery and, apart from the CLI and the dev tooling, nothing of `tasks/` (the Celery glue);
no import cycle anywhere in `mailbox/`, `tasks/` or `celeryconfig.py`; SQL tables are named
only by the statements module; Lua scripts are files."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mailbox", "tasks")
TASKS_ALLOWED = ("mailbox.cli", "mailbox.dev", "mailbox.http", "mailbox.testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    found = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
             if "migrations" not in p.parts}
    found["celeryconfig"] = ROOT / "celeryconfig.py"
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for inner in ast.walk(child):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every module of ours that `name` imports, at module level or inside a function (an
    import hidden in a function body is still a dependency), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in modules:
                    yield candidate  # a submodule
                elif base in modules:
                    yield base


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: set(imports_of(name, path, modules)) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_mailbox_tasks_or_celeryconfig() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_and_dev_tooling_import_tasks() -> None:
    offenders = sorted(f"{name} imports {target}"
                       for name, targets in import_graph().items()
                       if name.startswith("mailbox") and not name.startswith(TASKS_ALLOWED)
                       for target in targets if target.startswith("tasks"))
    assert offenders == []


def test_celeryconfig_imports_constants_not_the_domain() -> None:
    targets = import_graph()["celeryconfig"]
    assert targets <= {"tasks.priorities", "mailbox.settings"}, targets


def test_only_the_statements_module_names_sql_tables() -> None:
    tables = {"dispatches", "thread_epochs", "runs", "messages", "resolutions"}
    offenders = []
    for name, path in our_modules().items():
        if name in ("mailbox.store.statements", "mailbox.schema"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "mailbox.schema":
                named = {a.name for a in node.names} & tables
                if named:
                    offenders.append(f"{name}: {sorted(named)}")
    assert offenders == []


def test_no_mailbox_module_imports_celery() -> None:
    modules = sorted(name for name in our_modules()
                     if name.startswith("mailbox") and not name.startswith(TASKS_ALLOWED)
                     and name != "mailbox.__main__")
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'celery' or m.startswith('celery.')\n"
        "             or m == 'tasks' or m.startswith('tasks.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"celery or tasks imported by the domain: {out.stdout}"


def test_lua_scripts_are_files_loaded_by_the_coordinator() -> None:
    scripts = {p.stem for p in (ROOT / "mailbox" / "lua").glob("*.lua")}
    assert {"lease_acquire", "lease_put", "lease_release", "epoch_generation", "epoch_fill",
            "lease_take_executor", "events_append", "wake_consume"} <= scripts
