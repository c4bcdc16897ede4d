"""`mailbox` is also a standard-library module: ours must win in every documented entry point
(DESIGN.md §2). Each case runs a fresh interpreter and asks which module it imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import mailbox, sys; sys.stdout.write(str(getattr(mailbox, 'IS_DISPATCH_MAILBOX', False)))"


def _run(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_python_dash_c_from_project_root() -> None:
    assert _run([sys.executable, "-c", PROBE], ROOT) == "True"


def test_pythonpath_from_another_directory(tmp_path: Path) -> None:
    assert _run([sys.executable, "-c", PROBE], tmp_path, {"PYTHONPATH": str(ROOT)}) == "True"


def test_without_the_project_on_the_path_the_stdlib_wins(tmp_path: Path) -> None:
    # The documented failure mode: from elsewhere, without PYTHONPATH, Python's own module.
    assert _run([sys.executable, "-c", PROBE], tmp_path) == "False"


def test_pytest_process_imports_ours() -> None:
    import mailbox

    assert getattr(mailbox, "IS_DISPATCH_MAILBOX", False)


def test_python_dash_m_from_project_root() -> None:
    out = _run([sys.executable, "-m", "mailbox", "--help"], ROOT)
    assert "Dispatch Mailbox" in out
