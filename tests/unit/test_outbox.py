"""The agent's outbox (cerulean.agent.outbox): at-least-once delivery, bounded on disk."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cerulean.agent.outbox import Message, Outbox, OutboxError


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def box(tmp_path: Path, clock: Clock, limit: int = 1 << 20) -> Outbox:
    return Outbox(tmp_path / "agent/outbox.db", "host-1", limit=limit, clock=clock,
                  rng=random.Random(3))


def test_reports_survive_a_restart_and_are_sent_in_order(tmp_path: Path, clock: Clock) -> None:
    ob = box(tmp_path, clock)
    for i in range(5):
        ob.put("alert", {"rule": "setuid-in-tmp", "n": i})
    epoch = ob.epoch
    ob.close()
    ob = box(tmp_path, clock)  # the agent restarted
    assert ob.epoch == epoch and ob.pending() == 5
    seen: list[Message] = []

    def send(msgs: list[Message], dropped: int) -> set[str]:
        seen.extend(msgs)
        return {m.id for m in msgs}

    assert ob.deliver(send, batch=2) == (5, 0)
    assert [m.body["n"] for m in seen] == [0, 1, 2, 3, 4]
    assert [m.id for m in seen][:2] == [f"host-1:{epoch}:1", f"host-1:{epoch}:2"]
    assert ob.pending() == 0 and ob.deliver(send) == (0, 0)
    # Sequence numbers are never reused, so IDs stay unique.
    ob.put("alert", {"n": 5})
    assert ob.due()[0].id == f"host-1:{epoch}:6"


def test_what_the_server_did_not_acknowledge_is_sent_again_later(tmp_path: Path,
                                                                 clock: Clock) -> None:
    ob = box(tmp_path, clock)
    for i in range(4):
        ob.put("inventory", {"n": i})

    def half(msgs: list[Message], dropped: int) -> set[str]:
        return {m.id for m in msgs if m.body["n"] % 2 == 0}

    assert ob.deliver(half) == (2, 2)
    assert ob.due() == []  # backing off
    clock.now += 5
    assert [m.body["n"] for m in ob.due()] == [1, 3]
    assert all(m.attempts == 1 for m in ob.due())

    def down(msgs: list[Message], dropped: int) -> set[str]:
        raise ConnectionRefusedError("the fleet server is down")

    delays = []
    for _ in range(10):
        clock.now += 1000
        assert ob.deliver(down) == (0, 2)
        waits = ob.db.execute("SELECT next_try FROM message").fetchall()
        delays.append(min(w[0] for w in waits) - clock.now)
    assert delays[0] < delays[2] and max(delays) <= 600
    clock.now += 1000
    assert ob.deliver(lambda msgs, dropped: {m.id for m in msgs}) == (2, 0)


def test_the_size_limit_drops_the_least_important_first_and_counts_it(tmp_path: Path,
                                                                      clock: Clock) -> None:
    ob = box(tmp_path, clock, limit=4000)
    ob.put("alert", {"pad": "a" * 300})
    for i in range(20):
        ob.put("metrics", {"i": i, "pad": "m" * 300})
    assert ob.used_bytes() <= 4000
    kinds = [m.kind for m in ob.due(1000)]
    assert kinds[0] == "alert"  # kept: metrics went first
    kept = [m.body["i"] for m in ob.due(1000) if m.kind == "metrics"]
    assert kept == list(range(20 - len(kept), 20))  # the newest metrics stay
    assert ob.dropped() == 20 - len(kept) > 0
    counts: list[int] = []
    ob.deliver(lambda msgs, dropped: counts.append(dropped) or {m.id for m in msgs})
    assert counts == [ob.dropped()]


def test_bad_reports_are_refused(tmp_path: Path, clock: Clock) -> None:
    ob = box(tmp_path, clock, limit=4000)
    with pytest.raises(OutboxError, match="Unknown report kind 'gossip'"):
        ob.put("gossip", {})
    with pytest.raises(OutboxError, match="larger than a quarter"):
        ob.put("inventory", {"pad": "x" * 2000})
    assert ob.pending() == 0


def test_metrics_never_push_out_alerts(tmp_path: Path, clock: Clock) -> None:
    ob = box(tmp_path, clock, limit=4000)
    for i in range(10):
        ob.put("alert", {"i": i, "pad": "a" * 300})
    alerts = ob.pending()
    assert ob.put("metrics", {"pad": "m" * 900}) == 0  # the new metrics report goes instead
    assert ob.pending() == alerts and ob.dropped() >= 1
    assert ob.put("alert", {"pad": "n" * 300}) > 0  # an alert still pushes out the oldest alert


def test_the_limit_counts_the_database_and_its_wal_on_disk(tmp_path: Path,
                                                           clock: Clock) -> None:
    limit = 1 << 20
    ob = box(tmp_path, clock, limit=limit)
    for i in range(300):
        ob.put("alert" if i % 3 else "metrics", {"i": i, "pad": f"{i:06d}" * 3000})
        assert ob.disk_bytes() <= limit, f"after {i + 1} reports"
    assert ob.dropped() > 0 and ob.pending() > 0
    ob.close()
    files = [tmp_path / "agent/outbox.db", tmp_path / "agent/outbox.db-wal"]
    assert sum(f.stat().st_size for f in files if f.exists()) <= limit


def test_a_batch_is_bounded_in_bytes(tmp_path: Path, clock: Clock) -> None:
    ob = box(tmp_path, clock)
    for i in range(6):
        ob.put("alert", {"i": i, "pad": "x" * 50_000})
    assert [m.body["i"] for m in ob.due(100, max_bytes=120_000)] == [0, 1]
    assert len(ob.due(100, max_bytes=10)) == 1  # one at least, however large


def test_a_corrupt_database_is_moved_aside_and_made_again(tmp_path: Path,
                                                          clock: Clock) -> None:
    ob = box(tmp_path, clock)
    ob.put("alert", {"n": 1}, {"audit-seq": "41"})
    old_epoch = ob.epoch
    ob.close()
    db = tmp_path / "agent/outbox.db"
    db.write_bytes(b"this is not a database at all" * 300)
    ob = box(tmp_path, clock)  # no exception: the outbox looks after itself
    assert ob.epoch != old_epoch and ob.pending() == 0
    assert (tmp_path / "agent/outbox.db.corrupt").read_bytes().startswith(b"this is not")
    assert ob.get("audit-seq") == "41"  # the cursors survive, from the copy beside it
    assert ob.counters()["recovered"] == 1
    assert any("corrupt" in e for e in ob.events)
    assert ob.put("alert", {"n": 2}) > 0
    assert ob.deliver(lambda msgs, dropped: {m.id for m in msgs}) == (1, 0)


def test_a_database_damaged_inside_is_made_again_on_use(tmp_path: Path, clock: Clock) -> None:
    ob = box(tmp_path, clock)
    for i in range(50):
        ob.put("alert", {"i": i, "pad": "a" * 3000})
    ob.close()
    db = tmp_path / "agent/outbox.db"
    data = bytearray(db.read_bytes())
    data[4096 * 2:4096 * 6] = b"\xff" * (4096 * 4)  # b-tree pages overwritten
    db.write_bytes(bytes(data))
    ob = box(tmp_path, clock)
    ob.put("alert", {"n": "after"})
    ob.deliver(lambda msgs, dropped: {m.id for m in msgs})
    assert ob.counters().get("recovered") == 1 and ob.pending() == 0


def test_a_full_disk_drops_and_counts_and_recovers_by_itself(tmp_path: Path,
                                                            clock: Clock) -> None:
    ob = box(tmp_path, clock)
    for i in range(10):
        ob.put("metrics", {"i": i, "pad": "m" * 3000})
    pages = ob.db.execute("PRAGMA page_count").fetchone()[0]
    ob.db.execute(f"PRAGMA max_page_count={pages}")  # no more room on "disk"
    # An alert makes room among older, less important reports...
    assert ob.put("alert", {"pad": "a" * 3000}) > 0
    assert ob.dropped() >= 1
    # ...a large metrics report, which only other metrics could make room for, is refused.
    before = ob.dropped()
    assert ob.put("metrics", {"pad": "c" * 200_000}) == 0
    assert ob.dropped() > before and ob.pending() >= 1  # the alert stays
    assert any("the disk is full: a new metrics report was dropped" in e for e in ob.events)
    # Delivery still works on a full disk, and once there is room again, so does put.
    assert ob.deliver(lambda msgs, dropped: {m.id for m in msgs})[0] > 0
    ob.db.execute("PRAGMA max_page_count=1000000")
    assert ob.put("alert", {"pad": "d" * 200_000}) > 0
    assert ob.counters()["dropped-disk-full"] >= 1


def test_the_outbox_is_exported_as_metrics(tmp_path: Path, clock: Clock) -> None:
    from cerulean.agent import metrics
    from cerulean.agent.daemon import exposition
    from cerulean.agent.fleetlink import STATE
    from cerulean.agent.outbox import families

    path = tmp_path / STATE / "outbox.db"
    assert families(path) == []
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database" * 100)
    ob = Outbox(path, "host-1", clock=clock)
    ob.put("alert", {"n": 1})
    ob.close()
    text = metrics.render(families(path))
    assert "cerulean_fleet_outbox_recovered_total 1" in text
    assert "cerulean_fleet_outbox_reports 1" in text
    assert "cerulean_fleet_outbox_bytes " in text
    assert b"cerulean_fleet_outbox_recovered_total 1" in exposition(tmp_path)
