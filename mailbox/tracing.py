"""OpenTelemetry traces of a dispatch (docs/architecture.md#tracing), with the optional
`otel` extra.

One trace per dispatch: the submit span (in the caller, or the HTTP API) → claim → verify →
reconstruct → resolve → execute (the agent) → settle, across processes. The submit span's W3C
`traceparent` is stored with the dispatch (a column of its row): whichever process claims it
— a wake-up's worker, a settle claiming the thread's next dispatch inline, the sweep — starts
the dispatch's spans under it, and carries it to the next phase in the phase context. A retry
is the same dispatch claimed again, so its spans join the same trace (attribute
`mailbox.attempt` tells the attempts apart); every span names its run (`mailbox.run_id`).
Celery's own spans come from opentelemetry-instrumentation-celery, in the workers
(`tasks.monitoring`) and in a process that publishes.

Off by default, at zero cost: nothing here imports OpenTelemetry unless tracing is on, and
then only once. It is on when MAILBOX_TRACING=1, or when the standard OTEL_TRACES_EXPORTER
names an exporter (not `none`). Exporters: the standard OTEL_* environment through the SDK's
own configuration when an exporter is named (`otlp` needs opentelemetry-exporter-otlp,
`console` writes to stdout), and MAILBOX_TRACE_FILE, a file of JSON lines (one span each,
appended by every process: for local inspection and the tests). An application that set up
its own TracerProvider keeps it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT_CHARS = 55  # "00-<32 hex>-<16 hex>-<2 hex>"
_lock = threading.Lock()
_state: dict[str, Any] = {"pid": None, "tracer": None}


def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("MAILBOX_TRACING", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return (bool(exporter) and exporter != "none") or bool(env.get("MAILBOX_TRACE_FILE"))


ENABLED = enabled()


def _tracer() -> Any:
    """The process's tracer, set up on first use (again in a forked child: span processors'
    threads and files do not survive a fork)."""
    with _lock:
        if _state["pid"] != os.getpid():
            _state["tracer"] = _set_up()
            _state["pid"] = os.getpid()
        return _state["tracer"]


def _set_up() -> Any:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    except ImportError:
        log.warning("tracing is on but OpenTelemetry is not installed: pip install "
                    "'dispatch-mailbox[otel]'")
        return None
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider) or os.environ.get("MAILBOX_TRACE_FILE"):
        provider = TracerProvider(resource=Resource.create({
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "dispatch-mailbox")}))
        path = os.environ.get("MAILBOX_TRACE_FILE")
        if path:
            provider.add_span_processor(SimpleSpanProcessor(json_lines_exporter(path)))
        _add_configured_exporter(provider)
        trace.set_tracer_provider(provider)
    return trace.get_tracer("dispatch-mailbox")


def _add_configured_exporter(provider: Any) -> None:
    """The exporter OTEL_TRACES_EXPORTER names (the SDK reads its own OTEL_EXPORTER_* and
    OTEL_BSP_* settings)."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not name or name == "none":
        return
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter: Any
    if name == "console":
        exporter = ConsoleSpanExporter()
    elif name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp")
            return
        exporter = OTLPSpanExporter()
    else:
        log.warning("OTEL_TRACES_EXPORTER=%s is not one this project sets up (otlp, console)",
                    name)
        return
    provider.add_span_processor(BatchSpanProcessor(exporter))


def json_lines_exporter(path: str) -> Any:
    """A span exporter that appends one JSON line per span to `path`, from any number of
    processes (each batch is one write to a file opened for appending). Built on first use:
    the SDK is imported only when tracing is on."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            lines = []
            for span in spans:
                context = span.get_span_context()
                parent = span.parent
                lines.append(json.dumps({
                    "name": span.name, "trace_id": f"{context.trace_id:032x}",
                    "span_id": f"{context.span_id:016x}",
                    "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                    "start": span.start_time, "end": span.end_time, "pid": os.getpid(),
                    "attributes": dict(span.attributes or {}),
                    "status": span.status.status_code.name}, default=str))
            with open(path, "a") as out:
                out.write("".join(line + "\n" for line in lines))
            return SpanExportResult.SUCCESS

    return JsonLinesExporter()


def _context_of(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


@contextlib.contextmanager
def span(name: str, *, traceparent: str | None = None,
         attributes: Mapping[str, Any] | None = None, start_ns: int | None = None
         ) -> Iterator[Any]:
    """A span named `name`, child of the dispatch whose `traceparent` is given (else of the
    current span), started at `start_ns` (time.time_ns(); now when None); None when tracing
    is off. Attributes with a None value are left out."""
    if not ENABLED:
        yield None
        return
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer.start_as_current_span(name, context=_context_of(traceparent),
                                      attributes=attrs, start_time=start_ns) as current:
        yield current


def set_attributes(current: Any, **attributes: Any) -> None:
    if current is not None:
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def traceparent_of(current: Any) -> str | None:
    """The W3C traceparent of a span (what the dispatch row keeps); None without one."""
    if current is None:
        return None
    context = current.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def phase_attributes(ctx: Any) -> dict[str, Any]:
    """The attributes of a dispatch's spans, from its phase context."""
    return {"mailbox.dispatch_id": ctx.dispatch_id, "mailbox.thread_id": ctx.thread_id,
            "mailbox.run_id": ctx.run_id, "mailbox.attempt": ctx.attempt,
            "mailbox.agent": "@".join(ctx.agent) if ctx.agent else ctx.resolution_id}


def end_attributes(current: Any, ctx: Any) -> None:
    """What a phase came to, on its span."""
    if current is None:
        return
    set_attributes(current, **{
        "mailbox.agent": "@".join(ctx.agent) if ctx.agent else ctx.resolution_id,
        "mailbox.outcome": ctx.settled or (ctx.outcome.kind if ctx.outcome else None),
        "mailbox.done": ctx.done, "mailbox.reason": ctx.reason,
        "mailbox.stop": ctx.stop_kind})


def instrument_celery() -> None:
    """Celery's own spans (opentelemetry-instrumentation-celery), when tracing is on."""
    if not ENABLED:
        return
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        log.warning("tracing is on but opentelemetry-instrumentation-celery is not installed")
        return
    _tracer()  # the provider first: the instrumentor takes the global one
    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
