"""The mailbox dashboard (`/ui`) in a real headless Chromium (Selenium), served by a real
uvicorn process over real workers.

A browser logs in with a token and walks every page; the run page shows an agent's tokens
as they are emitted; a dead letter is replayed by clicking and purged after a confirmation
page; a waiting run is resumed from its page, a running one cancelled. Without chromium and
chromium-driver these skip (saying how to install them), unless MAILBOX_TEST_REQUIRE_SERVICES
names "browser". Forms refusing cross-site posts and sessions ending with their token are
checked with httpx (no browser needed).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support.browser import chrome, screenshot, wait_for
from tests.support.http_server import ApiServer, api_server, start_server, stop_server, wait_json
from tests.support.workers import Stack

pytestmark = pytest.mark.stack_env(MAILBOX_AGENT_MODULES="tests.support.custom_agents",
                                   MAILBOX_API_FLOWER_URL="http://127.0.0.1:5555")


@pytest.fixture
def server(celery_stack: Stack) -> Iterator[ApiServer]:
    celery_stack.start_worker(concurrency=2)
    with api_server(celery_stack) as running:
        yield running


@pytest.fixture
def api(server: ApiServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chrome(tmp_path / "chromium-profile") as driver:
        yield driver


def _submit(api: httpx.Client, thread: str, agent: str, value: Any, **options: Any
            ) -> dict[str, str]:
    response = api.post(f"/v1/threads/{quote(thread, safe='')}/dispatches",
                        json={"agent": agent, "input": value, **options})
    assert response.status_code == 202, response.text
    return dict(response.json())


def _run_status(api: httpx.Client, run_id: str, status: str) -> dict[str, Any]:
    return wait_json(api, f"/v1/runs/{run_id}", lambda r: r["status"] == status,
                     what=f"run {run_id} to be {status}")


def _by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _log_in(driver: Any, server: ApiServer, path: str = "/ui") -> None:
    driver.get(server.url + path)
    wait_for(lambda: "/ui/login" in driver.current_url, what="the redirect to the login")
    _by_id(driver, "token").send_keys(server.token)
    _by_id(driver, "login").click()
    wait_for(lambda: driver.current_url == server.url + path, what=f"{path} after the login")


def _tokens(driver: Any) -> str:
    return str(_by_id(driver, "tokens").text).strip()


def _notice(driver: Any) -> str:
    return str(wait_for(lambda: _by_id(driver, "notice").text, what="the notice"))


# ============================================================================ the pages
def test_log_in_and_walk_every_page(browser: Any, server: ApiServer, api: httpx.Client,
                                    tmp_path: Path) -> None:
    for n in range(3):
        _submit(api, f"chat-{n}", "echo", f"hello {n}")
    chat = _submit(api, "chat-support", "echo", "where is my parcel?")
    wait_json(api, f"/v1/dispatches/{chat['dispatch_id']}", lambda d: d["status"] == "Acked")
    _submit(api, "chat-support", "echo", "thanks!")
    dead = _submit(api, "chat-broken", "fail", "this cannot work")
    ask = _submit(api, "chat-approval", "ask", "deploy to production?")
    _submit(api, "chat-later", "echo", "tomorrow", delay_ms=3_600_000)
    wait_json(api, f"/v1/dispatches/{dead['dispatch_id']}",
              lambda d: d["status"] == "DeadLetter")
    _run_status(api, ask["run_id"], "waiting")
    gate = tmp_path / "gate"
    live = _submit(api, "chat-stream", "slow_tokens",
                   {"tokens": ["The ", "parcel ", "left ", "the ", "depot."], "delay_ms": 50,
                    "gate": str(gate)})
    _run_status(api, live["run_id"], "running")

    browser.get(server.url + "/ui/threads")
    wait_for(lambda: "/ui/login?next=%2Fui%2Fthreads" in browser.current_url,
             what="the redirect to the login")
    screenshot(browser, "login")
    _by_id(browser, "token").send_keys("not-the-token-0000000000")
    _by_id(browser, "login").click()
    assert "not one of MAILBOX_API_TOKENS" in wait_for(
        lambda: _by_id(browser, "login-error").text, what="the login error")
    _by_id(browser, "token").send_keys(server.token)
    _by_id(browser, "login").click()
    wait_for(lambda: browser.current_url == server.url + "/ui/threads",
             what="the thread list after the login")
    session = {c["name"]: c for c in browser.get_cookies()}["mailbox_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert session["path"] == "/ui"

    rows = [r.text for r in _css(browser, "#threads tbody tr")]
    assert rows[0].startswith("chat-stream"), rows  # the most recently active first
    support = next(r for r in rows if r.startswith("chat-support"))
    assert support.split()[-1] == "2", support  # its two dispatches
    later = next(r for r in rows if r.startswith("chat-later"))
    assert later.split()[-3:] == ["1", "0", "1"], later  # queued 1, claimed 0, 1 dispatch
    screenshot(browser, "threads")

    browser.get(server.url + "/ui")
    assert _by_id(browser, "count-DeadLetter").text == "1"
    assert _by_id(browser, "runs-waiting").text == "1"
    assert ask["run_id"] in _by_id(browser, "waiting").text
    assert "deploy to production?" in _by_id(browser, "waiting").text
    screenshot(browser, "overview")

    browser.get(server.url + "/ui/threads/chat-support")
    wait_for(lambda: len(_css(browser, "#conversation li")) == 4, what="4 messages")
    texts = [m.text for m in _css(browser, "#conversation li")]
    assert "where is my parcel?" in texts[0] and "thanks!" in texts[-1], texts
    assert _css(browser, "a[href^='http://127.0.0.1:5555/task/']"), "no link to Flower"
    screenshot(browser, "thread")

    browser.get(server.url + f"/ui/runs/{live['run_id']}")
    wait_for(lambda: _tokens(browser) == "The", what="the first token")
    gate.touch()
    wait_for(lambda: _by_id(browser, "stream-state").text == "finished",
             what="the end of the stream")
    assert _tokens(browser) == "The parcel left the depot."
    assert _by_id(browser, "run-response").text == "The parcel left the depot."
    assert not _by_id(browser, "resume").is_displayed()
    assert not _by_id(browser, "cancel").is_displayed(), "cancel offered for a finished run"
    answer = _submit(api, "chat-assistant", "slow_tokens",
                     {"tokens": ["Your ", "parcel ", "left ", "the ", "depot ", "at ", "9:40 ",
                                 "and ", "arrives ", "tomorrow."], "delay_ms": 30})
    _run_status(api, answer["run_id"], "done")
    # The run is done when execute records the outcome; its dispatch is live (the page offers
    # a cancel) until settle acks it a moment later.
    wait_json(api, f"/v1/dispatches/{answer['dispatch_id']}", lambda d: d["status"] == "Acked")
    browser.get(server.url + f"/ui/runs/{answer['run_id']}")
    wait_for(lambda: _by_id(browser, "stream-state").text == "finished", what="the replay")
    assert not _css(browser, "#cancel")  # rendered done: nothing to cancel
    screenshot(browser, "run")

    browser.get(server.url + "/ui/dead-letters")
    assert dead["dispatch_id"] in _by_id(browser, "dead-letters").text
    assert "requested failure" in _by_id(browser, "dead-letters").text
    screenshot(browser, "dead-letters")

    browser.find_element("css selector", "button.logout, .logout button").click()
    wait_for(lambda: "/ui/login" in browser.current_url, what="the login page after logout")
    browser.get(server.url + "/ui")
    wait_for(lambda: "/ui/login" in browser.current_url, what="logged out for good")


def test_the_run_page_shows_tokens_as_they_are_emitted(browser: Any, server: ApiServer,
                                                       api: httpx.Client, tmp_path: Path
                                                       ) -> None:
    gate = tmp_path / "gate"
    tokens = ["Streaming ", "one ", "token ", "at ", "a ", "time."]
    ids = _submit(api, "chat-tokens", "slow_tokens",
                  {"tokens": tokens, "delay_ms": 400, "gate": str(gate)})
    _log_in(browser, server, f"/ui/runs/{ids['run_id']}")
    # The first token is on the page while the agent still waits at its gate: live.
    wait_for(lambda: _tokens(browser) == tokens[0].strip(), what="the first token")
    assert api.get(f"/v1/runs/{ids['run_id']}").json()["status"] == "running"
    assert _by_id(browser, "stream-state").text == "live"
    gate.touch()
    seen = [_tokens(browser)]
    full = "".join(tokens)
    deadline = time.monotonic() + 60
    while seen[-1] != full.strip() and time.monotonic() < deadline:
        text = _tokens(browser)
        if text != seen[-1]:
            seen.append(text)
        time.sleep(0.03)
    assert seen[-1] == full.strip(), seen
    # One token after another, each while the run went on: every prefix appeared.
    assert len(seen) >= len(tokens) - 1, seen
    assert all(full.startswith(text) for text in seen), seen
    wait_for(lambda: _by_id(browser, "stream-state").text == "finished", what="the end")
    events = [e.text for e in _css(browser, "#events li")]
    assert "run_finish" in events[-1] and sum("output" in e for e in events) == len(tokens)


def test_a_dead_letter_is_replayed_by_clicking_and_purged_after_confirmation(
        browser: Any, server: ApiServer, api: httpx.Client) -> None:
    dead = _submit(api, "chat-dl", "fail", "no luck")
    wait_json(api, f"/v1/dispatches/{dead['dispatch_id']}",
              lambda d: d["status"] == "DeadLetter")
    _log_in(browser, server, "/ui/dead-letters")
    row = f"tr[data-dispatch='{dead['dispatch_id']}']"
    _css(browser, f"{row} button.replay")[0].click()
    notice = _notice(browser)
    assert "Dead letter replayed as run" in notice, notice
    replay_run = re.search(r"run (\S+)\.", notice)
    assert replay_run is not None
    listed = api.get("/v1/threads/chat-dl/dispatches").json()
    assert len(listed) == 2 and replay_run[1] in {d["run_id"] for d in listed}
    assert replay_run[1] != dead["run_id"]
    # Clicking again does not run it twice.
    wait_for(lambda: _css(browser, f"{row} button.replay"), what="the row again")
    _css(browser, f"{row} button.replay")[0].click()
    assert "Already replayed" in _notice(browser)
    assert len(api.get("/v1/threads/chat-dl/dispatches").json()) == 2

    _css(browser, f"{row} input.pick")[0].click()
    _by_id(browser, "purge").click()
    confirm = wait_for(lambda: _by_id(browser, "confirm-purge"), what="the confirmation")
    assert "Purge 1 dead letter(s)?" in browser.find_element("tag name", "h1").text
    assert api.get(f"/v1/dispatches/{dead['dispatch_id']}").status_code == 200, \
        "purged before the confirmation"
    screenshot(browser, "purge-confirm")
    confirm.click()
    assert "Purged 1 dead letter(s)." in _notice(browser)
    assert api.get(f"/v1/dispatches/{dead['dispatch_id']}").status_code == 404
    assert not _css(browser, row)


def test_a_waiting_run_is_resumed_and_a_running_one_cancelled_from_their_pages(
        browser: Any, server: ApiServer, api: httpx.Client) -> None:
    ask = _submit(api, "chat-approval", "ask", "ship the release?")
    _run_status(api, ask["run_id"], "waiting")
    _log_in(browser, server)
    browser.find_element("css selector", f"#waiting a[href='/ui/runs/{ask['run_id']}']").click()
    wait_for(lambda: _by_id(browser, "resume").is_displayed(), what="the resume form")
    _by_id(browser, "decision").send_keys("approved from the browser")
    _by_id(browser, "resume-button").click()
    assert "Run resumed" in _notice(browser)
    wait_for(lambda: _by_id(browser, "stream-state").text == "finished",
             what="the resumed run's end on the page")
    assert _run_status(api, ask["run_id"], "done")["response"] == "approved from the browser"

    long = _submit(api, "chat-long", "sleep", {"ms": 60_000})
    _run_status(api, long["run_id"], "running")
    browser.get(server.url + f"/ui/runs/{long['run_id']}")
    wait_for(lambda: "run_started" in _by_id(browser, "events").text, what="run_started")
    _by_id(browser, "cancel").click()
    assert "to stop" in _notice(browser)
    done = _run_status(api, long["run_id"], "done")
    assert done["termination"]["type"] == "cancelled"
    wait_for(lambda: _by_id(browser, "stream-state").text == "finished", what="the end")


# ============================================================= CSRF and sessions (httpx)
def _login(client: httpx.Client, token: str) -> str:
    """Log in as a browser would; the CSRF token of the session."""
    form = client.get("/ui/login")
    assert form.status_code == 401
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    done = client.post("/ui/login", data={"token": token, "nonce": nonce[1], "next": "/ui"})
    assert done.status_code == 303 and done.headers["location"] == "/ui", done.text
    cookie = done.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    page = client.get("/ui/threads")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    return csrf[1]


def test_forms_refuse_cross_site_posts_and_sessions_end_with_their_token(
        celery_stack: Stack, server: ApiServer, api: httpx.Client) -> None:
    _submit(api, "chat-csrf", "echo", "x", delay_ms=600_000)
    epoch = api.get("/v1/threads/chat-csrf/dispatches").json()[0]["dispatch_epoch"]
    with server.anonymous(follow_redirects=False) as client:
        refused = client.post("/ui/login", data={"token": server.token, "nonce": "forged"})
        assert refused.status_code == 403  # no login CSRF
        csrf = _login(client, server.token)
        target = "/ui/threads/chat-csrf/interrupt"
        for data, headers in (({}, {}), ({"csrf_token": "wrong"}, {}),
                              ({"csrf_token": csrf}, {"Origin": "https://evil.example"})):
            response = client.post(target, data=data, headers=headers)
            assert response.status_code == 403, response.text
        listed = api.get("/v1/threads/chat-csrf/dispatches").json()
        assert listed[0]["status"] == "Queued" and listed[0]["dispatch_epoch"] == epoch
        done = client.post(target, data={"csrf_token": csrf},
                           headers={"Origin": server.url})
        assert done.status_code == 303 and "notice=interrupted" in done.headers["location"]
        assert api.get("/v1/threads/chat-csrf/dispatches").json()[0]["status"] == \
            "Superseded"
        # The same browser session on a server whose tokens no longer include its token.
        cookies = dict(client.cookies)
    stop_server(server)
    other = start_server(celery_stack, name="api-rotated")
    try:
        with other.anonymous(follow_redirects=False, cookies=cookies) as client:
            page = client.get("/ui", headers={"Accept": "text/html"})
            assert page.status_code == 303 and page.headers["location"].startswith(
                "/ui/login")
            assert client.get("/ui").status_code == 401
    finally:
        stop_server(other)
