"""Faults under load: the fleet server killed with SIGKILL and restarted, and its PostgreSQL
server restarted, while simulated agents check in. Nothing acknowledged may be lost and
nothing counted twice: every simulated host ends with the server holding exactly the
reports it made."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cerulean.fleet.simulate import Simulator, simulate
from support.fleet_server import Fleet

pytestmark = pytest.mark.fleet


def _load(fleet: Fleet, tmp_path: Path, fault: str, hosts: int = 30) -> None:
    token = fleet.enrollment_token("sim", uses=hosts)
    faults = []

    def during(sim: Simulator) -> None:
        time.sleep(3)
        if fault == "server":
            fleet.kill_and_restart()
        else:
            pg = fleet.postgres
            assert pg is not None
            pg.restart()
        faults.append(fault)

    (tmp_path / "work").mkdir()
    r = simulate(fleet.url, token, fleet.ca_sha256, hosts, 10.0, tmp_path / "work",
                 concurrency=8, say=lambda m: None, during=during)
    out = r.to_json()
    print(out)
    assert faults == [fault]
    assert r.enrolled == hosts and r.checkins > 50
    # The fault was felt, as refused connections or (database down) 503s, never a 500...
    assert r.failed_checkins > 0 and r.errors, out
    assert "HTTP 500" not in r.errors, out
    # ...and nothing was lost or counted twice.
    assert (r.reports_pending, r.lost, r.mismatched_hosts) == (0, 0, 0), out
    assert r.reports_on_server == r.reports_acknowledged == r.reports_made, out


def test_a_server_killed_under_load_loses_nothing(fleet: Fleet, tmp_path: Path) -> None:
    _load(fleet, tmp_path, "server")


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_postgresql_restart_under_load_loses_nothing(fleet: Fleet, tmp_path: Path) -> None:
    _load(fleet, tmp_path, "postgres")
