"""The five phases of one claimed dispatch, as plain functions (docs/behaviour.md#pipeline).

`claim_next` takes a thread's next dispatch; then verify → reconstruct → resolve → execute →
settle each take and return one `PhaseContext`. Celery chains them (see `tasks/`), but
nothing here knows about Celery, so tests call them directly.

A phase that finishes the dispatch early marks the context done; later phases pass it on and
`settle` only wakes the thread. Every write is fenced by the claim token in the store, so a
replayed or duplicated phase changes nothing. A store outage inside a phase leaves the
dispatch Claimed: its lease runs out and the sweep reclaims it with attempt_count + 1, so a
failure becomes a bounded retry, never a loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import uuid6

from mailbox import agents, metrics, reports
from mailbox.agent_run import AgentOutcome, error_text, run_agent
from mailbox.context import (
    COMPLETED,
    DEFERRED,
    PERMANENT,
    TRANSIENT,
    Outcome,
    PhaseContext,
)
from mailbox.errors import (
    AlreadyStartedError,
    MailboxError,
    NotFoundError,
    StaleEpochError,
    StoreUnavailableError,
    VersionConflictError,
)
from mailbox.model import (
    DispatchStatus,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    Termination,
)
from mailbox.runtime import Runtime, now_ms  # noqa: F401  (now_ms: public here too)
from mailbox.store import AttemptFacts, Message

log = logging.getLogger(__name__)

SUPERSEDED_BEFORE_START = "claimed dispatch superseded before execution start"


def retry_delay_ms(attempt_count: int, base_ms: int, max_ms: int) -> int:
    """Capped exponential backoff (attempt_count before the nack; docs/behaviour.md#backoff)."""
    exponent = min(max(attempt_count - 1, 0), 6)
    return int(min(base_ms * 2**exponent, max_ms))


# ------------------------------------------------------------------------------ utilities
def _reconcile(rt: Runtime, dispatch: RunDispatch | None) -> bool:
    """Make the run agree with a terminal dispatch; True when this call ended the run. A
    Cancelled or Superseded run that this call ended is reported (`reports.cancelled`); a
    dead letter's caller reports it."""
    if dispatch is None or not dispatch.is_terminal:
        return False
    run = rt.runs.reconcile(dispatch, rt.clock())
    if run is not None and dispatch.status in (DispatchStatus.Cancelled,
                                               DispatchStatus.Superseded):
        reports.cancelled(rt.events, dispatch, rt.clock())
    return run is not None


def _after_fence(rt: Runtime, ctx: PhaseContext, error: MailboxError) -> PhaseContext:
    """A fenced write failed: if the dispatch ended Superseded, reconcile its run.

    When it was our own write that fenced the claim (a stale epoch: an interrupt came after
    the attempt recorded its outcome, before the ack), the run already holds the attempt's
    outcome, so reconciling changes nothing; the attempt's end is still ours to report, with
    the run's own termination."""
    log.info("dispatch %s is no longer ours: %s", ctx.dispatch_id, error)
    try:
        dispatch = rt.store.load_dispatch(ctx.dispatch_id)
        if not _reconcile(rt, dispatch) and dispatch is not None \
                and dispatch.status == DispatchStatus.Superseded \
                and ctx.started_at is not None and _fenced_by_us(error):
            run = rt.runs.load_run(ctx.run_id)
            if run is not None and run.status == RunStatus.done \
                    and run.dispatch_id == ctx.dispatch_id:
                reports.ended_after_outcome(rt.events, dispatch, run, rt.clock())
    except MailboxError as exc:
        log.warning("could not reconcile %s: %s", ctx.dispatch_id, exc)
    return ctx.finish(f"fenced: {error}")


def _fenced_by_us(error: MailboxError) -> bool:
    """The fenced write that failed made the transition itself (T13: a stale epoch), rather
    than finding the claim gone to someone else."""
    return isinstance(error, StaleEpochError)


# =================================================================================== claim
def claim_next(rt: Runtime, thread_id: str, *, wake_id: str | None = None,
               expect_due: bool = False) -> PhaseContext | None:
    """Claim the thread's next eligible dispatch; None when busy or nothing is due. A
    wake-up's claim passes its id (docs/behaviour.md#wake-gate); a caller that knows
    something is due passes `expect_due` (`MailboxStore.claim`). The claim also reads what
    reconstruct checks of the run, in its own transaction."""
    claimed = rt.runs.claim_for_attempt(thread_id, rt.consumer_id, rt.settings.lease_ms,
                                        rt.clock(), wake_id=wake_id, clock=rt.clock,
                                        expect_due=expect_due)
    if claimed is None:
        return None
    dispatch, facts = claimed
    ctx = PhaseContext.from_claim(dispatch)
    _check_run(ctx, facts)
    return ctx


# ================================================================================== verify
def verify(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    """The claim is still ours and its epoch is current; else stop before running."""
    if ctx.done:
        return ctx
    if rt.store.claim_current_in_redis(ctx.thread_id, ctx.dispatch_id, ctx.token, ctx.epoch,
                                       rt.clock()):
        return ctx  # nothing to look at in SQL: the start is fenced there anyway
    try:
        current = rt.store.load_dispatch(ctx.dispatch_id)
        if current is None:
            return ctx.finish("disappeared")
        if current.status != DispatchStatus.Claimed or current.claim_token != ctx.token:
            if current.status == DispatchStatus.Superseded:
                _reconcile(rt, current)
            return ctx.finish(f"not ours: {current.status.value}")
        epoch = rt.store.current_dispatch_epoch(ctx.thread_id)
        if current.is_stale(epoch):
            superseded = rt.store.supersede_claimed(ctx.dispatch_id, ctx.token, rt.clock(),
                                                    SUPERSEDED_BEFORE_START)
            if superseded is None:  # a sweep fenced it first: reconcile what it left
                superseded = rt.store.load_dispatch(ctx.dispatch_id)
            _reconcile(rt, superseded)
            return ctx.finish("superseded before start")
    except VersionConflictError as exc:
        return _after_fence(rt, ctx, exc)
    except StoreUnavailableError as exc:
        return ctx.finish(f"store unavailable in verify: {exc}")
    return ctx


# ============================================================================= reconstruct
def reconstruct(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    """Rebuild the request from the run record and the message log. A run that cannot be
    rebuilt never will be: dead-letter it once (the runtime is never entered). The claim read
    the run in its own transaction (`claim_next`); a context from a worker that did not is
    checked here."""
    if ctx.done:
        return ctx
    ctx.instance_id = str(uuid6.uuid7())
    if not ctx.run_checked:
        try:
            _check_run(ctx, rt.runs.load_run_for_attempt(ctx.run_id))
        except StoreUnavailableError as exc:
            return ctx.finish(f"store unavailable in reconstruct: {exc}")
    if ctx.run_error is not None:
        return _unreconstructable(rt, ctx, ctx.run_error)
    if ctx.run_done:
        # A previous attempt finished the run and died before its ack: do not run the
        # agent again, settle with what the run record already says.
        ctx.outcome = Outcome(COMPLETED, replayed=True)
    return ctx


def _check_run(ctx: PhaseContext, facts: AttemptFacts) -> None:
    """What reconstruct needs of the run, on the context: why it cannot be rebuilt
    (`run_error`), or its pinned resolution, whether this dispatch resumes it and whether
    an earlier attempt already finished it."""
    ctx.run_checked = True
    run = facts.run
    if run is None:
        ctx.run_error = f"run '{ctx.run_id}' not found for dispatch '{ctx.dispatch_id}'"
    elif run.thread_id != ctx.thread_id:
        ctx.run_error = f"run '{run.run_id}' belongs to thread '{run.thread_id}', not " \
                        f"'{ctx.thread_id}'"
    elif not facts.has_input:
        ctx.run_error = f"input message for run '{run.run_id}' not found"
    else:
        ctx.resolution_id = run.resolution_id
        ctx.resumed = run.status == RunStatus.waiting
        ctx.run_done = run.status == RunStatus.done


def _unreconstructable(rt: Runtime, ctx: PhaseContext, message: str) -> PhaseContext:
    msg = f"validation error: {message}"
    now = rt.clock()
    assert ctx.instance_id is not None
    _record_completion(ctx, PERMANENT, now)
    try:
        rt.store.record_dispatch_start(ctx.dispatch_id, ctx.token, ctx.instance_id, now)
        ctx.started_at = now
        _record_start(ctx)
        try:
            rt.store.record_run_result(ctx.dispatch_id, ctx.token, RunDispatchResult(
                ctx.run_id, ctx.instance_id, RunStatus.done, Termination.error(msg),
                None, msg), now)
        except VersionConflictError:
            raise
        except MailboxError as exc:
            log.warning("could not record the result of %s: %s", ctx.dispatch_id, exc)
        rt.store.dead_letter(ctx.dispatch_id, ctx.token, msg, now)
        reports.dead_letter(rt.events, ctx.run_id, ctx.dispatch_id, msg, rt.clock(),
                            thread_id=ctx.thread_id)
        _reconcile(rt, rt.store.load_dispatch(ctx.dispatch_id))
    except (VersionConflictError, NotFoundError) as exc:
        return _after_fence(rt, ctx, exc)
    except StoreUnavailableError as exc:
        return ctx.finish(f"store unavailable dead-lettering: {exc}")
    return ctx.finish(f"dead letter: {msg}")


# ================================================================================= resolve
def resolve(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    """Load the pinned resolution and find exactly that agent version. A failure here is
    permanent: it becomes the attempt's result (the agent is not run)."""
    if ctx.done or ctx.outcome is not None:
        return ctx
    resolution_id = ctx.resolution_id
    try:
        if not resolution_id:
            ctx.resolve_error = (f"persistent dispatch for run '{ctx.run_id}' has no "
                                 f"resolution id")
            return ctx
        resolution = rt.runs.load_resolution(resolution_id)
    except StoreUnavailableError as exc:
        return ctx.finish(f"store unavailable in resolve: {exc}")
    if resolution is None:
        ctx.resolve_error = f"resolution '{resolution_id}' not found"
    elif agents.lookup(resolution.agent_name, resolution.agent_version) is None:
        # Agent versions are code loaded per worker: during a rolling deploy, the answer
        # depends on which worker took the message. Not a poison message (yet): settle puts
        # it back for another worker, for a grace period (docs/behaviour.md#deferral).
        ctx.outcome = _missing_version(rt, resolution.agent_name, resolution.agent_version)
    else:
        ctx.agent = [resolution.agent_name, resolution.agent_version]
    return ctx


def _missing_version(rt: Runtime, name: str, version: str) -> Outcome:
    return Outcome(DEFERRED, f"agent {name}@{version} is not deployed on worker "
                             f"{rt.consumer_id}")


# ================================================================================= execute
def execute(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    """Record the start, then run the agent with a heartbeat beside it, and record what it
    came to. Nothing escapes from here but a store outage, which leaves the claim for the
    sweep: whatever the agent does becomes the attempt's outcome."""
    if ctx.done or ctx.outcome is not None:
        return ctx
    spec = None if ctx.agent is None else agents.lookup(*ctx.agent)
    if ctx.agent is not None and spec is None:
        # Resolve ran on a worker that has the version; this one (the chain's phases go to
        # any worker) does not: a deploy in progress, like a miss in resolve.
        ctx.outcome = _missing_version(rt, *ctx.agent)
        return ctx
    inputs = _start(rt, ctx)
    if inputs is None:
        return ctx
    _record_start(ctx)
    # Stamped with the start time the store recorded, not the time of this emit: a start
    # committed just before an interrupt must not look as if it came after it.
    rt.events.emit(ctx.run_id, ctx.dispatch_id, "run_started",
                   {"attempt": ctx.attempt, "resumed": ctx.resumed}, ts=ctx.started_at,
                   thread_id=ctx.thread_id)

    if ctx.resolve_error:
        ctx.outcome = Outcome(PERMANENT, ctx.resolve_error)
        return ctx
    assert spec is not None
    user = [m.content for m in inputs if m.role == "user"]
    decisions = [m.content for m in inputs if m.role == "decision"]
    try:
        outcome = run_agent(rt, ctx, spec, user[0] if user else None,
                            decisions[-1] if decisions else None,
                            on_abandon=lambda ended: _end_abandoned(rt, ctx, ended))
    except Exception as exc:  # ours, not the agent's (those are caught inside)
        log.exception("running the agent of %s failed", ctx.describe())
        outcome = AgentOutcome(TRANSIENT, f"internal error running the agent: "
                                          f"{error_text(exc)}")
    if outcome.abandoned:
        return ctx.finish(f"abandoned: {ctx.stop_reason}; the agent returned afterwards")
    if outcome.kind != COMPLETED:
        ctx.outcome = Outcome(outcome.kind, outcome.error)
        return ctx
    return _record(rt, ctx, outcome)


def _start(rt: Runtime, ctx: PhaseContext) -> list[Message] | None:
    """Record the attempt's start, fenced, and extend the lease from it: whatever the hops
    since the claim took, the attempt has a whole lease before its first renewal. Returns the
    run's messages, or None when the chain ends here (ctx says why)."""
    assert ctx.instance_id is not None
    lease_ms = rt.settings.lease_ms
    now = rt.clock()
    ctx.started_at = now
    # One execution per attempt: the executor id is unique to this invocation, so a second
    # delivery of the same message is refused even inside the same process.
    executor = f"{rt.consumer_id}/{uuid6.uuid7().hex[-12:]}"
    try:
        held = rt.store.take_executor(ctx.thread_id, ctx.token, executor, ctx.dispatch_id,
                                      now + lease_ms, lease_ms, now=now)
        if held not in ("ok", "missing"):
            ctx.duplicate = True
            ctx.finish(f"execute refused: {held}")
            return None
        inputs = rt.runs.start_attempt(ctx.dispatch_id, ctx.token, ctx.instance_id, ctx.run_id,
                                       now, lease_ms=lease_ms, thread_id=ctx.thread_id)
    except AlreadyStartedError as exc:
        # Redis forgot the executor (restart, flush) but SQL remembers the start.
        ctx.duplicate = True
        ctx.finish(f"execute refused: {exc.message}")
        return None
    except (VersionConflictError, NotFoundError) as exc:
        _after_fence(rt, ctx, exc)
        return None
    except StoreUnavailableError as exc:
        ctx.finish(f"store unavailable starting: {exc}")
        return None
    if held == "missing":
        # Redis forgot the lease; SQL has just recorded this start under our token, so the
        # token is one SQL issued: put the lease back, with us as its executor.
        try:
            rt.store.take_executor(ctx.thread_id, ctx.token, executor, ctx.dispatch_id,
                                   now + lease_ms, lease_ms, create=True, now=now)
        except StoreUnavailableError as exc:  # the heartbeat's renewals recreate it
            log.warning("lease of %s not rebuilt in Redis: %s", ctx.describe(), exc)
    return inputs


def _record(rt: Runtime, ctx: PhaseContext, outcome: AgentOutcome) -> PhaseContext:
    """Record a completed attempt: the run's outcome and the dispatch's projection, fenced
    by the claim token, before settle acks (an attempt that lost its claim cannot decide the
    run, and a crash before the ack is recognised by the retry: a done run, not re-run). A
    result the store refuses is the agent's permanent error, with the store's reason."""
    assert ctx.instance_id is not None
    termination = outcome.termination or Termination.natural_end()
    status, _ = termination.to_run_status()
    result = RunDispatchResult(ctx.run_id, ctx.instance_id, status, termination,
                               outcome.response, outcome.error)
    try:
        rt.runs.record_outcome(ctx.dispatch_id, ctx.token, result, rt.clock(),
                               waiting=outcome.waiting, thread_id=ctx.thread_id,
                               turns=outcome.turns)
    except (VersionConflictError, NotFoundError) as exc:
        return _after_fence(rt, ctx, exc)
    except StoreUnavailableError as exc:
        return ctx.finish(f"store unavailable recording the outcome: {exc}")
    except MailboxError as exc:
        ctx.outcome = Outcome(PERMANENT, f"invalid agent result: the store refused it "
                                         f"({exc})")
        return ctx
    ctx.outcome = Outcome(COMPLETED, outcome.error, recorded=True)
    return ctx


def _end_abandoned(rt: Runtime, ctx: PhaseContext, outcome: AgentOutcome) -> None:
    """On the heartbeat's thread, for an agent that ignored its stop: do what execute and
    settle would have done with `outcome`, and wake the thread (the agent may never return;
    the process is reported stuck until it does or Celery's hard time limit ends it)."""
    try:
        if outcome.kind == COMPLETED:
            _record(rt, ctx, outcome)
        else:
            ctx.outcome = Outcome(outcome.kind, outcome.error)
        if not ctx.done:
            _settle_outcome(rt, ctx)
    finally:
        rt.wake(ctx.thread_id, 0)


# ================================================================================== settle
def settle(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    """Record the result, classify, ack / nack / dead-letter, reconcile the run, and start
    the thread's next dispatch right away: a worker's ack claims it itself
    (`Runtime.start`); otherwise the thread is woken, unless the ack saw nothing due."""
    wake = True
    try:
        if not ctx.done:
            wake = _settle_outcome(rt, ctx)
    finally:
        if wake and not ctx.duplicate:
            rt.wake(ctx.thread_id, 0)
    return ctx


def _settle_outcome(rt: Runtime, ctx: PhaseContext) -> bool:
    """Act on the outcome; False when the thread needs no claim after it (an ack that saw
    nothing due and no submit waiting on its lease), True otherwise. Completion metrics
    (docs/behaviour.md#metrics): a failure is
    counted first, as the original does; a completed attempt once its end is this settle's
    to report — acked here, or its own ack fenced by an interrupt — and not when another
    delivery or the sweep settled it, nor when it is left for the sweep (which counts what
    it acks or supersedes): each completed attempt is counted once."""
    outcome = ctx.outcome
    assert outcome is not None, "settle of a context with neither outcome nor done"
    now = rt.clock()
    kind: str = outcome.kind
    if kind in (TRANSIENT, PERMANENT):
        _record_completion(ctx, kind, now)
    wake = True
    try:
        if kind == DEFERRED:
            kind = _settle_deferred(rt, ctx, outcome.error or "agent version not deployed", now)
        elif kind == COMPLETED:
            wake = _settle_completed(rt, ctx, outcome, now)
        elif kind == TRANSIENT:
            _settle_transient(rt, ctx, outcome.error or "transient error", now)
        else:
            _settle_permanent(rt, ctx, outcome.error or "permanent error", now)
    except (VersionConflictError, NotFoundError) as exc:
        _after_fence(rt, ctx, exc)
        if kind == COMPLETED and _fenced_by_us(exc):
            _record_completion(ctx, COMPLETED, now)  # reported "superseded" by this settle
    except StoreUnavailableError as exc:
        # Left Claimed: the lease expires and the sweep reclaims it (attempt + 1).
        ctx.finish(f"store unavailable settling: {exc}")
    else:
        if not ctx.duplicate and not ctx.done:  # done: recovery left it for the sweep
            ctx.settled = kind
            if kind == COMPLETED:
                _record_completion(ctx, COMPLETED, now)
    return wake


def _settle_completed(rt: Runtime, ctx: PhaseContext, outcome: Outcome, now: int) -> bool:
    """Ack and report; True when the thread still needs a claim. A runtime that starts
    chains itself (`Runtime.start`) has the ack claim the thread's next dispatch in its own
    transaction and starts it; otherwise the ack says whether anything else is due."""
    assert ctx.instance_id is not None
    run: RunRecord | None = None
    if not outcome.recorded:
        # The replay of an attempt that finished the run and died before its ack.
        run = rt.runs.load_run(ctx.run_id)
        if run is None:
            raise NotFoundError(f"run {ctx.run_id}")
        termination = run.termination or Termination.natural_end()
        status, _ = termination.to_run_status()
        rt.store.record_run_result(ctx.dispatch_id, ctx.token, RunDispatchResult(
            ctx.run_id, ctx.instance_id, status, termination, run.response, run.error), now)
    next_due, following, hand_over, wake_at = True, None, None, None
    try:
        if rt.start is not None:
            acked_next = rt.runs.ack_and_claim_next(
                ctx.dispatch_id, ctx.token, ctx.run_id, now, thread_id=ctx.thread_id,
                consumer_id=rt.consumer_id, lease_ms=rt.settings.lease_ms)
            run, following = acked_next.run or run, acked_next.next
            next_due, hand_over = acked_next.wake_requested, acked_next.hand_over
            wake_at = acked_next.wake_at
        else:
            acked = rt.runs.ack(ctx.dispatch_id, ctx.token, ctx.run_id, now,
                                thread_id=ctx.thread_id)
            run, next_due = acked.run or run, acked.next_due
    except VersionConflictError:
        # Refused outright: the claim was not ours when the ack looked. If the dispatch is
        # Acked, another delivery of this same settle (a duplicated message) acked it and
        # reports it; reporting it here too would tell followers of a second result.
        current = rt.store.load_dispatch(ctx.dispatch_id)
        if current is not None and current.status == DispatchStatus.Acked:
            ctx.duplicate = True
            ctx.finish("settled by another delivery of this attempt")
            return True
        raise
    except MailboxError:
        # Unknown whether the ack landed: its transaction failed, or it committed and the
        # answer was lost on the way back (a connection dropped after COMMIT surfaces as
        # StoreUnavailableError). Ack recovery finds out.
        recovered = _recover_ack(rt, ctx, now)
        if recovered is None:
            return True  # ctx says why: reported by another, or left for the sweep
        run = recovered.run or run
        if recovered.landed:
            following = _after_lost_ack(rt, ctx, now)
            next_due = following is None
    try:
        if run is None:
            run = rt.runs.load_run(ctx.run_id)
            if run is None:
                raise NotFoundError(f"run {ctx.run_id}")
        # The lease goes to the new claim in the round trip of the report.
        handed = reports.acked(rt.events, ctx.dispatch_id, run, rt.clock(), along=hand_over)
        if hand_over is not None:
            rt.store.handed_over(handed)
            hand_over = None
    finally:  # whatever happened, the lease is handed over before the new chain starts
        if hand_over is not None:
            rt.store.send_hand_over(hand_over)
    if following is not None and rt.start is not None:
        nxt = PhaseContext.from_claim(following[0])
        _check_run(nxt, following[1])
        try:
            rt.start(nxt)
        except Exception:  # the broker refused: this ack stands; the new claim runs out
            log.exception("the chain of %s was not published; its lease runs out and the "
                          "sweep reclaims it", nxt.describe())
    elif not next_due and wake_at is not None:
        # The thread is left idle with work for later (docs/behaviour.md#future-wakes).
        delay = wake_at - rt.clock()
        if delay > 0:
            rt.wake(ctx.thread_id, delay)
        else:
            next_due = True  # due by now: settle wakes it at once
    return next_due


def _wake_later(rt: Runtime, thread_id: str, delay_ms: int) -> None:
    """The wake-up of a dispatch put back for later (a retry in backoff, a deferral). A
    worker's runtime sends none from here (docs/behaviour.md#future-wakes): its settle wakes
    the thread now, which claims the next due dispatch if there is one — and the settle of
    that one inherits the retry — or, when nothing is due, sends a wake-up for the moment the
    earliest Queued dispatch becomes due (`tasks.publishing.worker_wake`). A retry's own
    wake-up used to fire while the thread was busy with its next dispatch, for nothing."""
    if rt.start is None:
        rt.wake(thread_id, delay_ms)


@dataclass
class RecoveredAck:
    """The ack is ours (it had landed, or recovery acked again); `run` when it was read."""

    run: RunRecord | None
    landed: bool = False
    """The first ack had committed: with it, whatever its transaction claimed."""


def _after_lost_ack(rt: Runtime, ctx: PhaseContext, now: int
                    ) -> tuple[RunDispatch, AttemptFacts] | None:
    """What the ack's commit did after it, when its answer was lost but it landed
    (docs/behaviour.md#ack-recovery): a worker's ack (`ack_and_claim_next`) may have claimed
    the thread's next dispatch in its transaction — that claim is handed the lease and
    returned, to be started like any other (left alone, it would wait out its lease and be
    reclaimed with an attempt spent). Otherwise the lease the ack never gave back is given
    back now, so that the wake-up settle sends finds the thread free rather than waiting
    for the lease to run out. A claim that cannot be looked for is left to the sweep."""
    lease_ms = rt.settings.lease_ms
    following = None
    if rt.start is not None:
        try:
            following = rt.runs.claim_of_lost_ack(ctx.thread_id, rt.consumer_id, lease_ms, now)
        except MailboxError as exc:
            log.warning("the claim made by the lost ack of %s was not looked for (%s); its "
                        "lease runs out and the sweep reclaims it", ctx.describe(), exc)
            return None
    if following is None:
        rt.store.release_lost(ctx.thread_id, ctx.token)
        return None
    rt.store.hand_over_lost(ctx.thread_id, ctx.token, following[0], lease_ms, now)
    metrics.count_operation("ack_recovery", "claim_resumed")
    return following


def _recover_ack(rt: Runtime, ctx: PhaseContext, now: int) -> RecoveredAck | None:
    """Ack recovery (docs/behaviour.md#settle): the outcome is recorded, and whether our ack
    landed is unknown. Re-read the dispatch:

    - Acked with our time: our ack landed and only its answer was lost; we report it, once.
    - Acked at another time: another delivery of this settle, or the sweep once the lease ran
      out, acked it and reports it; we say nothing (None, ctx marked duplicate).
    - still Claimed by us: ack again, when the recorded result is done, or waiting for a
      decision (the documented departure: reclaiming a waiting result would run the agent
      and ask the human again). Any other recorded state is refused (None): the claim is
      left for the sweep, which decides with the run store under the thread lock.
    - anything else: the claim is not ours (VersionConflictError).

    If the second ack fails, that failure propagates (counted `ack_failed`): fenced, the
    settle goes "after a fence"; an outage leaves the claim for the sweep. A store outage
    while recovering propagates: the claim is left for the sweep, which acks
    a claim whose outcome is recorded."""
    started = time.perf_counter()

    def outcome(label: str) -> None:
        metrics.observe_ack_recovery(label, time.perf_counter() - started)

    current = rt.store.load_dispatch(ctx.dispatch_id)
    if current is None:
        outcome("missing")
        raise NotFoundError(ctx.dispatch_id)
    if current.status == DispatchStatus.Acked:
        if current.completed_at == now:
            outcome("landed")
            return RecoveredAck(None, landed=True)
        outcome("acked_elsewhere")
        ctx.duplicate = True
        ctx.finish("settled by another delivery of this attempt or by the sweep")
        return None
    if current.status != DispatchStatus.Claimed or current.claim_token != ctx.token:
        outcome("not_ours")
        raise VersionConflictError(0, 1)
    if current.run_status not in (RunStatus.done, RunStatus.waiting):
        outcome("refused")
        ctx.finish(f"ack recovery refused: the recorded result is "
                   f"{current.run_status.value if current.run_status else 'missing'}; left "
                   f"for the sweep")
        return None
    try:
        acked = rt.runs.ack(ctx.dispatch_id, ctx.token, ctx.run_id, now,
                            thread_id=ctx.thread_id)
    except MailboxError:
        outcome("ack_failed")  # fenced → after a fence; outage → left for the sweep
        raise
    outcome("acked")
    return RecoveredAck(acked.run)


def _record_failure(rt: Runtime, ctx: PhaseContext, error: str, now: int) -> None:
    assert ctx.instance_id is not None
    rt.store.record_run_result(ctx.dispatch_id, ctx.token, RunDispatchResult(
        ctx.run_id, ctx.instance_id, RunStatus.done, Termination.error(error), None, error),
        now)


def _settle_transient(rt: Runtime, ctx: PhaseContext, error: str, now: int) -> None:
    """Nack, then tell followers what the nack decided: "retrying" when the dispatch went back
    to the queue, "dead_letter" when that was its last attempt. The event follows the write,
    so a follower never sees "retrying" for an attempt that was the last one (its `follow`
    would never end)."""
    delay = retry_delay_ms(ctx.attempt, rt.settings.retry_base_ms, rt.settings.retry_max_ms)
    _record_failure(rt, ctx, error, now)
    rt.store.nack(ctx.dispatch_id, ctx.token, now + delay, error, now)
    after = rt.store.load_dispatch(ctx.dispatch_id)
    if after is not None and after.status == DispatchStatus.Queued:
        reports.retrying(rt.events, after, error, rt.clock())
        _wake_later(rt, ctx.thread_id, delay)
        return
    if after is not None and after.status == DispatchStatus.DeadLetter:
        reports.dead_letter(rt.events, ctx.run_id, ctx.dispatch_id, error, rt.clock(),
                            thread_id=ctx.thread_id)
    _reconcile(rt, after)


def _settle_deferred(rt: Runtime, ctx: PhaseContext, reason: str, now: int) -> str:
    """Put back a dispatch whose pinned agent version this worker lacks (T19), without
    spending an attempt, backing off as the wait grows (half the time waited so far, within
    the retry base and cap); once it has waited MAILBOX_MISSING_AGENT_GRACE_S since a
    worker first found the version missing, dead-letter it with a reason naming the version
    (`mailbox_operations_total{operation="agent_missing"}` counts both). That dead letter is
    a permanent failure like any other, its completion metrics included (a deferral has
    none: nothing ran). Returns what settle did: DEFERRED, or PERMANENT past the grace."""
    current = rt.store.load_dispatch(ctx.dispatch_id)
    since = now if current is None or current.deferred_since is None \
        else current.deferred_since
    waited_ms = max(0, now - since)
    grace_s = rt.settings.missing_agent_grace_s
    if waited_ms >= grace_s * 1000:
        metrics.count_operation("agent_missing", "dead_letter")
        _record_completion(ctx, PERMANENT, now)
        _settle_permanent(rt, ctx, (
            f"{reason}, nor on any worker that took it in {waited_ms // 1000} s "
            f"(MAILBOX_MISSING_AGENT_GRACE_S={grace_s}): deploy that version, then replay "
            f"this dead letter"), now)
        return PERMANENT
    delay = int(min(max(rt.settings.retry_base_ms, waited_ms // 2), rt.settings.retry_max_ms))
    requeued = rt.store.defer(ctx.dispatch_id, ctx.token, now + delay, reason, now)
    metrics.count_operation("agent_missing", "deferred")
    rt.events.emit(ctx.run_id, ctx.dispatch_id, "run_rescheduled", {
        "reason": "agent_version_missing", "error": reason,
        "attempt_count": requeued.attempt_count, "available_at": requeued.available_at},
        ts=rt.clock(), thread_id=ctx.thread_id)
    _wake_later(rt, ctx.thread_id, delay)
    return DEFERRED


def _settle_permanent(rt: Runtime, ctx: PhaseContext, error: str, now: int) -> None:
    """Dead-letter, then report it: like a nack, the event follows the write it reports (a
    dead letter fenced off by an interrupt reports the cancellation instead)."""
    _record_failure(rt, ctx, error, now)
    rt.store.dead_letter(ctx.dispatch_id, ctx.token, error, now)
    reports.dead_letter(rt.events, ctx.run_id, ctx.dispatch_id, error, rt.clock(),
                        thread_id=ctx.thread_id)
    _reconcile(rt, rt.store.load_dispatch(ctx.dispatch_id))


# ================================================================================= metrics
def _record_start(ctx: PhaseContext) -> None:
    started = ctx.started_at
    assert started is not None
    for name, since in (("enqueue_to_start", ctx.created_at),
                        ("eligible_to_start", ctx.available_at),
                        ("claim_to_start", ctx.claimed_at)):
        metrics.observe_start(name, max(0, started - since) / 1000)


def _record_completion(ctx: PhaseContext, outcome: str, now: int) -> None:
    started = now if ctx.started_at is None else ctx.started_at
    metrics.observe_completion(outcome, runtime_s=max(0, now - started) / 1000,
                               enqueue_to_complete_s=max(0, now - ctx.created_at) / 1000)


# ============================================================================ whole chain
PHASES: tuple[Callable[[Runtime, PhaseContext], PhaseContext], ...] = (
    verify, reconstruct, resolve, execute, settle)


def run_chain(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    """All five phases in this process: what the Celery chain does across messages."""
    for phase in PHASES:
        ctx = phase(rt, ctx)
    return ctx
