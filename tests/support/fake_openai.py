"""A small local server that speaks the chat-completions streaming protocol, for tests of
agents built on the `openai` package (examples/openai_chat.py) without the internet.

`POST /v1/chat/completions` with `"stream": true` answers as the real API does: HTTP/1.1,
chunked, `text/event-stream`, one `data: {chat.completion.chunk}` event per delta (the first
carrying the assistant role, the last the finish reason), then `data: [DONE]`. Errors are
`{"error": {"message", "type", "param", "code"}}` with the status and headers given.

What each request gets is scripted by the test, keyed by the text of the prompt's last user
message (`FakeOpenAI.script`): a `Stream` of tokens (optionally holding after some until the
test releases it), an `Echo` of the previous answer, an `Endless` stream, or a `Fail` (some
times, then another behaviour). Every request is recorded (`Recorded`): its body and
authorization, the status answered, how many tokens were sent, whether the stream finished,
and when the server saw the client go away in the middle of it — how a test proves that a
stopped agent closed its stream.

Requests are checked as the real API checks them: a message's role must be one the API
knows, its content text, and a `tool` message needs a `tool_call_id`; otherwise 400.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

T = TypeVar("T")
API_ROLES = ("system", "developer", "user", "assistant", "tool")
ENDLESS_LIMIT_S = 120.0  # an endless stream nobody stops still ends, the test long failed


@dataclass
class Stream:
    """Stream `tokens`, `delay_s` apart. With `hold_after` (and `release`), stop after that
    many tokens until the test sets `release` (at most 60 s): the run is still running while
    the test looks at what already reached the event stream."""

    tokens: list[str]
    delay_s: float = 0.02
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Echo:
    """Answer with the prompt's previous assistant message, `I said: …`, word by word: proof,
    in the answer itself, that the prompt carried the earlier turn."""

    delay_s: float = 0.01


@dataclass
class Endless:
    """`token` every `delay_s` until the client goes away (or ENDLESS_LIMIT_S)."""

    token: str = "tick "
    delay_s: float = 0.05


@dataclass
class Fail:
    """Answer `status` with the API's error body and `headers`; after `times` failures (None:
    always), behave as `then`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    headers: Mapping[str, str] = field(default_factory=dict)
    times: int | None = None
    then: Behaviour | None = None


Behaviour = Stream | Echo | Endless | Fail


@dataclass
class Recorded:
    """One request as the server saw it."""

    key: str
    body: dict[str, Any]
    authorization: str | None
    started_at: float  # time.monotonic()
    status: int = 0
    tokens_sent: list[str] = field(default_factory=list)
    finished: bool = False  # `data: [DONE]` was sent
    disconnected_at: float | None = None  # the client went away in the middle of the stream

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])


def words(text: str) -> list[str]:
    """Tokens as a model would stream them: each word with the space after it."""
    return re.findall(r"\S+\s*", text)


