// The run page: follow the run's events live (server-sent events) and show the tokens an
// agent emits (`ctx.emit("token", {"text": ...})`) as they arrive. EventSource reconnects on
// its own and resends the last event id, so the server resumes exactly after it; we close
// the source after the run's final run_finish (the server closes too), else the browser
// would reconnect to a finished stream.
(function () {
  "use strict";
  const root = document.getElementById("run");
  if (!root || !window.EventSource) { return; }
  const list = document.getElementById("events");
  const tokens = document.getElementById("tokens");
  const state = document.getElementById("stream-state");
  const status = document.getElementById("run-status");
  const resume = document.getElementById("resume");
  const cancel = document.getElementById("cancel");
  const response = document.getElementById("run-response");
  const types = ["run_queued", "run_started", "output", "suspended", "run_rescheduled",
                 "run_cancelled", "run_finish"];

  function isFinal(ev) {
    if (ev.type !== "run_finish") { return false; }
    const data = ev.data || {};
    const termination = data.termination || {};
    return data.status !== "retrying" && termination.type !== "suspended";
  }

  function tokenText(ev) {
    const data = ev.data || {};
    if (ev.type !== "output" || data.kind !== "token") { return null; }
    const inner = data.data;
    if (typeof inner === "string") { return inner; }
    return inner && typeof inner.text === "string" ? inner.text : null;
  }

  function show(ev) {
    const item = document.createElement("li");
    const when = document.createElement("span");
    when.textContent = new Date(ev.ts).toISOString().slice(11, 23) + "  ";
    const type = document.createElement("span");
    type.className = "type";
    type.textContent = ev.type;
    const data = document.createElement("span");
    data.textContent = ev.data === null || ev.data === undefined ? "" : JSON.stringify(ev.data);
    item.append(when, type, data);
    item.dataset.id = ev.id;
    if (isFinal(ev)) { item.className = "final"; }
    list.appendChild(item);
    const text = tokenText(ev);
    if (text !== null) { tokens.textContent += text; }
  }

  const source = new EventSource(root.dataset.events);
  source.onopen = function () { state.textContent = "live"; };
  source.onerror = function () {
    if (source.readyState !== EventSource.CLOSED) { state.textContent = "reconnecting…"; }
  };
  source.addEventListener("stream_error", function (message) {
    state.textContent = "stream error: " + JSON.parse(message.data).error;
  });
  types.forEach(function (name) {
    source.addEventListener(name, function (message) {
      const ev = JSON.parse(message.data);
      show(ev);
      if (name === "run_started") { status.textContent = "running"; }
      if (name === "run_queued" && ev.data && ev.data.resume && resume) { resume.hidden = true; }
      if (name === "suspended") {
        status.textContent = "waiting";
        if (resume) { resume.hidden = false; }
      }
      if (isFinal(ev)) {
        source.close();
        status.textContent = "done";
        state.textContent = "finished";
        if (response && ev.data && typeof ev.data.response === "string") {
          response.textContent = ev.data.response;
        }
        if (cancel) { cancel.closest("form").hidden = true; }
        if (resume) { resume.hidden = true; }
      }
    });
  });
})();
