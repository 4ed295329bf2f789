"""Shared test set-up: paths of the project and a way to run the CLI in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


# With `make test` the suite runs on two pytest-xdist workers (--dist loadgroup,
# --no-loadscope-reorder), one per CPU. The QEMU tests are nearly all of its time,
# so they are split by hand into two tracks of about equal length, one per worker
# (xdist hands the first group to the first worker, the second to the second).
# Tests that share a session fixture (a built image) stay in one track; the vm
# image cache is shared between the workers (tests/vm/conftest.py). Everything
# else runs after the tracks, on whichever worker is free.
TRACKS: dict[str, tuple[str, ...]] = {
    # arm64: package scripts under emulation, the slowest composition; then the vm's
    # boot with the checks inside it, and the publisher's whole loop on a vm host (its
    # tree and initrd come from the build before).
    "track-1": ("test_updates.py::test_host_updates_itself_and_falls_back_from_a_broken_"
                "release[arm64]", "test_system_images.py::test_inside_the_booted_vm",
                "tests/vm/test_publisher_loop.py"),
    # amd64 updates: scenarios (a), (d) power cuts, (e) and (c) on one host; then the
    # boots of container-host and metal, the too-small /usr slot, the disk formats (of
    # the edge image the updates built), the testbed's own boots and the integration
    # tests.
    "track-2": ("test_updates.py::test_host_updates_itself_and_falls_back_from_a_broken_"
                "release[amd64]",
                "test_system_images.py::test_builtin_system_image_boots[container-host]",
                "test_system_images.py::test_builtin_system_image_boots[metal]",
                "test_system_images.py::test_usr_slot_too_small_fails_cleanly",
                "test_system_images.py::test_disk_formats", "tests/vm/test_testbed_boot.py",
                "tests/integration/"),
}


def _where(item: pytest.Item) -> str:
    return f"{item.path.as_posix()}::{item.name}"


def _place(item: pytest.Item) -> tuple[str, int] | None:
    """The item's track and its rank in it: the longest entry that names it wins."""
    where = _where(item)
    found = [(len(part), track, rank) for track, parts in TRACKS.items()
             for rank, part in enumerate(parts) if part in where]
    if not found:
        if "/tests/vm/" in where or "/tests/integration/" in where:
            raise pytest.UsageError(f"{where} is in no track of tests/conftest.py")
        return None
    _, track, rank = max(found)
    return track, rank


# tryfirst: xdist's own hook turns the marks into group names on the workers, and this
# file is loaded before xdist's hook is registered, so it would otherwise run after it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = {t: i for i, t in enumerate(TRACKS)}
    places = {id(it): _place(it) for it in items}
    for item in items:
        place = places[id(item)]
        if place is not None:
            item.add_marker(pytest.mark.xdist_group(place[0]))

    # Tracks first, in order; within a track, the order of its entries above.
    def key(it: pytest.Item) -> tuple[int, int]:
        place = places[id(it)]
        return (len(TRACKS), 0) if place is None else (order[place[0]], place[1])

    items.sort(key=key)
