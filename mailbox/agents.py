"""The agent registry: named, versioned handlers that runs are pinned to at submit.

`@agent("name", version="1")` registers `handler(ctx) -> str | AgentResult`. A run records the
agent's (name, version) as its resolution when it is submitted, and the resolve phase loads
exactly that pair later, so redeploying a new version never changes what a queued run meant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailbox.errors import ValidationError

Handler = Callable[[Any], Any]


@dataclass(frozen=True)
class AgentSpec:
    name: str
    version: str
    handler: Handler


_REGISTRY: dict[tuple[str, str], AgentSpec] = {}
_CURRENT: dict[str, str] = {}


def agent(name: str, version: str = "1") -> Callable[[Handler], Handler]:
    """Register the decorated function as agent `name` at `version` (the latest registration
    of a name is its current version, the one new runs pin)."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("agent name must not be empty")
    if not isinstance(version, str) or not version.strip():
        raise ValidationError("agent version must not be empty")

    def register(handler: Handler) -> Handler:
        if not callable(handler):
            raise ValidationError(f"agent {name!r} handler must be callable")
        _REGISTRY[(name, version)] = AgentSpec(name, version, handler)
        _CURRENT[name] = version
        return handler

    return register


def current(name: str) -> AgentSpec:
    """The version new runs of `name` pin to; ValidationError for an unknown agent."""
    version = _CURRENT.get(name)
    if version is None:
        known = ", ".join(sorted(_CURRENT)) or "none"
        raise ValidationError(f"unknown agent {name!r} (registered: {known})")
    return _REGISTRY[(name, version)]


def lookup(name: str, version: str) -> AgentSpec | None:
    """Exactly the pinned (name, version), or None when this process does not have it."""
    return _REGISTRY.get((name, version))


def registered() -> list[AgentSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: (s.name, s.version))
