"""Shared test set-up: paths of the project and a way to run the CLI in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


# With `make test` the suite runs on two pytest-xdist workers (--dist loadgroup,
# --no-loadscope-reorder). Tests that share expensive session fixtures (built images,
# package caches) stay on one worker as a group; the longest groups go first, one per
# worker, so that the arm64 track (package scripts under emulation, slow boots) runs
# next to the amd64 one instead of after it.
GROUPS = ("vm-arm64", "vm-amd64", "integration", "vm-power-cuts")


def _group(item: pytest.Item) -> str | None:
    path = item.path.as_posix()
    if "/tests/vm/" in path:
        if "arm64" in item.name:
            return "vm-arm64"
        if "power_cuts" in item.name:
            return "vm-power-cuts"
        return "vm-amd64"
    if "/tests/integration/" in path:
        return "integration"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = {g: i for i, g in enumerate(GROUPS)}
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda it: order.get(_group(it) or "", len(GROUPS)))
