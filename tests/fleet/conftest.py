"""Fleet fixtures: a real PostgreSQL server, and a real fleet server on each database.

PostgreSQL runs from the Debian package's binaries in a cluster made for the
test session (:mod:`cerulean.fleet.pgtemp`). Each test gets a database of its
own, so tests never see each other's hosts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cerulean.fleet.pgtemp import TempPostgres, temporary_postgres
from support.fleet_server import Fleet, launch


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    with temporary_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return ""  # the data directory's own fleet.db
    pg: TempPostgres = request.getfixturevalue("postgres")
    return pg.new_database()


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, database: str) -> Iterator[Fleet]:
    f = launch(tmp_path, database=database,
               postgres=request.getfixturevalue("postgres") if database else None)
    try:
        yield f
    finally:
        f.stop()
