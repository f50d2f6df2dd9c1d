"""The servers every test shares (started once, stopped at the end) and helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from servers import Kafka, Outboxd, Postgres, Redis, scratch_dir, wait_for

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def scratch():
    """This run's directory (servers' data and logs); removed at the end."""
    path = scratch_dir("kit")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(scratch):
    server = Postgres(scratch)
    server.create_database("shop")
    from shop.settings import configure

    configure(server.port)
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    yield server
    from django.db import connections

    connections.close_all()
    server.stop()


@pytest.fixture(scope="session")
def redis_server(scratch):
    server = Redis(scratch)
    yield server
    server.stop()


def start_outboxd(scratch, pg, slot: str, sink: str):
    """`outboxd run` on its own slot of the `shop` database, with `sink` as its sink sections."""
    return Outboxd(
        scratch,
        f"outboxd-{slot}",
        f'[postgres]\nurl = "{pg.url("shop")}"\nslot = "{slot}"\n\n[http]\nlisten = ""\n\n{sink}',
    )


@pytest.fixture(scope="session")
def outboxd_redis(scratch, pg, redis_server):
    """outboxd streaming the outbox to Redis (streams `outbox.<aggregate_type>`)."""
    daemon = start_outboxd(
        scratch, pg, "py_redis", f'[sink]\nkind = "redis"\n\n[sink.redis]\nurl = "{redis_server.url}"\n'
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def kafka(scratch):
    server = Kafka(scratch)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def outboxd_kafka(scratch, pg, kafka):
    """outboxd streaming the outbox to Kafka (topics `outbox.<aggregate_type>`, 4 partitions)."""
    daemon = start_outboxd(
        scratch,
        pg,
        "py_kafka",
        '[sink]\nkind = "kafka"\n\n'
        f'[sink.kafka]\nbrokers = "{kafka.brokers}"\ncreate_topics = true\ntopic_partitions = 4\n',
    )
    yield daemon
    daemon.stop()


class ConsumerProcess:
    """A consumer in its own process (tests/consumer_app.py)."""

    def __init__(self, scratch: Path, pg: Postgres, *args: str) -> None:
        self.log = scratch / f"consumer-{uuid.uuid4().hex[:8]}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "consumer_app.py"), "--db-port", str(pg.port), *args],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for("the consumer to start", lambda: "consumer running" in self.log.read_text(),
                 log=self.log)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def consumers(scratch, pg):
    """Starts consumer processes; stops (or kills) what is left at the end of the test."""
    started: list[ConsumerProcess] = []

    def start(*args: str) -> ConsumerProcess:
        c = ConsumerProcess(scratch, pg, *args)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)


def stream_events(redis_client, stream: str) -> list[dict]:
    """The entries of `stream`, fields decoded, payload and headers parsed."""
    out = []
    for entry_id, fields in redis_client.xrange(stream):
        text = {k.decode(): v.decode() for k, v in fields.items()}
        text["entry_id"] = entry_id.decode()
        for name in ("payload", "headers"):
            if name in text:
                text[name] = json.loads(text[name])
        out.append(text)
    return out


def eventually(what: str, check, timeout: float = 60.0):
    """Polls `check` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _environment():
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
