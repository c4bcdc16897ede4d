"""The Celery app. `celery -A tasks worker` and `celery -A tasks beat` find it here."""

from __future__ import annotations

from celery import Celery

app = Celery("mailbox")
app.config_from_object("celeryconfig")
