"""Hypothesis over the facade calls that take user input, other than submit.

Every call gets arguments mixed from three pools: ids that exist (a queued, an acked and a
dead-lettered dispatch, a run waiting for a decision, their threads and event ids), text that
names nothing (blank, over the 255-character id columns, NUL, a lone surrogate), and junk of
the wrong type (None, numbers, NaN, bytes, lists, dicts, objects). The property: the call
returns a result that is right for its arguments, or raises one of the project's errors with
a message — never a driver error, a KeyError, a TypeError or a hang — and a call that
refuses (or finds nothing to do) leaves SQL and the namespace's Redis keys exactly as they
were. The world is built once per backend with the phase functions (what a worker does,
without Celery), and the calls that succeed keep changing it: later examples see cancelled,
interrupted, resumed and replayed states too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailbox import DispatchStatus, Mailbox, RunStatus
from mailbox.errors import MailboxError
from mailbox.events import Event
from mailbox.facade import Receipt
from mailbox.model import MailboxInterrupt, RunDispatch, RunRecord
from mailbox.phases import claim_next, run_chain
from tests.fuzz.support import bad_text, deep, junk, snapshot

bad_cursors = st.one_of(
    st.sampled_from(["0", "0-0", "1-1", " 1-0", "1_000-0", "\u0661-0", "-1-0", "1-", "1--1",
                     "18446744073709551616-0", "1-18446744073709551616", "99999999999999-0",
                     "abc"]),
    st.from_regex(r"\A[0-9]{1,22}(-[0-9]{1,22})?\Z"), st.text(max_size=12),
)
short_timeouts = st.floats(min_value=0, max_value=0.05)
# None is not among them: for `follow` it means "until the run's final event" (forever, on a
# run that waits for a decision).
bad_timeouts = st.one_of(junk.filter(lambda v: v is not None and (
    not isinstance(v, int | float) or isinstance(v, bool))),
                         st.sampled_from([-1, -0.001, math.nan, math.inf, -math.inf]))


@dataclass
class World:
    """Ids that exist in the database, by role, and what the calls may be given."""

    queued: str
    acked: str
    dead: str
    waiting_run: str
    threads: list[str]
    runs: list[str]
    event_ids: list[str] = field(default_factory=list)

    @property
    def dispatches(self) -> list[str]:
        return [self.queued, self.acked, self.dead]


def _process(box: Mailbox, thread_id: str) -> None:
    rt = box.runtime()
    ctx = claim_next(rt, thread_id)
    assert ctx is not None, f"nothing claimable on {thread_id}"
    run_chain(rt, ctx)


_WORLDS: dict[str, World] = {}


def world_of(box: Mailbox) -> World:
    """Built on the first example of a backend (the `mailbox` fixture lives for the whole
    hypothesis run of one test function)."""
    key = box.settings.namespace
    if key not in _WORLDS:
        acked = box.submit("fz-acked", "echo", "hello")
        _process(box, "fz-acked")
        dead = box.submit("fz-dead", "fail", {"why": "fuzz"})
        _process(box, "fz-dead")
        ask = box.submit("fz-ask", "ask", "deploy?")
        _process(box, "fz-ask")
        queued = box.submit("fz-queued", "echo", "never run")
        assert box.get_run(ask.run_id).status == RunStatus.waiting  # type: ignore[union-attr]
        assert box.get_dispatch(dead.dispatch_id).status == DispatchStatus.DeadLetter  # type: ignore[union-attr]
        world = World(queued.dispatch_id, acked.dispatch_id, dead.dispatch_id, ask.run_id,
                      ["fz-acked", "fz-dead", "fz-ask", "fz-queued"],
                      [acked.run_id, dead.run_id, ask.run_id, queued.run_id])
        world.event_ids = [e.id for r in world.runs for e in box.events.read(r)]
        assert world.event_ids, "the world's runs emitted no events"
        _WORLDS[key] = world
    return _WORLDS[key]


def ids(world_pool: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(world_pool), bad_text, junk)


def _call(box: Mailbox, world: World, op: str, data: st.DataObject) -> tuple[Any, Any]:
    """Draw the op's arguments, call it; returns (arguments, result)."""
    draw = data.draw
    if op == "get_dispatch":
        args: Any = draw(ids(world.dispatches + world.runs), label="dispatch_id")
        return args, box.get_dispatch(args)
    if op == "get_run":
        args = draw(ids(world.runs + world.dispatches), label="run_id")
        return args, box.get_run(args)
    if op == "cancel":
        args = draw(ids(world.dispatches), label="dispatch_id")
        return args, box.cancel(args)
    if op == "interrupt":
        args = draw(ids(world.threads), label="thread_id")
        return args, box.interrupt(args)
    if op == "resume":
        args = (draw(ids([world.waiting_run, *world.runs]), label="run_id"),
                draw(st.one_of(st.text(max_size=10), junk, st.just("x" * 300_000)),
                     label="decision"))
        return args, box.resume(*args)
    if op == "replay":
        args = (draw(ids([world.dead, *world.dispatches]), label="dispatch_id"),
                draw(st.one_of(st.booleans(), junk), label="force"))
        return args, box.replay(args[0], force=args[1])
    if op == "dead_letters":
        kwargs = {name: draw(st.one_of(st.none(), strategy), label=name) for name, strategy in (
            ("thread_id", ids(world.threads)), ("agent", ids(["fail", "echo", "ask"])),
            ("error_contains", st.one_of(st.sampled_from(["requested", "%", "_", "\\"]),
                                         bad_text, junk)),
            ("since", st.one_of(st.integers(min_value=-5, max_value=2**60), junk)),
            ("until", st.one_of(st.integers(min_value=-5, max_value=2**60), junk)))}
        kwargs["limit"] = draw(st.one_of(st.integers(min_value=-3, max_value=50), junk),
                               label="limit")
        kwargs["offset"] = draw(st.one_of(st.integers(min_value=-3, max_value=5), junk),
                                label="offset")
        return kwargs, box.dead_letters(**kwargs)
    if op == "purge":
        args = draw(st.one_of(st.lists(ids(world.dispatches), max_size=3), bad_text, junk),
                    label="dispatch_ids")
        return args, box.purge_dead_letters(args)
    if op == "events":
        args = (draw(ids(world.runs), label="run_id"),
                draw(st.one_of(st.none(), st.sampled_from(world.event_ids), bad_cursors,
                               junk), label="after"))
        return args, list(box.events(*args))
    if op == "follow":
        args = (draw(ids(world.runs), label="run_id"),
                draw(st.one_of(st.none(), st.sampled_from(world.event_ids), bad_cursors),
                     label="after"),
                draw(st.one_of(short_timeouts, bad_timeouts), label="timeout_s"))
        return args, list(box.events(args[0], args[1], follow=True, timeout_s=args[2]))
    if op == "wait":
        args = (draw(ids(world.dispatches), label="dispatch_id"),
                draw(st.one_of(short_timeouts, bad_timeouts), label="timeout_s"))
        return args, box.wait(*args)
    raise AssertionError(op)


