"""A multi-turn chat agent on any OpenAI-compatible endpoint, streaming its answer.

It uses the official `openai` package (`pip install '.[openai]'`): an async client, a chat
completion with `stream=True`, every delta forwarded to the run's event stream as it arrives
(`output` events `{"kind": "token", "data": {"text": ...}}`), the full answer returned (the
mailbox writes it into the thread as the assistant's message, so the next turn sees it).

    MAILBOX_AGENT_MODULES=examples.openai_chat OPENAI_API_KEY=sk-... \
        celery -A tasks worker -c 4
    dispatch.delay("thread-42", "openai_chat", "What is a mailbox?")

Configuration, from the environment:

| variable | default | meaning |
|---|---|---|
| `OPENAI_BASE_URL` | OpenAI's API | any compatible server: vLLM, Ollama, llama.cpp, a proxy |
| `OPENAI_API_KEY` | required, except for a server on this machine | the bearer key |
| `OPENAI_MODEL` | `gpt-4o-mini` | the model name the server knows |
| `OPENAI_SYSTEM_PROMPT` | none | sent first on every turn |
| `OPENAI_TIMEOUT_S` | 120 | connect, and longest silence within a stream |
| `OPENAI_MAX_RETRIES` | 0 | retries inside one attempt by the SDK itself (see below) |

What the mailbox gives it, and why it is written the way it is:

- The prompt is the thread's conversation (`ctx.messages`, this run's input last), mapped to
  chat roles by `chat_messages`: roles the chat API has no plain form for are folded into
  user text with a marker, so every request is valid for any compatible server.
- A stop (interrupt, cancel, lost lease, time limit) cancels the coroutine: the
  `asyncio.CancelledError` arrives at the stream's next await, `async with stream` closes the
  HTTP response (the server sees the connection go, and stops generating and billing), and
  the error goes on up: the mailbox ends the run cancelled.
- Failures are classified for the mailbox (`agent_error`): rate limits, timeouts, lost
  connections and 5xx are `TransientError` (retried with the mailbox's backoff, durably and
  counted against the dispatch's attempts); other 4xx answers are `PermanentError` (the
  dispatch is dead-lettered with the status and the API's message: the same request would
  fail the same way). That is why the SDK's own retries are off by default: they would
  retry inside one attempt, holding the thread, out of the mailbox's sight, multiplying its
  budget.
- One client per process and event loop (`client_for`): the agent loop lives as long as the
  worker process, so the client's connection pool is reused from run to run.
- Each attempt begins with an output `{"kind": "start", "data": {"attempt": n, ...}}`: an
  attempt that failed half-way was retried from the start, and a reader of the stream
  drops what it had shown of the earlier attempt when it sees the next `start`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from mailbox import PermanentError, TransientError, ValidationError, agent
from mailbox.agents import AgentContext

try:
    import openai
    from openai.types.chat import ChatCompletionMessageParam
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(f"examples.openai_chat needs the openai package: pip install "
                      f"'.[openai]' ({exc})") from exc

AGENT = "openai_chat"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT_S = 120.0
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
LOCAL_PLACEHOLDER_KEY = "local-server-needs-no-key"
"""The SDK refuses to start without a key; a server on this machine usually checks none."""

# Statuses worth another attempt besides 429 and 5xx: the SDK's own retry rule counts a
# request timeout (408) and a lock conflict (409) as passing hiccups too.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Config:
    base_url: str | None
    api_key: str
    model: str
    system_prompt: str | None
    timeout_s: float
    max_retries: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """The configuration, or PermanentError saying what to set: a misconfigured worker
        fails every run the same way, so retrying would only delay the dead letter that
        tells the operator."""
        base_url = env.get("OPENAI_BASE_URL") or None
        api_key = env.get("OPENAI_API_KEY") or ""
        if not api_key:
            if base_url is None or urlsplit(base_url).hostname not in LOCAL_HOSTS:
                raise PermanentError(
                    f"{AGENT}: OPENAI_API_KEY is not set (the endpoint is "
                    f"{base_url or 'the OpenAI API'}): set it in the workers' environment")
            api_key = LOCAL_PLACEHOLDER_KEY
        return cls(base_url=base_url, api_key=api_key,
                   model=env.get("OPENAI_MODEL") or DEFAULT_MODEL,
                   system_prompt=env.get("OPENAI_SYSTEM_PROMPT") or None,
                   timeout_s=_number(env, "OPENAI_TIMEOUT_S", DEFAULT_TIMEOUT_S,
                                     minimum=0.001),
                   max_retries=int(_number(env, "OPENAI_MAX_RETRIES", 0, integer=True,
                                           minimum=0)))

    @property
    def endpoint(self) -> str:
        return self.base_url or "the OpenAI API"


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool = False,
            minimum: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value: float | None = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # (NaN is not >= anything)
        kind = "a whole number" if integer else "a number"
        raise PermanentError(f"{AGENT}: {name} must be {kind} of at least {minimum:g}, "
                             f"got {raw!r}")
    return value


class Turn(Protocol):
    """What the prompt needs of a message of the conversation (mailbox's `Message`)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> Any: ...


# Roles of the conversation that have no plain chat-completions form: a human's decision
# (answering a suspension) and a tool result (the API's `tool` role needs the `tool_call_id`
# of an assistant message that asked for it, which a folded history does not have). They
# are told to the model as user text, marked, which every compatible server accepts.
FOLDED_ROLES = {"decision": "[decision]", "tool": "[tool result]"}


def chat_messages(conversation: Sequence[Turn], system_prompt: str | None = None
                  ) -> list[ChatCompletionMessageParam]:
    """The chat-completions prompt for a conversation, oldest first: user, assistant and
    system messages as they are; decisions and tool results as marked user messages (see
    FOLDED_ROLES), any other role likewise, `[role]`. JSON content becomes its JSON text."""
    prompt: list[ChatCompletionMessageParam] = []
    if system_prompt:
        prompt.append({"role": "system", "content": system_prompt})
    for turn in conversation:
        text = content_text(turn.content)
        if turn.role == "user":
            prompt.append({"role": "user", "content": text})
        elif turn.role == "assistant":
            prompt.append({"role": "assistant", "content": text})
        elif turn.role == "system":
            prompt.append({"role": "system", "content": text})
        else:
            marker = FOLDED_ROLES.get(turn.role, f"[{turn.role}]")
            prompt.append({"role": "user", "content": f"{marker} {text}"})
    return prompt


def content_text(content: Any) -> str:
    """A message's content as the model reads it: text as it is, other JSON as its text."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return json.dumps(content, ensure_ascii=False, default=str)


def api_message(error: openai.APIError) -> str:
    """The API's own words (`{"error": {"message": ...}}`), else what the SDK said."""
    body = error.body
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return error.message


def agent_error(error: openai.OpenAIError, config: Config) -> TransientError | PermanentError:
    """How the mailbox should treat an SDK error: retry (the provider is busy, slow,
    unreachable or failing) or dead-letter (the request itself is wrong: a bad model name,
    a bad key, a prompt too long — every retry would be refused the same way)."""
    where = f"{config.endpoint} (model {config.model!r})"
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        what = f"{status} {type(error).__name__} from {where}: {api_message(error)}"
        if status in RETRYABLE_STATUSES or status >= 500:
            retry_after = error.response.headers.get("retry-after")
            hint = f" (retry-after: {retry_after} s)" if retry_after else ""
            return TransientError(f"{what}{hint}")
        return PermanentError(what)
    if isinstance(error, openai.APITimeoutError):
        return TransientError(f"{where} timed out: nothing for {config.timeout_s:g} s "
                              f"(OPENAI_TIMEOUT_S)")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        return TransientError(f"cannot reach {where}: {error.message}"
                              + (f" ({type(cause).__name__}: {cause})" if cause else ""))
    if isinstance(error, openai.APIResponseValidationError):
        return PermanentError(f"{where} answered something that is not the chat API: "
                              f"{error.message}")
    if isinstance(error, openai.APIError):  # an error event in the middle of the stream
        return TransientError(f"the stream from {where} failed: {api_message(error)}")
    return PermanentError(f"{AGENT}: the openai client refused: {error}")


_clients: dict[asyncio.AbstractEventLoop, tuple[Config, openai.AsyncOpenAI]] = {}


async def client_for(config: Config) -> openai.AsyncOpenAI:
    """The process's client for this event loop. A client's connections belong to the loop
    that opened them, and the mailbox runs every async agent of a process on one loop that
    lives as long as the process: one client per loop is one per process, its connection
    pool kept warm from run to run. A changed configuration gets a new client."""
    loop = asyncio.get_running_loop()
    cached = _clients.get(loop)
    if cached is not None and cached[0] == config:
        return cached[1]
    for other in [other for other in _clients if other.is_closed()]:
        del _clients[other]  # a loop that ended (a test's asyncio.run): its client with it
    client = openai.AsyncOpenAI(api_key=config.api_key, base_url=config.base_url,
                                timeout=config.timeout_s, max_retries=config.max_retries)
    _clients[loop] = (config, client)
    if cached is not None:
        await cached[1].close()
    return client


def check_input(value: Any) -> None:
    """Refused at submit, before anything is written: a turn without a message."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValidationError(f"{AGENT}: the input is the user's message, got {value!r}")


@agent(AGENT, version="1", check_input=check_input)
async def openai_chat(ctx: AgentContext) -> str:
    """One turn: the conversation so far as the prompt, the answer streamed token by token
    onto the run's event stream, the full answer returned."""
    config = Config.from_env(os.environ)
    # ctx.messages reads the database on first use: off the loop, which other runs share.
    conversation = await asyncio.to_thread(lambda: ctx.messages)
    prompt = chat_messages(conversation, config.system_prompt)
    client = await client_for(config)
    ctx.emit("start", {"attempt": ctx.attempt, "model": config.model})
    answer: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=config.model, messages=prompt, stream=True)
        async with stream:  # closes the response however the loop ends, a stop included
            async for chunk in stream:
                for choice in chunk.choices:
                    text = choice.delta.content if choice.index == 0 else None
                    if text:
                        answer.append(text)
                        ctx.emit("token", {"text": text})
    except openai.OpenAIError as exc:
        raise agent_error(exc, config) from exc
    return "".join(answer)
