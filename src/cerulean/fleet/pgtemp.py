"""A throwaway PostgreSQL server from the Debian package's binaries, for the fleet's tests,
its load benchmark and trying the fleet out on PostgreSQL.

The cluster lives in a new temporary directory (``initdb``), listens on a Unix
socket only, and runs as the ``postgres`` user when started by root (PostgreSQL
refuses to run as root). :meth:`TempPostgres.restart` stops and starts it, as an
operator's restart would.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from cerulean.errors import CeruleanError


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name))
    if not found:
        raise CeruleanError("PostgreSQL is not installed: apt install postgresql.")
    return found[-1].parent


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class TempPostgres:
    base: Path
    port: int
    bindir: Path
    opts: str
    counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    def url(self, db: str) -> str:
        return f"postgresql://postgres@/{db}?host={self.socket_dir}&port={self.port}"

    def new_database(self, prefix: str = "fleet") -> str:
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self.counter)}"
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D",
                                     str(self.base / "data"), *args]),
                       check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("-o", self.opts, "-l", str(self.base / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def temporary_postgres(fsync: bool = False, max_connections: int = 200
                       ) -> Iterator[TempPostgres]:
    bindir = pg_bin()
    # Not under a directory of root's: the postgres user must be able to enter it.
    base = Path(tempfile.mkdtemp(prefix="cerulean-pg-"))
    (base / "sock").mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(base / "sock", "postgres")
    with socket.socket() as s:  # the port only names the socket file: no TCP
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(base / "data"), "-U",
                                 "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    opts = (f"-k {base / 'sock'} -p {port} -c listen_addresses='' "
            f"-c fsync={'on' if fsync else 'off'} -c max_connections={max_connections}")
    pg = TempPostgres(base, port, bindir, opts)
    pg.start()
    try:
        yield pg
    finally:
        with suppress(subprocess.CalledProcessError):
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)
