"""An application's own agents reach the workers through MAILBOX_AGENT_MODULES."""

from __future__ import annotations

import pytest

from mailbox import DispatchStatus, Mailbox, ValidationError
from mailbox.agents import load_agent_modules
from tests.support.workers import Stack


def test_worker_runs_an_agent_from_mailbox_agent_modules(celery_stack: Stack,
                                                         mailbox: Mailbox) -> None:
    celery_stack.env_overrides["MAILBOX_AGENT_MODULES"] = "tests.support.custom_agents"
    load_agent_modules("tests.support.custom_agents")  # the submitting side knows it too
    receipt = mailbox.submit("thread-custom", "shout", "hello")  # durable, no wake-up sent
    celery_stack.start_worker(concurrency=1)  # its start-up sweep delivers the dispatch

    final = mailbox.wait(receipt.dispatch_id, timeout_s=60)
    assert final.status == DispatchStatus.Acked, celery_stack.logs()
    assert final.run_response == "HELLO"
    run = mailbox.get_run(final.run_id)
    assert run is not None and run.resolution_id == "shout@3"


def test_an_agent_module_that_does_not_import_is_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="no_such_module"):
        load_agent_modules("tests.support.no_such_module")
