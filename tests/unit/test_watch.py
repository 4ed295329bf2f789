"""Watching directory trees with inotify (cerulean.agent.watch), and the rule it feeds."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent import watch
from cerulean.agent.detect import load_rules, match
from cerulean.agent.watch import Watcher


def collect(w: Watcher, until: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += w.read(0.2)
        if until(got):
            break
    return got


def test_a_setuid_file_in_tmp_raises_an_alert_within_a_second(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    rules = load_rules([{
        "rule": "setuid-file-in-tmp", "event": "file", "priority": "critical",
        "condition": f"file.setuid and file.path startswith {tmp}/",
        "output": "setuid file %file.path (mode %file.mode)"}])
    with Watcher([tmp]) as w:
        f = tmp / "sh"
        f.write_bytes(b"\x7fELF")
        os.chmod(f, 0o4755)
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got))
        events += w.read(0.3)
        alerts = [a for e in events for a in match(rules, "file", e, time.time())]
        assert [a.message for a in alerts][:1] == [f"setuid file {f} (mode 4755)"]
        assert alerts[0].evidence["file.action"] in ("created", "attributes")
        # created, written and attributes arrive in one batch and the file is described
        # once, so a rule on its final state fires once.
        assert len(alerts) == 1, events
        assert alerts[0].evidence["file.actions"][0] == "created"


def test_new_directories_are_watched_too(tmp_path: Path) -> None:
    with Watcher([tmp_path]) as w:
        (tmp_path / "a/b").mkdir(parents=True)  # made before its watch can be set
        (tmp_path / "a/b/early").write_text("x")
        time.sleep(0.2)
        collect(w, lambda got: False, 0.5)
        (tmp_path / "a/b/late").write_text("y")
        (tmp_path / "a/b/late").unlink()
        events = collect(w, lambda got: any("deleted" in e["file.actions"] for e in got))
    by_path = {(e["file.path"], a) for e in events for a in e["file.actions"]}
    assert (str(tmp_path / "a/b/late"), "created") in by_path
    assert (str(tmp_path / "a/b/late"), "deleted") in by_path


def test_what_the_first_scan_of_a_new_directory_finds(tmp_path: Path) -> None:
    """Files made in a new directory before its watch exists still show up (as created):
    nothing slips in between mkdir and the watch."""
    with Watcher([tmp_path]) as w:
        d = tmp_path / "drop"
        d.mkdir()
        (d / "payload").write_text("x")
        events = collect(w, lambda got: any(e["file.path"].endswith("payload") for e in got),
                         3.0)
    made = [e for e in events if e["file.path"] == str(d / "payload")]
    assert made and made[0]["file.action"] == "created" and made[0]["file.type"] == "file"


def test_a_file_replaced_through_a_temporary_name_is_one_event(tmp_path: Path) -> None:
    """write_atomic (like editors and dpkg) writes a temporary file and renames it onto
    the real name: one event for the real name, not one per step."""
    from cerulean.agent.fileio import write_atomic

    pam = tmp_path / "pam.d"
    pam.mkdir()
    (pam / "common-auth").write_text("old\n")
    with Watcher([pam]) as w:
        write_atomic(pam / "common-auth", b"auth required pam_deny.so\n", mode=0o644)
        events = collect(w, lambda got: any(e["file.action"] == "moved-in" for e in got))
        events += w.read(0.3)
    assert [(e["file.path"], e["file.action"]) for e in events] == [
        (str(pam / "common-auth"), "moved-in")]
    assert events[0]["file.renamed_from"].startswith(str(pam) + "/")


def test_a_rename_of_a_file_that_was_already_there_is_still_seen(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    with Watcher([tmp_path]) as w:
        os.rename(tmp_path / "a", tmp_path / "b")
        events = collect(w, lambda got: any(e["file.action"] == "moved-in" for e in got))
    assert {(Path(e["file.path"]).name, e["file.action"]) for e in events} == {
        ("a", "moved-out"), ("b", "moved-in")}
    assert all("file.renamed_from" not in e for e in events)


# When the watch cannot keep up: overflows, watch limits, paths too long.

def flood(directory: Path) -> None:
    """More events than the inotify queue holds, with nobody reading: it overflows
    (*directory* is watched already)."""
    n = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) + 200
    for i in range(n):
        os.close(os.open(directory / str(i), os.O_CREAT | os.O_WRONLY, 0o600))


def flood_dirs(directory: Path, n: int = 0) -> None:
    """More new directories than the inotify queue holds (or *n*), with nobody reading:
    it overflows (*directory* is watched already); the marks count no directory made."""
    n = n or int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) + 200
    for i in range(n):
        (directory / f"d{i}").mkdir()


@pytest.fixture
def shm_root() -> Any:
    """A directory on /dev/shm, a file system of its own (tmpfs lists what was made
    last first), removed afterwards."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    yield root
    shutil.rmtree(root)


def setuid_file(path: Path) -> Path:
    path.write_bytes(b"\x7fELF")
    os.chmod(path, 0o4755)
    return path