def check_result(box: Mailbox, world: World, op: str, args: Any, result: Any,
                 changed: bool) -> None:
    """What a successful call must have returned (and whether it may have written)."""
    if op in ("get_dispatch", "get_run"):
        assert not changed, f"{op} wrote something"
        if result is not None:
            kind, attr = (RunDispatch, "dispatch_id") if op == "get_dispatch" else \
                (RunRecord, "run_id")
            assert isinstance(result, kind) and getattr(result, attr) == args
    elif op == "cancel":
        assert isinstance(result, bool)
        assert result or not changed, "cancel returned False but wrote something"
        if result:
            after = box.get_dispatch(args)
            assert after is not None and after.status in (DispatchStatus.Cancelled,
                                                           DispatchStatus.Claimed)
    elif op == "interrupt":
        assert isinstance(result, MailboxInterrupt)
        assert box.store.sql_epoch(args) == result.new_dispatch_epoch >= 1
        assert all(d.status == DispatchStatus.Superseded for d in result.superseded)
    elif op in ("resume", "replay"):
        assert isinstance(result, Receipt)
        stored = box.get_dispatch(result.dispatch_id)
        assert stored is not None and stored.run_id == result.run_id
        if op == "resume":
            assert result.run_id == args[0] and result.resumed
    elif op == "dead_letters":
        assert not changed, "dead_letters wrote something"
        assert isinstance(result, list) and len(result) <= args["limit"]
        for d in result:
            assert d.status == DispatchStatus.DeadLetter
            assert args["thread_id"] is None or d.thread_id == args["thread_id"]
    elif op == "purge":
        assert isinstance(result, int) and 0 <= result <= len(args)
        assert result or not changed, "purge deleted nothing but wrote something"
    elif op in ("events", "follow"):
        assert not changed, f"{op} wrote something"
        assert all(isinstance(e, Event) and e.run_id == args[0] for e in result)
        if args[1] is not None:
            assert all(tuple(map(int, e.id.split("-"))) > tuple(map(int, args[1].split("-")))
                       for e in result)
    elif op == "wait":
        assert not changed, "wait wrote something"
        assert isinstance(result, RunDispatch) and result.is_terminal


