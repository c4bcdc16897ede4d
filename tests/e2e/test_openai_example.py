"""The OpenAI example agent (examples/openai_chat.py) through real `celery worker` processes,
against the fake chat-completions server of tests/support/fake_openai.py (started here, on
127.0.0.1; no internet): the official `openai` package streams from it inside the workers.

- the tokens reach the run's event stream in order, while the run is still running;
- a second turn on the thread is prompted with the first turn's answer;
- a 429 is retried by the mailbox (one attempt spent), then the run completes;
- an interrupt closes the HTTP stream within a second, the run ends cancelled, and the
  newer message's prompt holds no partial answer;
- a 400 dead-letters at once (no retry), with the status and the API's message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import examples.openai_chat  # noqa: F401  (the agent, for submit)
from mailbox import DispatchStatus, Mailbox, RunStatus
from tasks import dispatch
from tests.support.e2e_helpers import events_of, wait_until, worker_logs
from tests.support.fake_openai import Echo, Endless, Fail, FakeOpenAI, Stream
from tests.support.workers import Stack

AGENT = "openai_chat"
SYSTEM_PROMPT = "You are a test double's audience."
STOP_WITHIN_S = 1.0  # interrupt → the server sees the stream closed (measured: ~0.1-0.2 s)
pytestmark = pytest.mark.stack_env(MAILBOX_AGENT_MODULES="examples.openai_chat")


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def worker(fake: FakeOpenAI, celery_stack: Stack, publisher: Mailbox) -> Stack:
    """One prefork worker (two processes) whose agents talk to the fake server. The fake is
    set up first, so it outlives the workers."""
    celery_stack.start_worker(
        concurrency=2, OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key",
        OPENAI_MODEL="test-model", OPENAI_SYSTEM_PROMPT=SYSTEM_PROMPT,
        NO_PROXY="127.0.0.1,localhost")
    return celery_stack


def outputs(box: Mailbox, run_id: str, kind: str) -> list[Any]:
    return [e.data["data"] for e in events_of(box, run_id, "output")
            if e.data.get("kind") == kind]


def tokens(box: Mailbox, run_id: str) -> list[str]:
    return [d["text"] for d in outputs(box, run_id, "token")]


def run_of(box: Mailbox, dispatch_id: str) -> str:
    row = box.get_dispatch(dispatch_id)
    assert row is not None
    return row.run_id


def wait_tokens(box: Mailbox, run_id: str, count: int, stack: Stack) -> list[str]:
    """The run's tokens once at least `count` are on its event stream."""
    def enough() -> list[str] | None:
        found = tokens(box, run_id)
        return found if len(found) >= count else None

    return wait_until(enough, 30, f"{count} tokens of run {run_id}", stack)


def test_tokens_stream_in_order_and_the_next_turn_sees_the_answer(
        fake: FakeOpenAI, worker: Stack, publisher: Mailbox) -> None:
    story = ["Once", " upon", " a", " time", ",", " a", " mailbox", "."]
    held = Stream(story, delay_s=0.02, hold_after=3)
    fake.script("Tell me a story.", held)
    fake.script("What did you just say?", Echo())

    first = dispatch.delay("chat-1", AGENT, "Tell me a story.")
    # Streaming, not batched at the end: the first tokens are on the run's stream while the
    # server still holds the rest back and the run is running.
    assert wait_tokens(publisher, run_of(publisher, first.id), 3, worker) == story[:3]
    running = publisher.get_dispatch(first.id)
    assert running is not None and running.run_status == RunStatus.running
    held.release.set()

    final = publisher.wait(first.id, timeout_s=60)
    assert final.status == DispatchStatus.Acked, worker_logs(worker)
    assert final.run_response == "".join(story)
    assert tokens(publisher, final.run_id) == story
    assert outputs(publisher, final.run_id, "start") == [{"attempt": 0, "model": "test-model"}]
    [request] = fake.requests("Tell me a story.")
    assert request.authorization == "Bearer test-key"
    assert request.body["model"] == "test-model" and request.body["stream"] is True
    assert request.messages == [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": "Tell me a story."}]

    second = dispatch.delay("chat-1", AGENT, "What did you just say?")
    final2 = publisher.wait(second.id, timeout_s=60)
    assert final2.status == DispatchStatus.Acked, worker_logs(worker)
    assert final2.run_response == "I said: Once upon a time, a mailbox."
    [request2] = fake.requests("What did you just say?")
    assert request2.messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time, a mailbox."},
        {"role": "user", "content": "What did you just say?"}]


