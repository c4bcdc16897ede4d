"""DESIGN.md §2: the domain (`mailbox/`) imports no Celery; `tasks/` is the only glue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_mailbox_module_imports_celery() -> None:
    modules = sorted(p.stem for p in (ROOT / "mailbox").glob("*.py") if p.stem != "__main__")
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('mailbox' if name == '__init__' else f'mailbox.{name}')\n"
        "bad = sorted(m for m in sys.modules if m == 'celery' or m.startswith('celery.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"celery imported by mailbox/: {out.stdout}"


def test_lua_scripts_are_files_loaded_by_the_coordinator() -> None:
    scripts = {p.stem for p in (ROOT / "mailbox" / "lua").glob("*.lua")}
    assert {"lease_acquire", "lease_put", "lease_release", "epoch_generation", "epoch_fill",
            "lease_take_executor", "events_append", "wake_consume"} <= scripts