def test_a_queue_overflow_is_followed_by_a_rescan_that_finds_what_was_lost(
        tmp_path: Path) -> None:
    (tmp_path / "flood").mkdir()
    with Watcher([tmp_path]) as w:
        flood(tmp_path / "flood")
        (tmp_path / "hidden/deeper").mkdir(parents=True)  # its events are lost
        f = setuid_file(tmp_path / "hidden/deeper/sh")
        events = collect(w, lambda got: any(e["file.action"] == "overflow" for e in got))
        assert w.overflowed == 1 and w.needs_rescan
        assert not any(e["file.path"] == str(f) for e in events)
        # Each rescan reports RESCAN_MAX_EVENTS changes at most; the next goes on.
        found, complete = w.rescan()
        sizes = [len(found)]
        while not complete:
            more, complete = w.rescan()
            found += more
            sizes.append(len(more))
        assert max(sizes) == watch.RESCAN_MAX_EVENTS and len(sizes) > 1  # 16,000 changes
        assert not w.needs_rescan and w.rescans == len(sizes)
        (hit,) = [e for e in found if e["file.path"] == str(f)]
        assert hit["file.action"] == "rescanned" and hit["file.setuid"]
        # What changed before the events were lost is not reported again.
        assert len(found) < 2 * len(list((tmp_path / "flood").iterdir()))
        # The directories made during the overflow are watched now.
        assert str(tmp_path / "hidden/deeper") in w.paths.values()
        g = setuid_file(tmp_path / "hidden/deeper/sh2")
        later = collect(w, lambda got: any(e["file.path"] == str(g) for e in got))
        assert any(e["file.path"] == str(g) and e["file.setuid"] for e in later)
        assert w.rescan()[0] == []  # nothing is lost any more: nothing to scan


def test_a_rescan_stops_at_its_limit_and_goes_on_next_time(tmp_path: Path) -> None:
    (tmp_path / "flood").mkdir()
    with Watcher([tmp_path]) as w:
        flood(tmp_path / "flood")
        collect(w, lambda got: any(e["file.action"] == "overflow" for e in got))
        found, complete = w.rescan(limit=100)
        assert not complete and len(found) <= 100 and w.rescans_truncated == 1
        assert w.needs_rescan
        again, _ = w.rescan(limit=100)
        assert not {e["file.path"] for e in again} & {e["file.path"] for e in found}


class FullLibc:
    """libc whose inotify_add_watch fails with *err* for paths containing *word*."""

    def __init__(self, real: Any, word: str, err: int) -> None:
        import ctypes

        self.real = real
        self.word, self.err, self.ctypes = word.encode(), err, ctypes

    def inotify_init1(self, flags: int) -> int:
        return int(self.real.inotify_init1(flags))

    def inotify_add_watch(self, fd: int, path: bytes, mask: int) -> int:
        if path.startswith(b"/proc/self/fd/"):  # a directory watched by its descriptor
            path = os.fsencode(os.readlink(path))
        if self.word in path:
            self.ctypes.set_errno(self.err)
            return -1
        return int(self.real.inotify_add_watch(fd, path, mask))


def test_the_watch_limit_leaves_a_directory_unwatched_not_the_watch_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from cerulean.agent import watch

    real = watch._libc()
    monkeypatch.setattr(watch, "_libc", lambda: FullLibc(real, "full", errno.ENOSPC))
    (tmp_path / "full").mkdir()
    (tmp_path / "fine").mkdir()
    with Watcher([tmp_path]) as w:
        assert w.unwatched == {
            str(tmp_path / "full"): "the inotify watch limit is reached "
                               "(fs.inotify.max_user_watches)"}
        assert w.errors == {"ENOSPC": 1} and w.needs_rescan
        assert str(tmp_path / "fine") in w.paths.values()
        # At runtime too: a new directory that cannot be watched costs nothing else.
        (tmp_path / "fine/also-full").mkdir()
        f = setuid_file(tmp_path / "fine/sh")
        events = collect(w, lambda got: any(e["file.path"] == str(f) for e in got))
        assert str(tmp_path / "fine/also-full") in w.unwatched
        assert any(e["file.path"] == str(f) and e["file.setuid"] for e in events)
        # What the unwatched directories hold is found by rescans.
        g = setuid_file(tmp_path / "full/sh")
        found, complete = w.rescan()
        assert complete and [e["file.path"] for e in found] == [str(g)]
        assert w.needs_rescan  # still unwatched: scanned again next time
        assert w.rescan()[0] == []


