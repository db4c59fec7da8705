"""A throwaway PostgreSQL server on loopback, for tests and benchmarks."""

from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql

from fedpneumo.flower import free_port

log = logging.getLogger(__name__)

SUPERUSER = "postgres"


def find_pg_bin() -> Path:
    """Return the folder holding ``initdb`` and ``pg_ctl``, or raise."""
    candidates = [os.environ.get("PG_BIN", "")]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists():
            return Path(folder)
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install "
        "postgresql or set PG_BIN to their folder"
    )


class ThrowawayPostgres:
    """Run a private PostgreSQL server from a temporary folder.

    As root the server runs as the unprivileged ``postgres`` user, since
    PostgreSQL refuses to run as root. Superuser and password are random.
    """

    def __init__(self, *, durable: bool = False) -> None:
        # Tests trade durability for speed; benchmarks ask for PostgreSQL's
        # defaults (fsync, synchronous commit, full page writes all on).
        self.durable = durable
        self.bin = find_pg_bin()
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.root = Path(tempfile.mkdtemp(prefix="fedpneumo-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"

    # Commands --------------------------------------------------------------

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SUPERUSER, "--", *args]
        return args

    def _run(self, args: list[str]) -> None:
        proc = subprocess.run(
            self._as_owner(args), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({proc.returncode}): "
                f"{proc.stderr.strip()}\n{tail}"
            )

    def init(self) -> None:
        """Create the cluster with password authentication over TCP."""
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, SUPERUSER)
            shutil.chown(pwfile, SUPERUSER)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        )
        pwfile.unlink()

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c max_connections=300"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.logfile),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` simulates a crash."""
        if (self.data / "postmaster.pid").exists():
            self._run(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop"]
            )

    def cleanup(self) -> None:
        """Stop the server and delete its files."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # Databases -------------------------------------------------------------

    def url(
        self,
        database: str = "postgres",
        *,
        user: str = SUPERUSER,
        password: str | None = None,
    ) -> str:
        """Return a SQLAlchemy URL for a database on this server."""
        pw = self.password if password is None else password
        return f"postgresql+psycopg2://{user}:{pw}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname="postgres",
            connect_timeout=10,
        )
        conn.autocommit = True
        return conn

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        name = name or f"db_{secrets.token_hex(6)}"
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing its connections first."""
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)
                    )
                )
        finally:
            conn.close()

    def connection_count(self) -> int:
        """Return the number of client connections open right now (not ours)."""
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._admin().close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
