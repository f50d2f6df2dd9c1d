"""Real servers for the kit's tests, started and stopped by the tests: Postgres with
`wal_level = logical`, Redis, a one-node Apache Kafka (KRaft, from the jars the repository's
scripts fetch), and outboxd itself.

Where they come from (scripts/test.sh sets these): `OUTBOXD_TEST_PG_BIN` (else the newest
/usr/lib/postgresql/*/bin), `OUTBOXD_TEST_KAFKA_JARS`, `OUTBOXD_BIN` (else
target/debug/outboxd).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} did not happen within {timeout} s\n{tail}")


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Postgres:
    """A throwaway cluster on a free port; superuser `postgres`, trust authentication."""

    def __init__(self, scratch: Path) -> None:
        self.bin = Path(os.environ.get("OUTBOXD_TEST_PG_BIN") or _newest_pg_bin())
        self.dir = scratch / "pg"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.log = scratch / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(scratch, "postgres", "postgres")
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [str(self.bin / "initdb"), "-D", str(self.dir), "-U", "postgres", "-E", "UTF8",
                 "--locale=C", "--auth=trust", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )
        with open(self.dir / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n"
                "fsync = off\nsynchronous_commit = off\n"
            )
        self.proc = subprocess.Popen(
            _as_postgres([str(self.bin / "postgres"), "-D", str(self.dir)]),
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for("Postgres to accept connections", lambda: self.connect("postgres").close() or True,
                 log=self.log)

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str, **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.url(db), **kwargs)

    def create_database(self, name: str) -> None:
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        """A fast shutdown, through pg_ctl: `runuser` does not pass signals on."""
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "stop", "-D", str(self.dir), "-m", "fast",
                          "-w", "-t", "30"]),
            capture_output=True,
        )
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _newest_pg_bin() -> str:
    found = sorted(
        (int(p.name), p / "bin")
        for p in Path("/usr/lib/postgresql").glob("*")
        if p.name.isdigit() and (p / "bin" / "postgres").exists()
    )
    if not found:
        raise RuntimeError("no Postgres: install it or set OUTBOXD_TEST_PG_BIN")
    return str(found[-1][1])


class Redis:
    """redis-server on a free port, without persistence."""

    def __init__(self, scratch: Path) -> None:
        self.port = free_port()
        self.log = scratch / "redis.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        import redis

        self.client = redis.Redis(port=self.port)
        wait_for("Redis to answer", self.client.ping, log=self.log)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Kafka:
    """One Apache Kafka node in KRaft mode, plaintext, topics not created on first use."""

    def __init__(self, scratch: Path) -> None:
        jars = os.environ.get("OUTBOXD_TEST_KAFKA_JARS")
        if not jars:
            raise RuntimeError("OUTBOXD_TEST_KAFKA_JARS is not set: run scripts/test.sh")
        self.dir = scratch / "kafka"
        self.dir.mkdir()
        self.port, controller = free_port(), free_port()
        props = self.dir / "server.properties"
        props.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.voters=1@127.0.0.1:{controller}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}\n"
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
            "controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n"
            f"log.dirs={self.dir / 'data'}\nnum.partitions=1\ndefault.replication.factor=1\n"
            "offsets.topic.replication.factor=1\noffsets.topic.num.partitions=3\n"
            "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\n"
            "auto.create.topics.enable=false\ngroup.initial.rebalance.delay.ms=0\n"
        )
        (self.dir / "log4j2.properties").write_text(
            "status = warn\nappender.file.type = File\nappender.file.name = file\n"
            f"appender.file.fileName = {self.dir / 'server.log'}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\nrootLogger.appenderRef.file.ref = file\n"
        )
        java = ["java", "-Xms128m", "-Xmx448m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "-cp", f"{jars}/*"]
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(
            [*java, "kafka.tools.StorageTool", "format", "--ignore-formatted", "-t", cluster_id,
             "-c", str(props)],
            check=True, capture_output=True, cwd=self.dir,
        )
        self.log = self.dir / "stdout.log"
        self.proc = subprocess.Popen(
            [*java, "kafka.Kafka", str(props)], cwd=self.dir,
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        from confluent_kafka.admin import AdminClient

        self.admin = AdminClient({"bootstrap.servers": self.brokers, "log_level": 2})
        wait_for("Kafka to answer", lambda: self.admin.list_topics(timeout=2).brokers,
                 timeout=120, log=self.log)

    @property
    def brokers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        terminate(self.proc)


class Outboxd:
    """`outboxd run` with a configuration file written here; `setup` done first."""

    def __init__(self, scratch: Path, name: str, config: str) -> None:
        self.bin = os.environ.get("OUTBOXD_BIN") or str(ROOT / "target" / "debug" / "outboxd")
        if not Path(self.bin).exists():
            raise RuntimeError(f"no outboxd binary at {self.bin}: cargo build, or set OUTBOXD_BIN")
        self.config = scratch / f"{name}.toml"
        self.config.write_text(config)
        self.log = scratch / f"{name}.log"
        setup = subprocess.run([self.bin, "setup", "--config", str(self.config)],
                               capture_output=True, text=True)
        if setup.returncode != 0:
            raise RuntimeError(f"outboxd setup: {setup.stdout}{setup.stderr}")
        self.proc = subprocess.Popen(
            [self.bin, "run", "--config", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def scratch_dir(name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"outboxd-py-{name}-"))
    path.chmod(0o755)
    return path