def _long_chain(top: Path) -> Path:
    """Directories below *top* whose path is longer than PATH_MAX (4096 bytes)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    while len(str(top)) + depth * 201 <= 4200:
        os.mkdir("d" * 200, dir_fd=fd)
        nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        depth += 1
    os.close(fd)
    return top.joinpath(*["d" * 200] * depth)


def _setuid_at(deep: Path) -> str:
    """A set-ID file in *deep*, a directory whose path is too long to open at once."""
    fd = watch.open_dir(str(deep))
    try:
        os.close(os.open("sh", os.O_CREAT | os.O_WRONLY, 0o755, dir_fd=fd))
        os.chmod("sh", 0o4755, dir_fd=fd)
    finally:
        os.close(fd)
    return f"{deep}/sh"


def test_paths_longer_than_path_max_are_watched_like_any_other(tmp_path: Path) -> None:
    watched = tmp_path / "w"
    watched.mkdir()
    deep = _long_chain(watched)
    assert len(os.fsencode(deep)) > 4096
    with Watcher([watched]) as w:  # a tree that already holds one starts, and watches it
        assert not w.unwatched and not w.errors
        assert str(deep) in w.paths.values()
        f = _setuid_at(deep)
        events = collect(w, lambda got: any(e["file.path"] == f for e in got))
        assert any(e["file.path"] == f and e["file.setuid"] for e in events)
    with Watcher([watched]) as w:
        # At runtime: a tree holding one moves in, with a set-ID file at its end.
        outside = tmp_path / "o"
        outside.mkdir()
        far = _long_chain(outside)
        _setuid_at(far)
        os.rename(outside / ("d" * 200), watched / ("m" * 200))
        moved = str(watched / ("m" * 200)) + str(far)[len(str(outside / ("d" * 200))):]
        events = collect(w, lambda got: any(e["file.path"] == f"{moved}/sh" for e in got))
        assert any(e["file.path"] == f"{moved}/sh" and e["file.setuid"] for e in events)
        assert moved in w.paths.values() and not w.unwatched
        # A rescan walks them too.
        assert w.rescan()[1]


def test_a_walk_deeper_than_its_limit_goes_on_in_a_rescan(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(watch, "MAX_DEPTH", 3)
    deep = tmp_path.joinpath(*"abcdefg")
    deep.mkdir(parents=True)
    with Watcher([tmp_path]) as w:
        assert w.unwatched == {str(tmp_path / "a/b/c"): "more than 3 directories deep "
                                                          "in one walk"}
        assert w.errors == {"ELOOP": 1} and w.needs_rescan
        f = setuid_file(deep / "sh")
        found: list[dict[str, Any]] = []
        for _ in range(3):  # each walk goes three levels further
            found += w.rescan()[0]
        assert [e["file.path"] for e in found] == [str(f)]
        assert str(deep) in w.paths.values() and not w.unwatched


def test_a_huge_tree_moved_in_is_examined_only_up_to_a_bound(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """mv of a directory of a hundred thousand files into /tmp must not take the agent's
    memory: the files are described up to MOVE_IN_MAX, and the cut is recorded."""
    monkeypatch.setattr(watch, "MOVE_IN_MAX", 50)
    root, outside = tmp_path / "tmp", tmp_path / "outside"
    root.mkdir()
    (outside / "big" / "sub").mkdir(parents=True)
    for i in range(120):
        (outside / "big" / "sub" / f"f{i}").write_bytes(b"")
    with watch.Watcher([root]) as w:
        (outside / "big").rename(root / "big")
        events = []
        for _ in range(20):
            events += w.read(0.2)
            if events:
                break
        assert 0 < len(events) <= 50 + 2
        assert w.errors.get("E2BIG") == 1
        assert "moved in at once" in w.unwatched[str(root / "big")]
        assert w.needs_rescan


def test_the_directories_watched_are_bounded(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "MAX_WATCHED", 5)
    for i in range(10):
        (tmp_path / f"d{i}").mkdir()
    with watch.Watcher([tmp_path]) as w:
        assert len(w.paths) == 5 and w.errors.get("EMLINK") == 6


def test_a_rescan_of_a_wide_tree_holds_no_list_of_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Any user can make a directory of a million subdirectories in /tmp: a rescan's
    memory must not grow with them (it held every entry and every path to enter)."""
    import tracemalloc

    monkeypatch.setattr(watch, "MAX_WATCHED", 10)  # watches are bounded apart
    (tmp_path / "wide").mkdir()
    with Watcher([tmp_path]) as w:
        flood(tmp_path / "wide")  # an overflow: the next rescan walks everything
        fd = os.open(tmp_path / "wide", os.O_RDONLY | os.O_DIRECTORY)
        for i in range(20_000):
            os.mkdir(f"d{i}", dir_fd=fd)
        os.close(fd)
        collect(w, lambda got: any(e["file.action"] == "overflow" for e in got))
        seen: list[int] = []
        tracemalloc.start()
        try:
            events, complete = w.rescan(limit=100_000, sink=lambda e: seen.append(len(e)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert complete and events == [] and len(seen) >= 16_384
        # The sink's list of ints and the unwatched (1,000 kept) are most of it.
        assert peak < 2_000_000, peak


def test_paths_held_are_bounded_in_length_and_in_all(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Any user can nest directories without end: a path held as text costs its length,
    so the watch's memory would grow with the square of the depth."""
    monkeypatch.setattr(watch, "MAX_PATH_CHARS", len(str(tmp_path)) + 60)
    deep = tmp_path.joinpath(*["d" * 25] * 4)  # the third level is past the limit
    deep.mkdir(parents=True)
    with Watcher([tmp_path]) as w:
        assert sorted(len(p) - len(str(tmp_path)) for p in w.paths.values()) == [0, 26, 52]
        assert w.errors == {"ENAMETOOLONG": 1} and w.unwatched == {}  # counted, not held
    monkeypatch.setattr(watch, "MAX_PATH_CHARS", 8192)
    for i in range(5):
        (tmp_path / f"s{i}").mkdir()
    monkeypatch.setattr(watch, "MAX_PATH_BYTES", 5 * len(str(tmp_path)) + 60)
    with Watcher([tmp_path]) as w:
        assert sum(map(len, w.paths.values())) <= watch.MAX_PATH_BYTES
        assert w.errors.get("ENOMEM", 0) >= 1
        assert "paths take" in next(iter(w.unwatched.values()))


def test_a_set_id_file_made_where_a_file_was_renamed_away_is_seen(tmp_path: Path) -> None:
    """mv x y; then a set-ID x, in the same batch: the rename heuristic (a temporary file
    renamed into place) must not take the new x for the temporary one."""
    (tmp_path / "x").write_bytes(b"old")
    with Watcher([tmp_path]) as w:
        os.rename(tmp_path / "x", tmp_path / "y")
        f = setuid_file(tmp_path / "x")
        events = collect(w, lambda got: any(e["file.path"] == str(f) for e in got))
        assert any(e["file.path"] == str(f) and e["file.setuid"] for e in events)
        # The usual way of replacing a file is still one event for its final name.
        (tmp_path / "t.tmp").write_bytes(b"new")
        os.rename(tmp_path / "t.tmp", tmp_path / "z")
        events = collect(w, lambda got: any(e["file.path"].endswith("/z") for e in got))
        assert not any(e["file.path"].endswith("t.tmp") for e in events)
        (z,) = [e for e in events if e["file.path"].endswith("/z")]
        assert z["file.renamed_from"] == str(tmp_path / "t.tmp")


def drain(w: Watcher) -> list[dict[str, Any]]:
    """Read until nothing more comes."""
    events: list[dict[str, Any]] = []
    for _ in range(50):
        got = w.read(0.2)
        if not got and events:
            break
        events += got
    return events


def rescan_all(w: Watcher) -> list[dict[str, Any]]:
    found, complete = w.rescan()
    while not complete:
        more, complete = w.rescan()
        found += more
    return found


@pytest.mark.parametrize("cut", ["entries", "depth"])
def test_an_old_set_id_file_in_a_tree_moved_in_past_a_bound_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str) -> None:
    """A tree made outside the watch (its files keep their ctimes when it is moved) and
    moved in past MOVE_IN_MAX entries or MAX_DEPTH levels: what was not described as it
    came is reported whole by the next rescan, not only what changed lately."""
    monkeypatch.setattr(watch, "CTIME_SLACK_S", 0.0)
    root, outside = tmp_path / "tmp", tmp_path / "outside"
    root.mkdir()
    if cut == "entries":  # 120 set-ID files, each in a directory of its own
        monkeypatch.setattr(watch, "MOVE_IN_MAX", 50)
        files = [setuid_file(outside / "big" / f"d{i}" / "sh") for i in range(120)
                 if (outside / "big" / f"d{i}").mkdir(parents=True) is None]
    else:
        monkeypatch.setattr(watch, "MAX_DEPTH", 3)
        where = outside.joinpath("big", *"abcdef")
        where.mkdir(parents=True)
        files = [setuid_file(where / "sh")]
    time.sleep(0.05)  # older than the moment the watch learns of them
    with Watcher([root]) as w:
        (outside / "big").rename(root / "big")
        moved = {f"{root}/big/{f.relative_to(outside / 'big')}" for f in files}
        described = {e["file.path"] for e in drain(w) if e.get("file.setuid")}
        assert moved - described and w.needs_rescan  # the bound was met
        found = rescan_all(w)
        if cut == "depth":  # one walk goes MAX_DEPTH levels further
            found += rescan_all(w)
        assert all(e["file.action"] == "rescanned" for e in found)
        assert moved - described <= {e["file.path"] for e in found if e["file.setuid"]}
        # Once described, the tree is rescanned (if at all) only for what changes.
        assert not {e["file.path"] for e in rescan_all(w)} & moved


def test_a_mode_changed_within_one_tick_of_the_ctime_clock_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system's clock is coarse: a chmod right after the file was reported can
    leave its ctime as it was. A rescan knows it by what the file is now."""
    import types

    path = str(tmp_path / "f")
    plain = types.SimpleNamespace(st_mode=0o100644, st_ino=7, st_ctime=time.time() + 100,
                                  st_ctime_ns=time.time_ns() + 10**11, st_uid=65534, st_gid=65534,
                                  st_size=4)
    setuid = types.SimpleNamespace(**{**vars(plain), "st_mode": 0o104755})
    with Watcher([tmp_path]) as w:
        # A directory is unwatched; the rescans that follow are one series (what one reported,
        # the next does not report again), here a walk that meets the file twice.
        w._lost_since, w.unwatched["/unwatched"] = w._fs_now(), "a test"
        monkeypatch.setattr(w, "_walk", lambda top, unseen=False, fresh_since=None: (
            x for x in [(path, plain, False), (path, setuid, False)]))
        first, _ = w.rescan(limit=1)
        second, _ = w.rescan(limit=1)
    assert [e["file.setuid"] for e in first + second] == [False, True]


def test_a_rescan_whose_walk_fails_is_not_taken_for_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flood").mkdir()
    with Watcher([tmp_path]) as w:
        flood(tmp_path / "flood")
        collect(w, lambda got: any(e["file.action"] == "overflow" for e in got))
        f = setuid_file(tmp_path / "zz-sh")
        real = w._files_of

        def failing(dirs: list[str]) -> Any:
            for n, entry in enumerate(real(dirs)):
                if n == 10:
                    raise MemoryError  # anything but an OSError, part way through
                yield entry

        monkeypatch.setattr(w, "_files_of", failing)
        with pytest.raises(MemoryError):
            w.rescan()
        monkeypatch.setattr(w, "_files_of", real)
        assert w.needs_rescan
        found = rescan_all(w)
        assert any(e["file.path"] == str(f) and e["file.setuid"] for e in found)


@pytest.mark.parametrize("how", ["made", "moved"])
def test_a_set_id_file_made_again_where_one_was_deleted_is_made_not_deleted(
        tmp_path: Path, how: str) -> None:
    """unlink p; then a set-ID p, in one batch: the event describes the new file, and
    its action must be one the set-ID rule takes (it was 'deleted')."""
    from cerulean.agent import detect

    rules = detect.load_rule_files([Path(detect.__file__).parent / "data/rules.d"])
    (tmp_path / "p").write_bytes(b"plain")
    (tmp_path / "outside").mkdir()
    with Watcher([tmp_path]) as w:
        os.unlink(tmp_path / "p")
        if how == "made":
            fd = os.open(tmp_path / "p", os.O_CREAT | os.O_WRONLY, 0o4755)
            os.close(fd)
            os.chmod(tmp_path / "p", 0o4755)
        else:
            os.rename(setuid_file(tmp_path / "s"), tmp_path / "p")
        events = collect(w, lambda got: any(e["file.path"] == str(tmp_path / "p")
                                            for e in got))
        (p,) = [e for e in events if e["file.path"] == str(tmp_path / "p")]
        assert p["file.actions"][0] == "deleted" and p["file.setuid"]
        assert p["file.action"] != "deleted"
        assert [a.rule for a in match(rules, "file", p, time.time())] == [
            "setuid-or-setgid-file"]


def test_the_paths_of_one_batch_are_bounded_and_the_rest_comes_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,024 events on paths of 8,000 wide characters each would hold 64 MB of paths in
    one batch: the batch ends at MAX_BATCH_PATH_BYTES, and what was read past it is
    described by the next read, none of it lost."""
    monkeypatch.setattr(watch, "MAX_BATCH_PATH_BYTES", 4000)
    deep = tmp_path / ("é" * 120)
    deep.mkdir()
    with Watcher([tmp_path]) as w:
        for i in range(30):
            (deep / f"f{i:02}").write_bytes(b"")
        time.sleep(0.2)
        sizes, names = [], set()
        for _ in range(100):
            got = w.read(0.2, settle=0.0)
            if not got and len(names) == 30:
                break
            sizes.append(len(got))
            names |= {Path(e["file.path"]).name for e in got}
        assert names == {f"f{i:02}" for i in range(30)}
        # Each path costs 4 bytes a character here: about five paths a batch.
        assert 1 <= max(sizes) <= 6 and len([s for s in sizes if s]) >= 5, sizes


def test_unseen_directories_are_bounded_with_the_unwatched_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New content left undescribed is remembered by name only within the unwatched
    directories' byte budget; past it, it is counted (ENOBUFS)."""
    monkeypatch.setattr(watch, "MOVE_IN_MAX", 1)
    monkeypatch.setattr(watch, "UNWATCHED_BYTES", 3 * len(str(tmp_path)) + 60)
    root, outside = tmp_path / "tmp", tmp_path / "outside"
    root.mkdir()
    for i in range(8):
        (outside / f"big{i}" / "a" / "b").mkdir(parents=True)
    with Watcher([root]) as w:
        for i in range(8):
            (outside / f"big{i}").rename(root / f"big{i}")
        drain(w)
        assert 0 < len(w._unseen) < 8
        assert w._unseen <= set(w.unwatched)
        assert w.errors.get("ENOBUFS", 0) >= 8 - len(w._unseen)


def test_a_tree_moved_in_while_events_were_lost_is_reported_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A set-ID file made below MAX_PATH_CHARS (never watched, never described), its
    directory then moved up while the queue overflowed: the rescan meets a directory new
    to the watch, changed since events were lost, and reports all it holds, though the
    file's own ctime is older."""
    monkeypatch.setattr(watch, "CTIME_SLACK_S", 0.0)
    monkeypatch.setattr(watch, "MAX_PATH_CHARS", len(str(tmp_path)) + 120)
    with Watcher([tmp_path]) as w:
        deep = tmp_path.joinpath(*["d" * 50] * 3)  # past MAX_PATH_CHARS
        (deep / "inner").mkdir(parents=True)
        f = setuid_file(deep / "inner" / "sh")
        drain(w)
        assert "ENAMETOOLONG" in w.errors
        time.sleep(0.05)
        # The queue overflows (its events are never read) and the tree is moved up.
        w._overflow_pending, w._lost_since = True, w._fs_now()
        (deep / "inner").rename(tmp_path / "short")
        assert os.lstat(tmp_path / "short/sh").st_ctime < w._lost_since  # an old file
        found = rescan_all(w)
        assert [e["file.path"] for e in found if e.get("file.setuid")] == [
            str(tmp_path / "short/sh")], found
        assert f.name == "sh"


def test_a_long_walk_starts_over_when_events_are_lost_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who keeps a tree growing faster than rescans walk it kept a set-ID file
    made behind the walk's cursor unreported until the walk reached the end: a walk
    that has gone on for RESTART_AFTER_S when events are lost again starts over."""
    monkeypatch.setattr(watch, "RESTART_AFTER_S", 0.2)
    for i in range(300):
        (tmp_path / f"d{i:03}").mkdir()
    with Watcher([tmp_path]) as w:
        w._lost_since, w._overflow_pending = w._fs_now(), True
        _, complete = w.rescan(limit=100)  # a third of the way
        assert not complete
        early = sorted(tmp_path.iterdir())[0]
        f = setuid_file(early / "sh")  # behind the cursor, its event lost
        w._lost_since, w._overflow_pending = w._fs_now(), True
        time.sleep(0.3)
        found, _ = w.rescan(limit=1000)
        assert w.rescans_restarted == 1
        assert [e["file.path"] for e in found if e.get("file.setuid")] == [str(f)]
        assert w._restart_after == watch.RESTART_AFTER_S  # that walk ended: reset


def test_after_an_overflow_the_watched_directories_files_come_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's flood of directories past the watch limit came, in the walk, before a
    watched directory whose events the overflow lost: its set-ID file waited until the
    walk had been through the flood. The files of the watched directories, one level
    each, come first."""
    import shutil
    import tempfile

    monkeypatch.setattr(watch, "MAX_WATCHED", 5)
    # tmpfs lists what was made last first: the flood comes before the file in a walk.
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        with Watcher([root]) as w:
            f = setuid_file(root / "sh")
            wide = root / "wide"
            wide.mkdir()
            for i in range(3000):
                (wide / f"d{i}").mkdir()
            w._lost_since, w._overflow_pending = w._fs_now() - 5, True  # lost
            found, complete = w.rescan(limit=500)
            assert not complete
            assert [e["file.path"] for e in found if e.get("file.setuid")] == [str(f)]
    finally:
        shutil.rmtree(root)


# fanotify marks on whole file systems: what inotify cannot watch is still seen at once.

def marks_or_skip(w: Watcher) -> None:
    if not w.marked:
        pytest.skip(f"fanotify marks are not available here ({w.marks_error})")


@pytest.mark.parametrize("marks", [True, False])
def test_a_set_id_file_in_a_directory_past_the_watch_limit_is_seen_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marks: bool) -> None:
    """A user's flood of directories leaves some unwatched (the watch limit, or an
    overflow before they were watched): inotify sees nothing in them, and without
    marks a set-ID file made there waits for a rescan to reach it."""
    monkeypatch.setattr(watch, "MAX_WATCHED", 2)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with Watcher([tmp_path], marks=marks) as w:
        if marks:
            marks_or_skip(w)
        blind = sorted(set(w.unwatched))
        assert len(blind) == 2 and w.needs_rescan
        f = setuid_file(Path(blind[0]) / "sh")
        (Path(blind[1]) / "deeper").mkdir()
        g = setuid_file(Path(blind[1]) / "deeper/sh")
        events = collect(w, lambda got: {str(f), str(g)} <= {e["file.path"] for e in got},
                         timeout=2.0)
        hits = {e["file.path"]: e for e in events if e.get("file.setuid")}
        if not marks:
            assert hits == {}  # left to a rescan
            return
        assert set(hits) == {str(f), str(g)}
        assert hits[str(f)]["file.action"] == "created"
        assert set(hits[str(f)]["file.actions"]) <= {"created", "attributes"}
        assert len(hits[str(f)]["file.actions"]) >= 1
        # What a rescan finds of them was reported already.
        found = rescan_all(w)
        assert not any(e["file.path"] in (str(f), str(g)) for e in found)


def test_marks_report_only_what_inotify_does_not_and_only_in_the_trees(
        tmp_path: Path) -> None:
    watched, left_out, outside = tmp_path / "in", tmp_path / "in/skip", tmp_path / "out"
    left_out.mkdir(parents=True)
    outside.mkdir()
    with Watcher([watched], exclude=[left_out], marks=True) as w:
        marks_or_skip(w)
        setuid_file(left_out / "sh")
        setuid_file(outside / "sh")
        f = setuid_file(watched / "sh")
        events = collect(w, lambda got: False, timeout=1.0)
        assert [e["file.path"] for e in events] == [str(f)]  # once, from inotify
        assert events[0]["file.actions"] == ["created", "written", "attributes"]


def test_a_directory_the_marks_report_on_is_watched_from_then_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "MAX_WATCHED", 2)
    (tmp_path / "0").mkdir()  # listed first (ext4's order is not names', hence a check)
    (tmp_path / "a").mkdir()
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        watched = next(p for p in w.paths.values() if p != str(tmp_path))
        other = Path(watched).name
        blind = tmp_path / ("a" if other == "0" else "0")
        assert str(blind) in w.unwatched
        (blind / "f").touch()  # no room: still unwatched, reported all the same
        assert [e["file.path"] for e in collect(w, bool, 2.0)] == [str(blind / "f")]
        os.rmdir(watched)  # room again
        assert [e["file.path"] for e in collect(w, bool, 2.0)] == [watched]
        (blind / "g").touch()
        assert [e["file.path"] for e in collect(w, bool, 2.0)] == [str(blind / "g")]
        assert str(blind) in w.paths.values() and not w.unwatched
        h = setuid_file(blind / "h")
        got = collect(w, lambda got: any(e.get("file.setuid") for e in got), 2.0)
        assert [e["file.path"] for e in got] == [str(h)]  # once: inotify's


