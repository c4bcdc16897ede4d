"""docker-compose.yml is safe to expose as written (issue 12): no service starts without its
secrets, nothing has a default password, only Flower and the API are published and on
loopback, the API needs its tokens (issue 14), both Redis servers require a password and
refuse to evict, and every service is pinned, restarted, health-checked and memory-limited.
CI has no Docker engine, so the file is read the way Compose reads it
(tests/support/compose.py); tests/e2e/test_operations.py runs its commands."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import compose
from tests.support.workers import ROOT

SECRETS = {"REDIS_PASSWORD": "redis-secret-1", "POSTGRES_PASSWORD": "pg-secret-2",
           "FLOWER_PASSWORD": "flower-secret-3",
           "MAILBOX_API_TOKENS": "api-token-4-0123456789abcdef,api-token-5-0123456789abcdef"}
REDIS_SERVICES = ("redis", "redis-broker")
ONE_SHOT = {"migrate"}
# name:major.minor[.patch][-variant]: never `latest`, never a major-only tag.
PINNED_IMAGE = re.compile(r"^[a-z0-9./-]+:\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?$")
_UNITS = {"b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3,
          "gb": 1024**3}


@pytest.fixture
def services() -> dict[str, Any]:
    return dict(compose.load(SECRETS)["services"])


def _command(service: dict[str, Any]) -> list[str]:
    return [str(part) for part in service["command"]]


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _bytes(size: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", size.strip())
    assert match is not None, size
    return int(match[1]) * _UNITS[match[2].lower() or "b"]


def _memory_limit(service: dict[str, Any]) -> str | None:
    limit = service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")
    return str(limit) if limit is not None else service.get("mem_limit")


def test_every_password_is_required_and_has_no_default() -> None:
    passwords = [ref for ref in compose.references(compose.raw())
                 if "PASSWORD" in ref or "TOKENS" in ref]
    assert passwords, "no password variables at all"
    for ref in passwords:
        name, _, message = ref.partition(":?")
        assert name in SECRETS and message, f"${{{ref}}} must be ${{{name}:?message}}"
    for name in SECRETS:
        for missing in ({k: v for k, v in SECRETS.items() if k != name}, {**SECRETS, name: ""}):
            with pytest.raises(compose.MissingVariableError) as refused:
                compose.load(missing)
            assert refused.value.name == name


def test_credentials_come_only_from_the_environment(services: dict[str, Any]) -> None:
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    flower_env = services["flower"]["environment"]
    assert flower_env["FLOWER_BASIC_AUTH"] == f"admin:{SECRETS['FLOWER_PASSWORD']}"
    assert "FLOWER_UNAUTHENTICATED_API" not in flower_env
    assert not any("basic-auth" in part or "basic_auth" in part
                   for part in _command(services["flower"])), "password on the command line"
    for name, service in services.items():
        for key, value in dict(service.get("environment") or {}).items():
            if "://" not in str(value):
                continue
            url = urlsplit(str(value))
            if url.scheme in ("http", "https"):  # a link for a browser: no credentials in it
                assert url.password is None, f"{name}.{key} = {value}"
                continue
            expected = (SECRETS["POSTGRES_PASSWORD"] if url.scheme.startswith("postgres")
                        else SECRETS["REDIS_PASSWORD"])
            assert url.password == expected, f"{name}.{key} = {value}"


def test_only_flower_and_the_api_are_published_and_on_loopback_unless_overridden(
        services: dict[str, Any]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"flower", "api"}
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]
    widened = compose.load({**SECRETS, "FLOWER_BIND_ADDR": "10.0.0.5", "FLOWER_HOST_PORT": "8555",
                            "API_BIND_ADDR": "10.0.0.6", "API_HOST_PORT": "8080"})["services"]
    assert widened["flower"]["ports"] == ["10.0.0.5:8555:5555"]
    assert widened["api"]["ports"] == ["10.0.0.6:8080:8000"]


def test_the_api_serves_with_its_tokens_and_is_checked_on_healthz(
        services: dict[str, Any]) -> None:
    api = services["api"]
    assert _command(api) == ["python", "-m", "mailbox", "serve"]
    env = api["environment"]
    assert env["MAILBOX_API_TOKENS"] == SECRETS["MAILBOX_API_TOKENS"]
    assert "MAILBOX_API_INSECURE_NO_AUTH" not in env
    assert (env["MAILBOX_API_HOST"], env["MAILBOX_API_PORT"]) == ("0.0.0.0", "8000")
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "MAILBOX_API_TOKENS" not in services["worker"]["environment"], \
        "only the API holds the tokens"


def test_redis_requires_a_password_and_never_evicts(services: dict[str, Any]) -> None:
    for name in REDIS_SERVICES:
        command = _command(services[name])
        assert _option(command, "--requirepass") == SECRETS["REDIS_PASSWORD"]
        assert _option(command, "--maxmemory-policy") == "noeviction"
        limit = _memory_limit(services[name])
        assert limit is not None, name
        assert 0 < _bytes(_option(command, "--maxmemory")) < _bytes(limit), \
            f"{name}: maxmemory must stay below the container's memory limit"
        assert services[name]["environment"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"], \
            "the health check must authenticate"


def test_the_broker_has_its_own_redis(services: dict[str, Any]) -> None:
    for name in ("migrate", "worker", "beat", "api"):
        env = services[name]["environment"]
        assert urlsplit(env["MAILBOX_REDIS_URL"]).hostname == "redis"
        assert urlsplit(env["CELERY_BROKER_URL"]).hostname == "redis-broker"
    flower_env = services["flower"]["environment"]
    assert urlsplit(flower_env["CELERY_BROKER_URL"]).hostname == "redis-broker"
    assert "MAILBOX_DATABASE_URL" not in flower_env, "Flower needs only the broker"


def test_every_service_is_pinned_restarted_checked_and_limited(
        services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "image" in service:
            assert PINNED_IMAGE.match(service["image"]), f"{name}: unpinned {service['image']}"
        else:
            assert service.get("build") == ".", name
        assert _memory_limit(service), f"{name}: no memory limit"
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            assert "healthcheck" not in service, name
            continue
        assert service.get("restart") == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name


def test_the_image_is_pinned_to_a_python_minor() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert bases and all(PINNED_IMAGE.match(base) for base in bases), bases


def test_services_start_in_order(services: dict[str, Any]) -> None:
    def waits_for(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert waits_for("migrate") == {"postgres": "service_healthy"}
    assert waits_for("worker") == {"migrate": "service_completed_successfully",
                                   "redis": "service_healthy",
                                   "redis-broker": "service_healthy"}
    assert waits_for("beat") == {"migrate": "service_completed_successfully",
                                 "redis-broker": "service_healthy"}
    assert waits_for("flower") == {"redis-broker": "service_healthy"}
    assert waits_for("api") == {"migrate": "service_completed_successfully",
                                "redis": "service_healthy",
                                "redis-broker": "service_healthy"}


def test_metrics_listen_beyond_loopback_only_where_prometheus_scrapes(
        services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.monitoring import metrics_addr

    assert services["worker"]["environment"]["MAILBOX_METRICS_ADDR"] == "0.0.0.0"
    assert not services["worker"].get("ports"), "metrics are never published on the host"
    monkeypatch.delenv("MAILBOX_METRICS_ADDR", raising=False)
    assert metrics_addr() == "127.0.0.1"
    monkeypatch.setenv("MAILBOX_METRICS_ADDR", "10.1.2.3")
    assert metrics_addr() == "10.1.2.3"


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    cases = {"${SET}": "x", "${UNSET}": "", "${UNSET:-d}": "d", "${EMPTY:-d}": "d",
             "${EMPTY-d}": "", "${SET:+alt}": "alt", "${EMPTY:+alt}": "", "$$SET": "$SET",
             "a${SET}b": "axb", "$SET": "x"}
    for written, expected in cases.items():
        assert compose.interpolate(written, env) == expected, written
    assert compose.interpolate("${EMPTY?fine}", env) == ""
    with pytest.raises(compose.MissingVariableError):
        compose.interpolate("${EMPTY:?no}", env)
    with pytest.raises(compose.MissingVariableError):
        compose.interpolate("${UNSET?no}", env)
