"""`Mailbox`: the one object applications and operators hold (DESIGN.md §7)."""

from __future__ import annotations

from mailbox.coordination import Coordinator, connect_redis
from mailbox.database import create_engine
from mailbox.errors import ValidationError
from mailbox.schema import upgrade
from mailbox.settings import Settings, validate_namespace
from mailbox.store import MailboxStore


class Mailbox:
    """The store plus the schema, behind one connect call."""

    def __init__(self, store: MailboxStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    @classmethod
    def connect(cls, database_url: str | None = None, redis_url: str | None = None, *,
                namespace: str = "mailbox", settings: Settings | None = None) -> Mailbox:
        """Connect to SQL and Redis. Missing URLs come from the environment
        (MAILBOX_DATABASE_URL, MAILBOX_REDIS_URL); nothing is created until `create_schema`.
        """
        base = settings or Settings.from_env()
        validate_namespace(namespace)
        db = database_url or base.database_url
        rurl = redis_url or base.redis_url
        if not rurl:
            raise ValidationError(
                "no Redis URL: pass redis_url, set MAILBOX_REDIS_URL, or start the dev stack "
                "with `python -m mailbox up`"
            )
        engine = create_engine(db)
        coordinator = Coordinator(connect_redis(rurl), namespace)
        from dataclasses import replace

        resolved = replace(base, database_url=db, redis_url=rurl, namespace=namespace)
        return cls(MailboxStore(engine, coordinator), resolved)

    def create_schema(self) -> None:
        """Run the Alembic migrations up to head (safe to call on a current database)."""
        upgrade(self.store.engine)

    def close(self) -> None:
        self.store.engine.dispose()
        self.store.coordinator.client.close()

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