def test_an_overflow_of_the_marks_queue_is_counted_and_rescanned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "MAX_WATCHED", 1)
    (tmp_path / "blind").mkdir()
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        rescan_all(w)
        assert w.marks_overflowed == 0
        # fanotify queues 16,384 events; nobody reads while these are made.
        for i in range(17_000):
            os.close(os.open(tmp_path / "blind" / str(i), os.O_CREAT | os.O_WRONLY, 0o600))
        drain(w)
        assert w.marks_overflowed >= 1 and w.needs_rescan


def test_without_marks_the_watch_goes_on_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import errno

    real = watch.load_libc()

    class NoFanotify:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def fanotify_init(self, *_args: Any) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(watch, "load_libc", NoFanotify)
    with Watcher([tmp_path], marks=True) as w:
        assert w.marked == 0 and w.marks_error == "fanotify cannot start: Operation not permitted"
        f = setuid_file(tmp_path / "sh")
        assert any(e["file.path"] == str(f) for e in collect(w, bool, 2.0))


def test_a_file_system_that_cannot_be_marked_leaves_the_others_marked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import errno
    import shutil
    import tempfile

    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    real = watch.load_libc()

    class NoMarkOnShm:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def fanotify_mark(self, fd: int, flags: int, mask: int, dfd: int, path: Any) -> int:
            if os.readlink(f"/proc/self/fd/{dfd}").startswith("/dev/shm"):
                ctypes.set_errno(errno.EOPNOTSUPP)
                return -1
            return int(real.fanotify_mark(fd, flags, mask, dfd, path))

    monkeypatch.setattr(watch, "load_libc", NoMarkOnShm)
    try:
        with Watcher([tmp_path, shm], marks=True) as w:
            marks_or_skip(w)
            assert w.marked == 1
            assert w.marks_error == (f"the file system of {shm} cannot be marked: "
                                     f"{os.strerror(errno.EOPNOTSUPP)}")
            f = setuid_file(tmp_path / "sh")
            assert any(e["file.path"] == str(f) for e in collect(w, bool, 2.0))
    finally:
        shutil.rmtree(shm)


