"""docker-compose.yml as Compose reads it, for tests on machines without a Docker engine.

Compose parses the YAML first and then interpolates every string value (keys and comments
are left alone) from the environment: `${VAR}`, `${VAR:-default}` / `${VAR-default}`,
`${VAR:?error}` / `${VAR?error}` (refuse to start), `${VAR:+alt}` / `${VAR+alt}` and `$$` for
a literal `$`. The colon forms treat an empty value like an unset one. This module does the
same, so tests see the values a deployment would get, and `MissingVariableError` where
`docker compose` would refuse to start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from tests.support.workers import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
_REFERENCE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?",
                     re.DOTALL)


class MissingVariableError(Exception):
    """A `${VAR:?message}` whose variable is unset (or empty): compose refuses to start."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def raw() -> dict[str, Any]:
    """The file as YAML, before interpolation (what the author wrote)."""
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def load(env: Mapping[str, str]) -> dict[str, Any]:
    """The file as `docker compose config` would see it with `env` as the environment."""
    return dict(interpolate(raw(), env))


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Every string inside `value` interpolated; mapping keys stay as written."""
    if isinstance(value, str):
        return _REFERENCE.sub(lambda m: _replacement(m, env), value)
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    return value


def references(value: Any) -> list[str]:
    """Every `${...}` expression in the strings of `value`, as written (without `${}`)."""
    if isinstance(value, str):
        return [m["braced"] or m["named"] for m in _REFERENCE.finditer(value)
                if m["braced"] is not None or m["named"] is not None]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in references(item)]
    return []


def _replacement(match: re.Match[str], env: Mapping[str, str]) -> str:
    if match[0] == "$$":
        return "$"
    if match["named"] is not None:
        return env.get(match["named"], "")
    parsed = _BRACED.fullmatch(match["braced"])
    if parsed is None:
        raise ValueError(f"invalid interpolation {match[0]!r}")
    name, op, arg = parsed["name"], parsed["op"], parsed["arg"] or ""
    value = env.get(name)
    missing = value is None or (value == "" and op is not None and op.startswith(":"))
    if op is None:
        return value or ""
    if op.endswith("-"):
        return arg if missing else str(value)
    if op.endswith("?"):
        if missing:
            raise MissingVariableError(name, arg or "required variable is missing")
        return str(value)
    return "" if missing else arg  # the `+` forms