OPS = ["get_dispatch", "get_run", "cancel", "interrupt", "resume", "replay", "dead_letters",
       "purge", "events", "follow", "wait"]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), data=st.data())
def test_facade_answers_or_refuses_clearly_without_writing(mailbox: Mailbox, op: str,
                                                           data: st.DataObject) -> None:
    world = world_of(mailbox)
    before = snapshot(mailbox)
    try:
        args, result = _call(mailbox, world, op, data)
    except MailboxError as exc:
        event(f"{op}: {type(exc).__name__}")
        text = str(exc)
        # "<what went wrong>: <which value or why>", e.g. "not found: run nope".
        assert text.startswith(f"{exc.prefix}: ") and exc.message.strip(), repr(exc)
        assert "Traceback" not in text, text
        assert snapshot(mailbox) == before, f"{op} refused ({text}) but wrote something"
        return
    event(f"{op}: returned")
    check_result(mailbox, world, op, args, result, snapshot(mailbox) != before)


BAD_IDS: list[Any] = [None, 7, "", " ", "\x00", "id\x00", "a\udcff", "x" * 256, b"x", ["x"],
                      {"d": 1}, math.nan, True]


def test_each_known_bad_argument_is_refused_without_writing(mailbox: Mailbox) -> None:
    """Every facade call with each known-bad value alone (random draws may miss one)."""
    w = world_of(mailbox)
    cases: list[tuple[str, Any]] = []
    for bad in BAD_IDS:
        cases += [("get_dispatch", lambda v=bad: mailbox.get_dispatch(v)),
                  ("get_run", lambda v=bad: mailbox.get_run(v)),
                  ("cancel", lambda v=bad: mailbox.cancel(v)),
                  ("interrupt", lambda v=bad: mailbox.interrupt(v)),
                  ("resume", lambda v=bad: mailbox.resume(v, "ok")),
                  ("replay", lambda v=bad: mailbox.replay(v)),
                  ("wait", lambda v=bad: mailbox.wait(v, 0.01)),
                  ("purge", lambda v=bad: mailbox.purge_dead_letters([v]))]
    for bad in BAD_IDS:  # an id too long or with NUL names no stream: [] is right there
        if not (isinstance(bad, str) and bad.strip() and bad.encode(errors="replace")
                .decode() == bad):
            cases.append(("events", lambda v=bad: list(mailbox.events(v))))
    for timeout in (math.nan, math.inf, -1, "1", True):
        cases += [("wait timeout", lambda t=timeout: mailbox.wait(w.acked, t)),
                  ("follow timeout", lambda t=timeout: list(
                      mailbox.events(w.runs[0], follow=True, timeout_s=t)))]
    for cursor in (1, b"1-0", ["1-0"], " 1-0", "1_0-0", "\u0661-0", "1-", "-1-0",
                   "18446744073709551616-0", "abc"):
        cases.append(("cursor", lambda c=cursor: list(mailbox.events(w.runs[0], after=c))))
    for name, values in {"thread_id": [7, "\x00", ["l"], "x" * 256],
                         "agent": [7, "\x00", ["l"]], "error_contains": [1, b"x", "\x00"],
                         "since": [True, "x", -1, ["l"], 2**70, 1.5],
                         "until": [True, "x", -1, {"d": 1}],
                         "limit": [-1, "5", math.nan, None, 2.0],
                         "offset": [-1, "1", 1.5, None]}.items():
        for value in values:
            cases.append((f"dead_letters {name}",
                          lambda n=name, v=value: mailbox.dead_letters(**{n: v})))
    for ids_ in ("abc", 1, None, b"ab", {"d": 1}):
        cases.append(("purge list", lambda v=ids_: mailbox.purge_dead_letters(v)))
    for decision in (math.nan, object(), deep(100_000), "x" * (256 * 1024 + 1)):
        cases.append(("resume decision", lambda d=decision: mailbox.resume(w.waiting_run, d)))
    for force in ("yes", 1, None):
        cases.append(("replay force", lambda f=force: mailbox.replay(w.dead, force=f)))
    for what, call in cases:
        before = snapshot(mailbox)
        try:
            outcome = call()
        except MailboxError as exc:
            assert str(exc).startswith(f"{exc.prefix}: ") and exc.message.strip(), repr(exc)
        else:
            raise AssertionError(f"{what} accepted a bad argument and returned {outcome!r:.200}")
        assert snapshot(mailbox) == before, f"{what} refused but wrote something"