def _one_blind(tmp_path: Path, w: Watcher) -> tuple[Path, str]:
    """The directory left unwatched (MAX_WATCHED 2: the root and one other), and the
    watched one."""
    watched = next(p for p in w.paths.values() if p != str(tmp_path))
    (blind,) = w.unwatched
    return Path(blind), watched


def test_what_was_queued_before_the_marks_watched_a_directory_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marks watch an unwatched directory at its first event once there is room:
    the events queued after that one, before the watch, never reach inotify."""
    monkeypatch.setattr(watch, "MAX_WATCHED", 2)
    (tmp_path / "0").mkdir()
    (tmp_path / "a").mkdir()
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        blind, watched = _one_blind(tmp_path, w)
        os.rmdir(watched)
        collect(w, bool, 2.0)  # its watch is gone: room for one more
        (blind / "decoy").touch()
        f = setuid_file(blind / "sh")
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got), 2.0)
        assert str(blind) in w.paths.values()
        assert any(e["file.path"] == str(f) and e["file.setuid"] for e in events)


def test_a_directory_moved_into_an_unwatched_one_is_looked_into(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "MAX_WATCHED", 2)
    root, outside = tmp_path / "in", tmp_path / "out"
    (root / "0").mkdir(parents=True)
    (root / "a").mkdir()
    (outside / "d").mkdir(parents=True)
    f = setuid_file(outside / "d/sh")  # made outside the watched trees
    with Watcher([root], marks=True) as w:
        marks_or_skip(w)
        (blind,) = w.unwatched
        os.rename(outside / "d", Path(blind) / "d")
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got), 2.0)
        hits = [e for e in events if e.get("file.setuid")]
        assert [e["file.path"] for e in hits] == [f"{blind}/d/sh"]
        assert any(e["file.path"] == f"{blind}/d" and e["file.type"] == "dir" for e in events)
        del f


def test_events_in_a_directory_that_cannot_be_watched_count_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "MAX_WATCHED", 1)
    monkeypatch.setattr(watch, "UNWATCHED_KEEP", 0)  # not even kept by name
    (tmp_path / "a").mkdir()
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        before = w.unwatched_total
        for i in range(50):
            (tmp_path / "a" / str(i)).touch()
        events = collect(w, lambda got: len(got) >= 50, 3.0)
        assert len(events) == 50
        assert w.unwatched_total <= before + 1


def test_marks_leave_directories_past_path_max_to_inotify(tmp_path: Path) -> None:
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        deep = _long_chain(tmp_path)
        collect(w, lambda got: False, 1.0)
        f = _setuid_at(deep)
        events = collect(w, lambda got: any(e["file.path"] == f for e in got), 3.0)
        assert any(e["file.path"] == f and e["file.setuid"] for e in events)
        assert "ENAMETOOLONG" not in w.errors


def test_a_root_on_a_bind_mount_shares_its_file_systems_marks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two roots on one file system, the first a bind mount of a part of it: events
    under the second are decoded on the second's mount."""
    import subprocess

    fs, bound = tmp_path / "fs", tmp_path / "bound"
    fs.mkdir()
    bound.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "cerulean-test", str(fs)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount here")
    try:
        (fs / "s1").mkdir()
        (fs / "s2/u").mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(fs / "s1"), str(bound)], check=True)
        try:
            monkeypatch.setattr(watch, "MAX_WATCHED", 2)  # the two roots only
            with Watcher([bound, fs / "s2"], marks=True) as w:
                marks_or_skip(w)
                assert w.marked == 1 and str(fs / "s2/u") in w.unwatched
                f = setuid_file(fs / "s2/u/sh")
                events = collect(w, lambda got: any(e.get("file.setuid") for e in got), 2.0)
                assert [e["file.path"] for e in events if e.get("file.setuid")] == [str(f)]
        finally:
            subprocess.run(["umount", str(bound)], check=True)
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_a_flood_of_new_directories_does_not_fill_the_marks_queue(
        shm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inotify flood: directories made faster than they can be watched. Empty, they
    cost the marks' queue nothing: the set-ID file made in one of them is still seen as
    it happens, not by a rescan."""
    monkeypatch.setattr(watch, "MAX_WATCHED", 100)
    with Watcher([shm_root], marks=True) as w:
        marks_or_skip(w)
        flood_dirs(shm_root, 17_000)  # more than either queue holds, nobody reading
        f = setuid_file(shm_root / "d5000/sh")
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got), 10.0)
        assert [e["file.path"] for e in events if e.get("file.setuid")] == [str(f)]
        assert w.marks_overflowed == 0 and w.rescans == 0


def test_after_an_inotify_overflow_the_marks_report_in_watched_directories_too(
        shm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of directories overflows inotify's queue: a set-ID file made in a watched
    directory meanwhile is lost to inotify. The marks, whose queue a flood of
    directories does not fill, held what they saw there and report what inotify did
    not."""
    monkeypatch.setattr(watch, "MAX_WATCHED", 100)
    (shm_root / "flood").mkdir()
    with Watcher([shm_root], marks=True) as w:
        marks_or_skip(w)
        flood_dirs(shm_root / "flood")
        f = setuid_file(shm_root / "sh")  # the root is watched; inotify's queue is full
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got), 10.0)
        assert [e["file.path"] for e in events if e.get("file.setuid")] == [str(f)]
        assert w.overflowed >= 1 and w.rescans == 0
        # The rescan that follows the overflow does not report it again.
        assert str(f) not in [e["file.path"] for e in rescan_all(w)]


