"""The OpenAI example agent's own logic (examples/openai_chat.py), without the mailbox's
services: the prompt it builds from a conversation, how it classifies the SDK's errors, its
configuration, and one turn run in this process against the fake chat-completions server
(tests/support/fake_openai.py): tokens emitted in order, a cancelled turn closing its
stream, errors as the mailbox needs them. The same through real workers:
tests/e2e/test_openai_example.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from examples import openai_chat
from examples.openai_chat import (
    LOCAL_PLACEHOLDER_KEY,
    Config,
    agent_error,
    chat_messages,
    check_input,
)
from mailbox import PermanentError, TransientError, ValidationError
from mailbox.agents import AgentContext
from mailbox.store import Message
from tests.support.fake_openai import Endless, Fail, FakeOpenAI, Stream

CONFIG = Config(base_url="http://127.0.0.1:9/v1", api_key="k", model="m", system_prompt=None,
                timeout_s=5.0, max_retries=0)


def message(seq: int, role: str, content: Any) -> Message:
    return Message(thread_id="t", seq=seq, message_id=f"m{seq}", run_id=f"r{seq}", role=role,
                   content=content, created_at=seq)


# --------------------------------------------------------------------------- role mapping
def test_conversation_roles_map_to_valid_chat_messages() -> None:
    conversation = [
        message(1, "user", "Deploy the release?"),
        message(2, "assistant", {"tool_call": "check_ci"}),
        message(3, "tool", {"ci": "green"}),
        message(4, "system", "Only answer yes or no."),
        message(5, "decision", "approved"),
        message(6, "assistant", "Deployed."),
        message(7, "user", "Thanks"),
        message(8, "critic", None),
    ]
    assert chat_messages(conversation, "You are terse.") == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Deploy the release?"},
        {"role": "assistant", "content": '{"tool_call": "check_ci"}'},
        {"role": "user", "content": '[tool result] {"ci": "green"}'},
        {"role": "system", "content": "Only answer yes or no."},
        {"role": "user", "content": "[decision] approved"},
        {"role": "assistant", "content": "Deployed."},
        {"role": "user", "content": "Thanks"},
        {"role": "user", "content": "[critic] "},
    ]


def test_no_system_prompt_and_unicode_kept() -> None:
    assert chat_messages([message(1, "user", {"texte": "déjà vu"})]) == [
        {"role": "user", "content": '{"texte": "déjà vu"}'}]


# ---------------------------------------------------------------------- classification
REQUEST = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def status_error(cls: type[openai.APIStatusError], status: int, message: str,
                 headers: dict[str, str] | None = None) -> openai.APIStatusError:
    body = {"message": message, "type": "x", "param": None, "code": None}
    response = httpx2.Response(status, headers=headers, json={"error": body}, request=REQUEST)
    return cls(f"Error code: {status} - {message}", response=response, body=body)


@pytest.mark.parametrize(("error", "expected", "words"), [
    (status_error(openai.RateLimitError, 429, "Rate limit reached", {"retry-after": "7"}),
     TransientError, ["429", "RateLimitError", "Rate limit reached", "retry-after: 7 s"]),
    (status_error(openai.InternalServerError, 500, "The server had an error"),
     TransientError, ["500", "The server had an error"]),
    (status_error(openai.InternalServerError, 503, "Overloaded"), TransientError, ["503"]),
    (status_error(openai.APIStatusError, 408, "Request timeout"), TransientError, ["408"]),
    (status_error(openai.ConflictError, 409, "Try again"), TransientError, ["409"]),
    (openai.APITimeoutError(request=REQUEST), TransientError, ["timed out", "5 s"]),
    (openai.APIConnectionError(request=REQUEST), TransientError, ["cannot reach"]),
    (openai.APIError("An error occurred during streaming", REQUEST,
                     body={"message": "server_error mid-stream"}),
     TransientError, ["stream", "server_error mid-stream"]),
    (status_error(openai.BadRequestError, 400, "Invalid value for 'messages'"),
     PermanentError, ["400", "BadRequestError", "Invalid value for 'messages'", "'m'"]),
    (status_error(openai.AuthenticationError, 401, "Incorrect API key provided"),
     PermanentError, ["401", "Incorrect API key provided"]),
    (status_error(openai.PermissionDeniedError, 403, "Not allowed"), PermanentError, ["403"]),
    (status_error(openai.NotFoundError, 404, "The model `m` does not exist"),
     PermanentError, ["404", "does not exist"]),
    (status_error(openai.UnprocessableEntityError, 422, "Unprocessable"),
     PermanentError, ["422"]),
    (openai.OpenAIError("Missing credentials"), PermanentError, ["Missing credentials"]),
])
def test_sdk_errors_are_classified(error: openai.OpenAIError, expected: type[Exception],
                                   words: list[str]) -> None:
    """Rate limits, 5xx, timeouts and lost connections are worth a retry; a request the API
    refuses (4xx) is not: the dead letter names the status and the API's message."""
    classified = agent_error(error, CONFIG)
    assert type(classified) is expected
    for word in words:
        assert word in str(classified), (word, str(classified))


