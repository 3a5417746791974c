"""A real PostgreSQL server for the tests: initdb into a temporary folder, `postgres` on a free loopback
port, one fresh database per test, `pg_ctl stop -m fast` at the end of the session (also after a failure).

Load the fixtures with `pytest_plugins = ["tests.postgres"]` in a test module. The server binaries come from
Debian's `postgresql` package (`make test` installs it); without them the tests fail, they do not skip.
Run as root (as in the test containers), the server runs as the `postgres` OS user, as initdb requires.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port

APP_USER = "loraserve"
START_TIMEOUT = 60


def server_binaries() -> Path:
    """The folder holding initdb, postgres and pg_ctl: the newest /usr/lib/postgresql/N/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pytest.fail("PostgreSQL server binaries (initdb, postgres, pg_ctl) are missing: install Debian's `postgresql` "
                "package (`make test` does).", pytrace=False)


@dataclass
class PostgresServer:
    bin: Path
    data: Path
    sockets: Path
    port: int
    password: str
    process: subprocess.Popen
    run_as: dict

    def superuser(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=str(self.sockets), port=self.port, user="postgres", dbname=dbname,
                               autocommit=True)

    def create_database(self, name: str) -> str:
        """A new empty database owned by the (non-superuser) application role; its SQLAlchemy URL."""
        with self.superuser() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {APP_USER}')
        return f"postgresql+psycopg://{APP_USER}:{self.password}@127.0.0.1:{self.port}/{name}"

    def log_tail(self) -> str:
        log = self.data.parent / "postgres.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            subprocess.run([str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30"],
                           capture_output=True, timeout=60, **self.run_as)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(root: Path) -> PostgresServer:
    """initdb and start a server under `root` (a folder this function owns); fails with the server's log."""
    bindir = server_binaries()
    run_as: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [],
                  "env": {**os.environ, "HOME": str(root), "USER": "postgres"}}
    data, sockets, password = root / "data", root / "sockets", secrets.token_urlsafe(16)
    sockets.mkdir()
    (root / "pwfile").write_text(password + "\n")
    if run_as:
        for path in (sockets, root / "pwfile"):
            os.chown(path, run_as["user"], run_as["group"])
    # Unix socket: trust (the socket folder is private to this test run); TCP: password only.
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(root / "pwfile"),
         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
        capture_output=True, text=True, timeout=120, **run_as,
    )
    assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
    port = free_port()
    log = (root / "postgres.log").open("wb")
    process = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **run_as,
    )
    server = PostgresServer(bindir, data, sockets, port, password, process, run_as)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with server.superuser() as conn:
                conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{password}'")
            return server
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"PostgreSQL did not start:\n{server.log_tail()}", pytrace=False)
            time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    # Not under pytest's tmp folder: that one is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="loraserve-pg-"))
    try:
        server = start_server(root)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for one test."""
    return postgres_server.create_database(f"t_{secrets.token_hex(6)}")