def test_what_inotify_reports_the_marks_do_not_report_again(tmp_path: Path) -> None:
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        for i in range(6000):  # more than the marks hold or remember (MARKS_HELD)
            os.close(os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600))
        events = drain(w)
        time.sleep(watch.MARKS_HOLD_S + 0.2)
        events += drain(w)
        paths = [e["file.path"] for e in events]
        assert len(paths) == len(set(paths)) == 6000


def test_a_mode_change_lost_to_an_overflow_after_inotify_saw_the_file_is_reported(
        shm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify reported a plain file; then a flood overflows its queue and the file is
    made set-ID: that change is inotify's to report, but lost to it. What inotify
    reported lately (the file made) does not stand for the mode change."""
    monkeypatch.setattr(watch, "MAX_WATCHED", 100)
    (shm_root / "flood").mkdir()
    with Watcher([shm_root], marks=True) as w:
        marks_or_skip(w)
        (shm_root / "sh").write_bytes(b"\x7fELF")
        assert [e["file.path"] for e in collect(w, bool, 2.0)] == [str(shm_root / "sh")]
        flood_dirs(shm_root / "flood")
        os.chmod(shm_root / "sh", 0o4755)
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got), 10.0)
        assert [e["file.path"] for e in events if e.get("file.setuid")] == [
            str(shm_root / "sh")]
        assert w.overflowed >= 1 and w.rescans == 0


def test_a_temporary_file_renamed_into_place_is_not_reported_by_the_marks(
        tmp_path: Path) -> None:
    with Watcher([tmp_path], marks=True) as w:
        marks_or_skip(w)
        (tmp_path / ".conf.tmp").write_text("x")
        os.rename(tmp_path / ".conf.tmp", tmp_path / "conf")
        events = collect(w, bool, 2.0)
        assert w.read(watch.MARKS_HOLD_S + 0.5) == []  # nothing held comes out later
        assert [(e["file.path"], e["file.action"]) for e in events] == [
            (str(tmp_path / "conf"), "moved-in")]
