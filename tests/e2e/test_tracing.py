"""OpenTelemetry traces through real processes (mailbox/tracing.py): a client process that
calls dispatch.delay() and a `celery worker`, both writing spans to one JSON-lines file
(MAILBOX_TRACE_FILE). One trace per dispatch, submit → claim → verify → reconstruct →
resolve → execute → settle, across the two processes; a retry's spans join the same trace;
Celery's own spans are there too; and with tracing off, nothing of OpenTelemetry is
imported and dispatches carry no traceparent."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from mailbox import DispatchStatus, Mailbox
from tests.e2e.conftest import celery_stack  # noqa: F401  (fixture)
from tests.support.workers import ROOT, Stack

PHASES = ["mailbox.submit", "mailbox.claim", "mailbox.verify", "mailbox.reconstruct",
          "mailbox.resolve", "mailbox.execute", "mailbox.settle"]
CLIENT = """
import sys
from mailbox import Mailbox
from tasks import dispatch
for thread, agent, value in [("t-traced", "echo", "hello"), ("t-retried", "flaky",
                                                               {"fail_times": 1})]:
    print(dispatch.delay(thread, agent, value).id)
for result in dispatch.delay_many([{"thread_id": "t-bulk-1", "agent": "echo", "input": 1},
                                   {"thread_id": "t-bulk-2", "agent": "echo", "input": 2}]):
    print(result.id)
box = Mailbox.connect()
dead = dispatch.delay("t-replayed", "fail", {"why": "trace the replay"}).id
box.wait(dead, timeout_s=60)
box.waker = lambda thread, delay: dispatch.apply_async(args=(thread,), queue=box.settings.namespace)
print(box.replay(dead).dispatch_id)
"""


def spans_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_trace_per_dispatch_across_processes(celery_stack: Stack,  # noqa: F811
                                                 mailbox: Mailbox, tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    env = {"MAILBOX_TRACING": "1", "MAILBOX_TRACE_FILE": str(trace_file),
           "MAILBOX_RETRY_BASE_MS": "50"}
    celery_stack.start_worker(concurrency=1, **env)
    client = subprocess.run([sys.executable, "-c", CLIENT], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=celery_stack.env(**env))
    assert client.returncode == 0, client.stderr
    traced, retried, bulk_1, bulk_2, replayed = client.stdout.split()
    for dispatch_id in (traced, retried, bulk_1, bulk_2):
        final = mailbox.wait(dispatch_id, timeout_s=60)
        assert final.status == DispatchStatus.Acked, final
    assert mailbox.wait(replayed, timeout_s=60).status == DispatchStatus.DeadLetter

    spans = spans_of(trace_file)
    ours = [s for s in spans if s["name"].startswith("mailbox.")]
    by_dispatch: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in ours:
        by_dispatch[span["attributes"].get("mailbox.dispatch_id", "?")].append(span)

    first = sorted(by_dispatch[traced], key=lambda s: s["start"])
    assert [s["name"] for s in first] == PHASES, [s["name"] for s in first]
    assert len({s["trace_id"] for s in first}) == 1, "not one trace"
    assert first[0]["pid"] == client_pid(first) and len({s["pid"] for s in first}) == 2
    submit, settle = first[0], first[-1]
    assert submit["parent_id"] is None
    assert settle["attributes"]["mailbox.outcome"] == "completed"
    for span in first[1:]:
        attrs = span["attributes"]
        assert attrs["mailbox.thread_id"] == "t-traced" and attrs["mailbox.attempt"] == 0
        assert attrs["mailbox.run_id"] == submit["attributes"]["mailbox.run_id"]
    assert first[-2]["attributes"]["mailbox.agent"] == "echo@1"

    again = sorted(by_dispatch[retried], key=lambda s: s["start"])
    assert len({s["trace_id"] for s in again}) == 1, "the retry left the dispatch's trace"
    executes = [s for s in again if s["name"] == "mailbox.execute"]
    assert [s["attributes"]["mailbox.attempt"] for s in executes] == [0, 1]
    assert [s["attributes"]["mailbox.outcome"] for s in executes] == ["transient_error",
                                                                      "completed"]
    # Bulk items and a replay: each dispatch its own trace, from its submit (or replay)
    # in the client to its settle in the worker.
    for dispatch_id, root in ((bulk_1, "mailbox.submit"), (bulk_2, "mailbox.submit"),
                              (replayed, "mailbox.replay")):
        chain = sorted(by_dispatch[dispatch_id], key=lambda s: s["start"])
        assert [s["name"] for s in chain] == [root, *PHASES[1:]], [s["name"] for s in chain]
        assert len({s["trace_id"] for s in chain}) == 1, f"{root}: not one trace"
    assert len({by_dispatch[d][0]["trace_id"] for d in (bulk_1, bulk_2)}) == 2
    assert any(s["name"].startswith(("run/", "apply_async/")) for s in spans), \
        "no span of Celery's own instrumentation"


def client_pid(spans: list[dict[str, Any]]) -> int:
    return int(spans[0]["pid"])


def test_tracing_is_off_by_default_and_imports_nothing(celery_stack: Stack,  # noqa: F811
                                                        mailbox: Mailbox) -> None:
    # (redis-py imports parts of OpenTelemetry's metrics SDK by itself when installed: the
    # check is that the tracing SDK is never loaded.)
    probe = ("import sys\nfrom tasks import dispatch\nimport mailbox.tracing as t\n"
             "dispatch.delay('t-probe', 'echo', 'x')\n"
             "print(t.ENABLED, 'opentelemetry.sdk.trace' in sys.modules)\n")
    env = {k: v for k, v in celery_stack.env().items()
           if not k.startswith(("OTEL_", "MAILBOX_TRACING", "MAILBOX_TRACE_FILE"))}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    receipt = mailbox.submit("t-untraced", "echo", "x")
    dispatch = mailbox.get_dispatch(receipt.dispatch_id)
    assert dispatch is not None and dispatch.traceparent is None
