"""An in-memory SQLite database that every connection of this process shares.

The harness must run the real store, which opens a pool of connections (the heartbeat's
renewals come from another thread than the phases, a test reads while a worker writes), so
SQLite's private `:memory:` database will not do: each connection would get its own. The two
ways to share one were measured here (SQLite 3.40, four writer and four reader threads):

- a shared-cache URI (`file:name?mode=memory&cache=shared`) locks per table and answers a
  conflict with SQLITE_LOCKED at once, which the busy timeout does not retry: "database table
  is locked" for 8 of 8 threads;
- the `memdb` VFS (`file:/name?vfs=memdb`, SQLite >= 3.36) shares the database between the
  connections that name it, with ordinary database locks that the busy timeout retries:
  every write landed, no errors. It is used here.

Its one departure from the file database of production: memdb has no write-ahead log
(`PRAGMA journal_mode=WAL` leaves it in `memory` mode), so a reader waits while a writer holds
the database, instead of reading the last commit beside it. Transactions are short, so that
costs microseconds; and `write_gate` skips non-file databases (there is no file to lock).

The database lives while one connection is open: `MemoryDatabase` holds one from `open` to
`close`, so it survives the store's pool closing idle connections.
"""

from __future__ import annotations

import sqlite3
import uuid

MIN_SQLITE_VERSION = (3, 36, 0)


class MemoryDatabase:
    """One uniquely named in-memory database; `url` is its SQLAlchemy URL."""

    def __init__(self, name: str | None = None) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} has no shareable in-memory database (the "
                f"memdb VFS needs 3.36): pass a database_url, e.g. a temporary file")
        self.name = f"/{name or 'mailbox-' + uuid.uuid4().hex}"
        self._keeper: sqlite3.Connection | None = None

    @property
    def url(self) -> str:
        return f"sqlite:///file:{self.name}?vfs=memdb&uri=true"

    def open(self) -> MemoryDatabase:
        if self._keeper is None:
            self._keeper = sqlite3.connect(f"file:{self.name}?vfs=memdb", uri=True,
                                           check_same_thread=False)
        return self

    def close(self) -> None:
        """Drop the database (once every other connection to it is closed too)."""
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