# ------------------------------------------------------------------------ configuration
def test_configuration_from_the_environment() -> None:
    config = Config.from_env({"OPENAI_API_KEY": "sk-1"})
    assert (config.base_url, config.api_key, config.model, config.system_prompt,
            config.max_retries) == (None, "sk-1", "gpt-4o-mini", None, 0)
    local = Config.from_env({"OPENAI_BASE_URL": "http://localhost:11434/v1",
                             "OPENAI_MODEL": "llama3", "OPENAI_TIMEOUT_S": "2.5",
                             "OPENAI_MAX_RETRIES": "1", "OPENAI_SYSTEM_PROMPT": "Be brief."})
    assert (local.api_key, local.model, local.timeout_s, local.max_retries,
            local.system_prompt) == (LOCAL_PLACEHOLDER_KEY, "llama3", 2.5, 1, "Be brief.")


@pytest.mark.parametrize(("env", "words"), [
    ({}, ["OPENAI_API_KEY is not set", "the OpenAI API"]),
    ({"OPENAI_BASE_URL": "https://llm.example.com/v1"}, ["OPENAI_API_KEY", "llm.example.com"]),
    ({"OPENAI_API_KEY": "k", "OPENAI_TIMEOUT_S": "soon"}, ["OPENAI_TIMEOUT_S", "'soon'"]),
    ({"OPENAI_API_KEY": "k", "OPENAI_TIMEOUT_S": "0"}, ["OPENAI_TIMEOUT_S"]),
    ({"OPENAI_API_KEY": "k", "OPENAI_MAX_RETRIES": "-1"}, ["OPENAI_MAX_RETRIES"]),
])
def test_a_misconfigured_worker_fails_permanently_saying_what_to_set(
        env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(PermanentError) as raised:
        Config.from_env(env)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_an_empty_turn_is_refused_at_submit(bad: Any) -> None:
    with pytest.raises(ValidationError):
        check_input(bad)
    check_input("hi")
    check_input({"text": "hi"})


# ---------------------------------------------- one turn in this process, fake server
@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "unit-key")
        monkeypatch.setenv("OPENAI_MODEL", "unit-model")
        monkeypatch.delenv("OPENAI_SYSTEM_PROMPT", raising=False)
        yield server


class Turn:
    """A context as the execute phase makes one, its emits collected."""

    def __init__(self, text: str, history: list[Message] | None = None) -> None:
        self.emitted: list[tuple[str, Any]] = []
        conversation = [*(history or []), message(99, "user", text)]
        self.ctx = AgentContext(run_id="r", thread_id="t", dispatch_id="d", attempt=0,
                                input=text, decision=None, load_messages=lambda: conversation,
                                emit=lambda t, d: self.emitted.append((t, d)),
                                cancel_event=threading.Event())

    @property
    def tokens(self) -> list[str]:
        return [d["data"]["text"] for t, d in self.emitted if d["kind"] == "token"]


def test_a_turn_streams_its_tokens_and_returns_the_answer(fake: FakeOpenAI) -> None:
    fake.script("Hi", Stream(["Hel", "lo", " there", "!"]))
    turn = Turn("Hi", [message(1, "user", "Before"), message(2, "assistant", "Earlier")])
    answer = asyncio.run(openai_chat.openai_chat(turn.ctx))
    assert answer == "Hello there!"
    assert turn.tokens == ["Hel", "lo", " there", "!"]
    assert turn.emitted[0] == ("output", {"kind": "start",
                                          "data": {"attempt": 0, "model": "unit-model"}})
    [request] = fake.requests("Hi")
    assert request.authorization == "Bearer unit-key"
    assert request.body["model"] == "unit-model" and request.body["stream"] is True
    assert request.messages == [{"role": "user", "content": "Before"},
                                {"role": "assistant", "content": "Earlier"},
                                {"role": "user", "content": "Hi"}]


def test_a_cancelled_turn_closes_its_stream_at_once(fake: FakeOpenAI) -> None:
    fake.script("Forever", Endless(delay_s=0.02))
    turn = Turn("Forever")

    async def run_then_cancel() -> float:
        task = asyncio.ensure_future(openai_chat.openai_chat(turn.ctx))
        while len(turn.tokens) < 3:
            await asyncio.sleep(0.01)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # the cancellation goes on up: the mailbox ends the run cancelled
        return cancelled_at

    cancelled_at = asyncio.run(run_then_cancel())
    [request] = fake.wait_for(
        lambda: [r for r in fake.requests("Forever") if r.disconnected_at is not None], 5,
        "the server to see the client go")
    assert request.disconnected_at is not None
    assert request.disconnected_at - cancelled_at < 1.0
    assert not request.finished


def test_api_errors_reach_the_mailbox_classified(fake: FakeOpenAI) -> None:
    fake.script("Busy", Fail(429, "Rate limit reached for unit-model", "requests",
                             headers={"Retry-After": "1"}))
    fake.script("Bad", Fail(400, "Invalid value for 'temperature'"))
    with pytest.raises(TransientError, match=r"429 .*Rate limit reached.*retry-after: 1 s"):
        asyncio.run(openai_chat.openai_chat(Turn("Busy").ctx))
    with pytest.raises(PermanentError, match=r"400 BadRequestError .*'temperature'"):
        asyncio.run(openai_chat.openai_chat(Turn("Bad").ctx))
    assert [r.status for r in fake.requests()] == [429, 400]  # the SDK retried nothing


def test_an_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI() as server:
        url = server.base_url  # a port nobody listens on once the server is gone
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "unit-key")
    with pytest.raises(TransientError, match="cannot reach"):
        asyncio.run(openai_chat.openai_chat(Turn("Anyone?").ctx))
