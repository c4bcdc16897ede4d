"""A failing statement's error never carries its bound parameters (mailbox/database.py sets
`hide_parameters`): they are runs' inputs, responses and claim tokens, and an error's text
goes wherever it is logged. On SQLite, and on PostgreSQL when MAILBOX_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import traceback

import pytest
import sqlalchemy as sa

from mailbox.database import create_engine

PAYLOAD = "payload-that-must-not-be-logged"


def test_a_failing_statement_hides_its_parameters(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE secrets (id INTEGER PRIMARY KEY, body TEXT)")
        insert = sa.text("INSERT INTO secrets (id, body) VALUES (:id, :body)")
        with engine.begin() as conn:
            conn.execute(insert, {"id": 1, "body": "first"})
        with pytest.raises(sa.exc.IntegrityError) as failed, engine.begin() as conn:
            conn.execute(insert, {"id": 1, "body": PAYLOAD})
        text = "".join(traceback.format_exception(failed.value))
        assert "INSERT INTO secrets" in text, "the statement itself is still shown"
        assert "hidden due to hide_parameters" in text
        assert PAYLOAD not in text and PAYLOAD not in repr(failed.value)
    finally:
        engine.dispose()
