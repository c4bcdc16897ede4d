"""What a phase task returns (tasks/phases.py PhaseMessage): every repr Celery makes of it —
the task-succeeded event's `result` (Flower), the "succeeded" log line, a published message's
argsrepr — shows the ids and never the claim token, while the JSON the next phase receives is
the plain object `PhaseContext.to_message` makes. tests/e2e/test_operations.py checks the same
through a real worker with events on and Flower."""

from __future__ import annotations

import json

from celery.signals import before_task_publish
from celery.utils.saferepr import saferepr
from kombu.utils.json import JSONEncoder

from mailbox.context import Outcome, PhaseContext
from tasks.app import app
from tasks.phases import PhaseMessage

TOKEN = "claim-token-never-shown"
SECRET = "agent-error-never-shown"
IDS = "dispatch=d-1 thread=thread-1"


def _context() -> PhaseContext:
    ctx = PhaseContext("d-1", "thread-1", "run-1", TOKEN, 2, 3, 10, 11, 12)
    ctx.outcome = Outcome("transient_error", SECRET, False, False)
    return ctx


def test_every_repr_shows_ids_only() -> None:
    message = PhaseMessage(_context())
    # Celery's own repr of a return value (celery/app/trace.py: saferepr(R, resultrepr_maxsize))
    for text in (repr(message), str(message), saferepr(message, 1024),
                 saferepr((message,), 1024)):
        assert IDS in text and TOKEN not in text and SECRET not in text, text


def test_a_dict_would_have_shown_the_token() -> None:
    """Why PhaseMessage is not a dict: saferepr walks dicts item by item, subclasses too."""

    class Labelled(dict[str, object]):
        def __repr__(self) -> str:
            return IDS

    assert TOKEN in saferepr(Labelled(_context().to_message()), 1024)


def test_the_next_phase_receives_the_plain_object() -> None:
    ctx = _context()
    message = PhaseMessage(ctx)
    assert message == ctx.to_message() and dict(message) == ctx.to_message()
    # A task message's body, encoded as kombu encodes it (kombu.utils.json.dumps)
    wire = json.loads(json.dumps(((message,), {}, {}), cls=JSONEncoder))
    assert wire[0][0] == ctx.to_message()
    assert json.loads(json.dumps(message.__json__())) == ctx.to_message()
    assert PhaseContext.from_message(wire[0][0]) == ctx


def test_a_published_link_shows_ids_only() -> None:
    """The next link's headers, as Celery builds them and after the publish hook
    (tasks/__init__.py) rewrites them: argsrepr is what task-received/-sent events carry."""
    message = PhaseMessage(_context())
    built = app.amqp.as_task_v2("task-1", "mailbox.resolve", args=(message,))
    assert TOKEN not in built.headers["argsrepr"] and TOKEN not in str(built.sent_event)
    headers = {"task": "mailbox.resolve", "argsrepr": "unset", "kwargsrepr": "unset"}
    before_task_publish.send(sender="mailbox.resolve", headers=headers,
                             body=((message,), {}, {}))
    assert headers["argsrepr"] == IDS and headers["kwargsrepr"] == "{}"