def test_a_rate_limit_is_retried_by_the_mailbox(fake: FakeOpenAI, worker: Stack,
                                                publisher: Mailbox) -> None:
    fake.script("Are you busy?", Fail(429, "Rate limit reached for test-model", "requests",
                                      headers={"Retry-After": "0"}, times=1,
                                      then=Stream(["Not", " any", " more"])))
    fake.script("Still there?", Fail(503, "The engine is currently overloaded", "server_error",
                                     times=1, then=Stream(["Yes"])))
    cases = [("Are you busy?", 429, ["Not", " any", " more"]), ("Still there?", 503, ["Yes"])]
    receipts = [dispatch.delay(f"chat-{status}", AGENT, prompt) for prompt, status, _ in cases]

    for receipt, (prompt, status, answer) in zip(receipts, cases, strict=True):
        final = publisher.wait(receipt.id, timeout_s=60)
        assert final.status == DispatchStatus.Acked, worker_logs(worker)
        assert final.attempt_count == 1  # the failed attempt, counted
        assert final.run_response == "".join(answer)
        assert [r.status for r in fake.requests(prompt)] == [status, 200]
        # Each attempt announces itself: a reader restarts the answer at the second start.
        assert [s["attempt"] for s in outputs(publisher, final.run_id, "start")] == [0, 1]
        assert tokens(publisher, final.run_id) == answer


def test_an_interrupt_closes_the_stream_and_the_newer_turn_runs(
        fake: FakeOpenAI, worker: Stack, publisher: Mailbox) -> None:
    fake.script("Count forever.", Endless(token="tick ", delay_s=0.05))
    fake.script("Stop. Say hi.", Stream(["Hi", "!"]))
    endless = dispatch.delay("chat-int", AGENT, "Count forever.")
    wait_tokens(publisher, run_of(publisher, endless.id), 3, worker)  # the stream flows

    interrupted_at = time.monotonic()
    newer = dispatch.delay("chat-int", AGENT, "Stop. Say hi.", interrupt=True)
    [request] = fake.wait_for(lambda: [r for r in fake.requests("Count forever.")
                                       if r.disconnected_at is not None], 30,
                              "the endless stream to be closed")
    assert request.disconnected_at is not None and not request.finished
    latency = request.disconnected_at - interrupted_at
    assert latency < STOP_WITHIN_S, f"the stream was closed {latency:.2f}s after the interrupt"

    stopped = publisher.wait(endless.id, timeout_s=30)
    assert stopped.status == DispatchStatus.Superseded, stopped
    run = publisher.get_run(stopped.run_id)
    assert run is not None and run.termination is not None
    assert run.termination.type == "cancelled"
    sent = len(request.tokens_sent)
    time.sleep(0.3)
    assert len(fake.requests("Count forever.")[0].tokens_sent) == sent  # nothing after

    final = publisher.wait(newer.id, timeout_s=60)
    assert final.status == DispatchStatus.Acked and final.run_response == "Hi!"
    [request2] = fake.requests("Stop. Say hi.")
    # The cancelled run left its input in the conversation, and no partial answer.
    assert request2.messages == [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": "Count forever."},
                                 {"role": "user", "content": "Stop. Say hi."}]


def test_a_bad_request_is_dead_lettered_with_the_api_message(
        fake: FakeOpenAI, worker: Stack, publisher: Mailbox) -> None:
    fake.script("Be wrong.", Fail(400, "Invalid value for 'model': 'test-model' is not "
                                       "supported with this endpoint."))
    receipt = dispatch.delay("chat-400", AGENT, "Be wrong.", max_attempts=5)
    final = publisher.wait(receipt.id, timeout_s=60)
    assert final.status == DispatchStatus.DeadLetter, worker_logs(worker)
    # No retry (the same request fails the same way): one request, and a permanent failure
    # leaves the attempt count as it was (T9).
    assert final.attempt_count == 0
    assert final.last_error is not None
    assert "400 BadRequestError" in final.last_error
    assert "Invalid value for 'model'" in final.last_error
    assert [r.status for r in fake.requests("Be wrong.")] == [400]