class FakeOpenAI:
    """The server: `with FakeOpenAI() as fake: fake.base_url` (http://127.0.0.1:<port>/v1)."""

    def __init__(self) -> None:
        self._scripts: dict[str, Behaviour] = {}
        self._failures: dict[str, int] = {}
        self._requests: list[Recorded] = []
        self._changed = threading.Condition()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # ----------------------------------------------------------------------- the test's side
    def script(self, prompt: str, behaviour: Behaviour) -> None:
        """How to answer requests whose last user message is `prompt`."""
        with self._changed:
            self._scripts[prompt] = behaviour

    def requests(self, prompt: str | None = None) -> list[Recorded]:
        with self._changed:
            return [r for r in self._requests if prompt is None or r.key == prompt]

    def wait_for(self, predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
        """Block until `predicate()` (called under the server's lock, after each change) is
        truthy; AssertionError naming `what` and listing the requests otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"  {r.key!r}: status {r.status}, {len(r.tokens_sent)} "
                                     f"tokens, finished={r.finished}, disconnected="
                                     f"{r.disconnected_at is not None}" for r in self._requests)
                    raise AssertionError(f"fake OpenAI server: timed out after {timeout_s}s "
                                         f"waiting for {what}; requests:\n{seen}")
                self._changed.wait(min(left, 0.1))

    # --------------------------------------------------------------------- the server's side
    def _behaviour(self, key: str) -> Behaviour:
        with self._changed:
            behaviour = self._scripts.get(key) or Stream(words(f"echo: {key}"))
            while isinstance(behaviour, Fail) and behaviour.times is not None:
                failed = self._failures.get(key, 0)
                if failed < behaviour.times:
                    self._failures[key] = failed + 1
                    break
                behaviour = behaviour.then or Stream(words(f"echo: {key}"))
            return behaviour

    def _record(self, request: Recorded) -> None:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def _update(self, change: Callable[[], None]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # keep-alive connections of killed workers never hold a shutdown
    fake: FakeOpenAI


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as the real API
    timeout = 60  # an idle keep-alive connection's thread ends
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found_error")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "the body is not JSON")
            return
        problem = _check(body)
        key = _last_user_text(body)
        recorded = Recorded(key=key, body=body if isinstance(body, dict) else {},
                            authorization=self.headers.get("Authorization"),
                            started_at=time.monotonic())
        fake = self.server.fake
        fake._record(recorded)
        behaviour: Behaviour = Fail(400, problem) if problem else fake._behaviour(key)
        if isinstance(behaviour, Fail):
            fake._update(lambda: setattr(recorded, "status", behaviour.status))
            self._error(behaviour.status, behaviour.message, behaviour.type, behaviour.headers)
            return
        fake._update(lambda: setattr(recorded, "status", 200))
        try:
            self._stream(recorded, _tokens(behaviour, body), str(body.get("model")))
        except _ClientGone:
            now = time.monotonic()
            fake._update(lambda: setattr(recorded, "disconnected_at", now))
            self.close_connection = True

    def _error(self, status: int, message: str, type_: str = "invalid_request_error",
               headers: Mapping[str, str] | None = None) -> None:
        payload = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                        "code": None}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, recorded: Recorded, tokens: Iterator[tuple[str, float]],
                model: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        completion_id = f"chatcmpl-{recorded.started_at:.6f}"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}

        fake = self.server.fake
        self._event(chunk({"role": "assistant", "content": ""}))
        for token, delay_s in tokens:
            self._sleep(delay_s)
            self._event(chunk({"content": token}))
            fake._update(lambda t=token: recorded.tokens_sent.append(t))  # type: ignore[misc]
        self._event(chunk({}, "stop"))
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")  # the last chunk of a chunked body
        fake._update(lambda: setattr(recorded, "finished", True))

    def _event(self, data: dict[str, Any]) -> None:
        self._send_chunk(f"data: {json.dumps(data)}\n\n".encode())

    def _send_chunk(self, data: bytes) -> None:
        if self._client_gone():
            raise _ClientGone()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:  # BrokenPipe, ConnectionReset
            raise _ClientGone() from exc

    def _sleep(self, seconds: float) -> None:
        """Wait between tokens, but notice a client that went away meanwhile at once."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.01))
            if readable and self._client_gone():
                raise _ClientGone()

    def _client_gone(self) -> bool:
        """The client closed its side (a read would return nothing) or reset it. A client
        never sends anything while it reads a stream, so readable means gone."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _tokens(behaviour: Behaviour, body: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(token, delay before it) for a streaming behaviour."""
    if isinstance(behaviour, Stream):
        for n, token in enumerate(behaviour.tokens):
            if behaviour.hold_after is not None and n == behaviour.hold_after:
                behaviour.release.wait(60)
            yield token, behaviour.delay_s
    elif isinstance(behaviour, Echo):
        earlier = [m.get("content") for m in body.get("messages", [])
                   if m.get("role") == "assistant"]
        for token in words(f"I said: {earlier[-1] if earlier else '(nothing)'}"):
            yield token, behaviour.delay_s
    elif isinstance(behaviour, Endless):
        deadline = time.monotonic() + ENDLESS_LIMIT_S
        while time.monotonic() < deadline:
            yield behaviour.token, behaviour.delay_s


def _check(body: Any) -> str | None:
    """What the real API would refuse in this request, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    if body.get("stream") is not True:
        return "this fake server only streams: set stream=true"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in API_ROLES:
            return f"Invalid value for 'messages[{i}].role'"
        if not isinstance(message.get("content"), str):
            return f"Invalid type for 'messages[{i}].content': expected a string"
        if message["role"] == "tool" and not message.get("tool_call_id"):
            return f"Missing required parameter: 'messages[{i}].tool_call_id'"
    return None


def _last_user_text(body: Any) -> str:
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content"))
    return ""
