"""`make demo`: start the dev stack, push a realistic workload through `dispatch.delay()`, show
what happened, and say where to look next.

The workload: ordinary chat threads with mixed priorities, a conversation of several turns
with an async streaming agent that answers from what was said before, a flaky agent that
recovers, a permanent failure that dead-letters, a user who interrupts a long run with a
newer message, and a run that waits for a human decision and is resumed. Celery is imported
lazily: this module is an application of the mailbox, like any caller of `dispatch.delay()`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mailbox.dev.stack import DevStack
from mailbox.model import DispatchStatus, RunStatus

console = Console()


CONVERSATION = "chat-conversation"
CONVERSATION_TURNS = ("hi, I am planning a trip to Lisbon", "I would like to go in May",
                      "what did I tell you so far?")


def _workload() -> list[tuple[str, str, Any, dict[str, Any]]]:
    jobs: list[tuple[str, str, Any, dict[str, Any]]] = []
    for t in range(1, 7):
        for m in range(1, 6):
            jobs.append((f"chat-{t}", "echo", f"message {m} on chat {t}",
                         {"priority": 64 if m == 5 else 128}))
    jobs.append(("chat-flaky", "flaky", {"fail_times": 2}, {}))
    jobs.append(("chat-broken", "fail", "this cannot work", {}))
    jobs.append(("chat-busy", "sleep", {"ms": 400}, {}))
    return jobs


def run(keep_running: bool | None = None) -> int:
    stack = DevStack(concurrency=2)
    console.rule("[bold]Dispatch Mailbox demo")
    try:
        stack.start(say=lambda line: console.print(f"  {line}"))
        os.environ.update({k: stack.env[k] for k in ("MAILBOX_REDIS_URL", "CELERY_BROKER_URL",
                                                     "MAILBOX_DATABASE_URL")})
        from tasks import dispatch
        from tasks.runtime import mailbox

        box = mailbox()
        ids: dict[str, str] = {}
        started = time.time()
        for thread, agent, payload, options in _workload():
            result = dispatch.delay(thread, agent, payload, **options)
            ids[result.id] = agent
        # A conversation: three turns queued at once run in order, each seeing the ones before.
        turns = [dispatch.delay(CONVERSATION, "chat", text) for text in CONVERSATION_TURNS]
        ids.update({turn.id: "chat" for turn in turns})
        # A long run, then the user changes their mind: the newer message wins.
        long_run = dispatch.delay("chat-interrupt", "sleep", {"ms": 30_000})
        ids[long_run.id] = "sleep"
        _wait_running(box, long_run.id, 30)
        newer = dispatch.delay("chat-interrupt", "echo", "actually, do this instead",
                               interrupt=True)
        ids[newer.id] = "echo"
        # A run that needs a human decision, then the decision.
        ask = dispatch.delay("chat-approval", "ask", "deploy to production?")
        ids[ask.id] = "ask"
        _wait_status(box, ask.id, DispatchStatus.Acked, 15)
        ask_run = box.get_dispatch(ask.id)
        assert ask_run is not None
        resumed = box.resume(ask_run.run_id, "approved by alice")  # publishes its wake-up
        ids[resumed.dispatch_id] = "ask"

        _progress(box, list(ids), started)
        _summary(box, ids, ask_run.run_id, long_run.id, time.time() - started)
        _conversation(box, turns[-1].id)
        _next_steps(stack)
        interactive = sys.stdin.isatty() and not os.environ.get("DEMO_EXIT")
        if keep_running if keep_running is not None else interactive:
            console.print("\nThe stack keeps running: press [bold]Ctrl-C[/] to stop it.")
            stack.wait_forever()
        return 0
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    finally:
        stack.stop()
        console.print("stack stopped")


def _wait_status(box: Any, dispatch_id: str, status: DispatchStatus, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = box.get_dispatch(dispatch_id)
        if current is not None and (current.status == status or current.is_terminal):
            return
        time.sleep(0.05)
    raise TimeoutError(f"dispatch {dispatch_id} did not reach {status.value}")


def _wait_running(box: Any, dispatch_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = box.get_dispatch(dispatch_id)
        if current is not None and current.run_status == RunStatus.running:
            return
        time.sleep(0.05)
    raise TimeoutError(f"dispatch {dispatch_id} did not start running")


def _progress(box: Any, ids: list[str], started: float) -> None:
    with Progress(TextColumn("  settling dispatches"), BarColumn(), TextColumn("{task.completed}"
                  "/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("settle", total=len(ids))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = sum(1 for i in ids if (d := box.get_dispatch(i)) is not None and d.is_terminal)
            progress.update(bar, completed=done)
            if done == len(ids):
                return
            time.sleep(0.1)
    raise TimeoutError("the workload did not settle within 120 s; see var/log/worker.log")


def _summary(box: Any, ids: dict[str, str], ask_run_id: str, interrupted_id: str,
             elapsed: float) -> None:
    dispatches = [d for i in ids if (d := box.get_dispatch(i)) is not None]
    by_status: dict[str, int] = {}
    by_agent: dict[tuple[str, str], int] = {}
    latencies = []
    for d in dispatches:
        by_status[d.status.value] = by_status.get(d.status.value, 0) + 1
        key = (ids[d.dispatch_id], d.status.value)
        by_agent[key] = by_agent.get(key, 0) + 1
        if d.status == DispatchStatus.Acked and d.completed_at:
            latencies.append(d.completed_at - d.created_at)
    table = Table(title=f"{len(dispatches)} dispatches in {elapsed:.1f}s")
    table.add_column("agent")
    table.add_column("status")
    table.add_column("count", justify="right")
    for (agent, status), n in sorted(by_agent.items()):
        table.add_row(agent, status, str(n))
    console.print(table)
    totals = ", ".join(f"{s} {n}" for s, n in sorted(by_status.items()))
    console.print(f"  by status: {totals}")
    if latencies:
        q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
        console.print(f"  submit→settled latency (acked): p50 {statistics.median(latencies):.0f}"
                      f" ms, p95 {q[18]:.0f} ms")
    ask_run = box.get_run(ask_run_id)
    interrupted = box.get_dispatch(interrupted_id)
    dead = box.dead_letters(limit=5)
    if ask_run is not None:
        console.print(f"  human in the loop: run {ask_run.run_id[:13]}… "
                      f"{ask_run.status.value}, response {ask_run.response!r}")
    if interrupted is not None:
        console.print(f"  interrupted long run: {interrupted.status.value} "
                      f"({interrupted.last_error})")
    for d in dead:
        console.print(f"  dead letter: {d.dispatch_id[:13]}… on {d.thread_id}: {d.last_error}")
    assert ask_run is None or ask_run.status == RunStatus.done


def _conversation(box: Any, last_dispatch_id: str) -> None:
    """The multi-turn thread as the agent left it, and how many tokens its last turn
    streamed on the run's event stream."""
    table = Table(title=f"conversation on {CONVERSATION} (agent: chat, async, streaming)")
    table.add_column("role")
    table.add_column("content", overflow="fold")
    for message in box.thread_messages(CONVERSATION, limit=20):
        table.add_row(message.role, str(message.content))
    console.print(table)
    last = box.get_dispatch(last_dispatch_id)
    if last is not None:
        tokens = [e for e in box.events.read(last.run_id)
                  if e.type == "output" and isinstance(e.data, dict)
                  and e.data.get("kind") == "token"]
        console.print(f"  the last turn streamed {len(tokens)} tokens "
                      f"(python -m mailbox follow {last.run_id})")


def _next_steps(stack: DevStack) -> None:
    urls = stack.urls()
    console.print("\n[bold]Where to look next")
    console.print(f"  Dashboard:                  {urls['dashboard']}   (log in with the "
                  f"API token)")
    console.print(f"  HTTP API:                   {urls['api']}   (OpenAPI: {urls['api_docs']})")
    token = stack.api_token if stack.api_token_generated else "<one of MAILBOX_API_TOKENS>"
    console.print(f"  API token:                  {token}")
    console.print(f"  Flower (every phase task):  {urls['flower']}")
    console.print(f"  Prometheus metrics:         {urls['metrics']}")
    console.print(f"  CLI:  python -m mailbox stats | thread {CONVERSATION} | dlq list | audit")
    console.print(f"  curl -H 'Authorization: Bearer {token}' {urls['api']}/stats",
                  soft_wrap=True)


if __name__ == "__main__":
    sys.exit(run())
