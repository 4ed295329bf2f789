"""Schemathesis against the fleet API's own OpenAPI document: generated requests, valid and
not, to every operation, as an admin; no answer may be a server error or break the
document's promises about status codes and bodies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from cerulean.fleet.api import FleetState, create_app
from cerulean.fleet.auth import create_token
from cerulean.fleet.ca import FleetCA
from cerulean.fleet.db import User, make_engine, migrate, sessions

pytestmark = pytest.mark.fleet
TOKEN: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("schema")
    engine = make_engine(f"sqlite:///{d / 'fleet.db'}")
    migrate(engine)
    maker = sessions(engine)
    with maker.begin() as s:
        s.add(User(name="admin", role="admin"))
        s.flush()
        TOKEN["admin"] = create_token(s, "admin", "admin")
    app = create_app(FleetState(maker, FleetCA.create(d / "ca")))
    yield schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    engine.dispose()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_generated_request_is_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN['admin']}"},
        checks=[checks.not_a_server_error, checks.response_schema_conformance,
                checks.content_type_conformance])


def test_the_document_lists_every_part_of_the_api(api_schema: Any, tmp_path: Path) -> None:
    paths = set(api_schema.raw_schema["paths"])
    for p in ("/api/v1/enroll", "/api/v1/agent/reports", "/api/v1/hosts",
              "/api/v1/hosts/{host_id}/packages", "/api/v1/rollouts/{rollout_id}/{action}",
              "/api/v1/groups/{group}/policy", "/api/v1/compliance/report", "/api/v1/audit"):
        assert p in paths
    # The dashboard's pages are not part of the API.
    assert "/login" not in paths and "/" not in paths
