"""Check, download, write, boot, judge: the update cycle of one host.

Order of an apply, chosen so that a power cut at any point leaves a host that
boots a good slot:

1. Only from a boot that was marked good, and only a release that has not
   failed here before.
2. The inactive slot is invalidated first: boot entries of any other release
   are removed from the ESP and the slot's partitions are labelled ``_empty``.
3. The /usr image and its hash tree are written (from a delta against the
   running slot when the repository has one, else the full payload), flushed
   and read back against the signed hashes.
4. The slot gets its identity (partition UUIDs from the verity root hash).
5. The UKI is written under a name the boot loader ignores, checked, and
   renamed to ``cerulean_VERSION+TRIES.efi``: from here on the next boot tries
   the new release, and until here it cannot.
6. Reboot inside the maintenance window, or stay staged; before the reboot the
   channel is read again: a release withdrawn since is unstaged, a paused one
   waits with its boot entry set aside.

After the reboot the health check (part of ``boot-complete.target``) decides:
healthy, and systemd-bless-boot marks the entry good; unhealthy, and the entry
is marked bad and the host reboots into the previous release, which then
remembers the failed release so that it is never applied again. A release
that never reaches the health check (a kernel that does not boot, a corrupt
/usr) uses up its tries and systemd-boot falls back by itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cerulean.agent import integrity
from cerulean.agent.audit import AuditLog
from cerulean.agent.update import boot, disk, health
from cerulean.agent.update.client import Limits, RepoClient
from cerulean.agent.update.errors import RefusedError, TransientError, UpdateError
from cerulean.agent.update.host import Config, Host, State, load_config, load_state, save_state
from cerulean.agent.update.host import seed as host_seed
from cerulean.errors import CeruleanError
from cerulean.protocol.update import Part, ReleaseDoc, choose, verity_uuids
from cerulean.protocol.window import in_window, next_opening

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
CHUNK = 1 << 20
INSTALL_TRIES = 3  # failed installs of one release before it is given up


def _zstd_stream(args: list[str]) -> Iterator[bytes]:
    proc = subprocess.Popen(["zstd", "-d", "-q", "-c", "--long=31", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while chunk := proc.stdout.read(CHUNK):
            yield chunk
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        rc = proc.wait()
    if rc != 0:
        raise UpdateError(f"Decompressing the update failed: {err or f'zstd exited {rc}'}.")


# Results that change nothing on the host and are not written to the audit trail.
# A repository that cannot be reached is said in state.json (and so to the fleet), not
# in the audit trail: an offline host would fill it.
QUIET = ("up-to-date", "disabled", "unreachable")
# Results written to the audit trail every time, even when the last one said the same:
# each is a repair of its own, not a state that lasts.
EVENTS = ("recovered",)


@dataclass
class Outcome:
    result: str  # up-to-date, staged, rebooting, refused, disabled, ...
    message: str
    version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Updater:
    host: Host = field(default_factory=Host)
    say: Callable[[str], None] = print
    url: str | None = None  # overrides the configured repository
    disk_path: str | None = None  # the whole disk (found from the booted partition)
    esp_path: Path | None = None
    arch: str | None = None
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    bless_status: Callable[[], str] = boot.bless_status
    bless_cmd: Callable[[str], None] = boot.bless
    reboot_cmd: Callable[[], object] = lambda: subprocess.run(["systemctl", "reboot"],
                                                              check=False)
    limits: Limits = field(default_factory=Limits)  # how long downloads may take
    config: Config = field(init=False)
    # The last result written to (or already in) the audit trail: (result, message).
    _audited: tuple[str | None, str | None] = field(init=False, default=(None, None))

    def __post_init__(self) -> None:
        self.config = load_config(self.host)
        if self.arch is None:
            self.arch = ARCH.get(platform.machine(), platform.machine())

    # -- where things are ------------------------------------------------------------

    def esp(self) -> Path:
        if self.esp_path is None:
            self.esp_path = boot.find_esp()
        return self.esp_path

    def layout(self) -> disk.Layout:
        cmdline = self.host.cmdline()
        if self.disk_path is None:
            self.disk_path = disk.find_disk(disk.booted_usr_uuid(cmdline))
        assert self.arch is not None
        return disk.layout(self.disk_path, self.arch, cmdline)

    def client(self, state: State | None = None) -> RepoClient:
        url = self.url or self.config.url
        if not url:
            raise UpdateError(
                "No update repository is configured: set url in /etc/cerulean/update.toml.")

        def note(repair: str) -> None:  # a damaged trusted root.json, seeded again
            self.say(f"warning: {repair}")
            if state is not None:
                state.record("recovered", repair, self.now())

        return RepoClient(url, self.host.state_dir, self.host.trusted_root, self.limits, note)

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        self.host.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.host.state_dir / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateError("Another update run is in progress.") from None
            state = load_state(self.host)
            self._audited = (state.last.get("result"), state.last.get("message"))
            for repair in state.repairs:  # into the audit trail, and both copies rewritten
                self.say(f"warning: {repair}")
                state.record("recovered", repair, self.now())
            try:
                yield state
            finally:
                save_state(self.host, state)
                self._audit(state)

    def _audit(self, state: State) -> None:
        """This run's results into the audit trail: what changed something or was
        refused, once (the same refusal on every run is written the first time).
        A full disk does not stop an update: it is said, and state.json has the result."""
        log = AuditLog(self.host.audit_log)
        records, state.recorded = state.recorded, []
        for r in records:
            if r["result"] in QUIET or (r["result"] not in EVENTS
                                        and (r["result"], r["message"]) == self._audited):
                continue
            self._audited = (r["result"], r["message"])
            try:
                log.append("updater", f"update.{r['result']}", {"message": r["message"]})
            except (OSError, CeruleanError) as e:
                self.say(f"warning: the audit trail could not be written: {e}")
                return

    # -- after a boot: what happened to the staged release? ---------------------------

    def reconcile(self, state: State) -> None:
        current = self.host.version
        ents = boot.entries(self.esp())
        staged = state.staged
        if staged and staged.get("version") == current:
            if self.bless_status() in ("good", "clean"):
                msg = f"Running {current}, updated from {staged.get('from', '?')}."
                state.record("updated", msg, self.now())
                self.say(msg)
                state.staged = None
        elif staged:
            v = staged.get("version", "")
            mine = [e for e in ents if e.version == v]
            if mine and not mine[0].exhausted and not boot.matches(
                    mine[0].path, int(staged.get("uki_size") or -1),
                    staged.get("uki_sha256", "")):
                # A power cut at the wrong moment on a file system without journal:
                # the entry cannot boot, so the release is installed again.
                boot.remove(mine[0].path)
                state.staged = None
                msg = f"The boot entry of {v} was damaged; it will be installed again."
                state.record("damaged", msg, self.now())
                self.say(msg)
            elif not mine and boot.paused(self.esp(), v):
                pass  # set aside while its rollout is paused: still staged
            elif not mine or mine[0].exhausted:
                why = state.bad.get(v) or "it did not come up healthy within its boot tries"
                state.bad.setdefault(v, why)
                msg = f"{v} was given up ({why}); running {current} again."
                state.record("rolled-back", msg, self.now())
                self.say(msg)
                state.staged = None
        for e in ents:
            if e.exhausted and e.version != current:
                state.bad.setdefault(e.version, "it used up its boot tries")
                boot.remove(e.path)
                self.say(f"Removed the failed boot entry {e.path.name}.")

    # -- commands --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = load_state(self.host)
        out: dict[str, Any] = {
            "image": self.host.image, "version": self.host.version,
            "channel": self.config.channel, "url": self.url or self.config.url or None,
            "window": self.config.window or "any time", "reboot": self.config.reboot,
            "never": self.config.never, "target": self.config.target or None,
            "hold": self.config.hold, "staged": state.staged, "last": state.last or None,
            "failed_releases": state.bad, "failed_installs": state.install_failures,
        }
        try:
            lay = self.layout()
            out["slot"] = lay.booted.name
            out["slots"] = {s.name: {"label": s.data.label, "partuuid": s.data.uuid}
                            for s in lay.slots}
        except UpdateError as e:
            out["slot"] = None
            out["slot_error"] = str(e)
        try:
            out["boot_entries"] = [e.path.name for e in boot.entries(self.esp())]
            out["boot"] = self.bless_status()
        except UpdateError as e:
            out["boot_error"] = str(e)
        return out

    def check(self) -> Outcome:
        """What the repository offers this host now (changes nothing on disk)."""
        with self.locked() as state:
            self.reconcile(state)
            return self._read_offer(state)[0]

    def _read_offer(self, state: State) -> tuple[Outcome, RepoClient | None,
                                                  ReleaseDoc | None]:
        """:meth:`_offer`, with a refused or unreachable repository recorded: the result
        shows in ``update status``, the next fleet report and (refused) the audit trail."""
        try:
            return self._offer(state)
        except (RefusedError, TransientError) as e:
            self._record_repo_error(state, e)
            raise

    def _record_repo_error(self, state: State, e: UpdateError) -> None:
        result = "refused" if isinstance(e, RefusedError) else "unreachable"
        state.record(result, str(e), self.now())

    def _offer(self, state: State) -> tuple[Outcome, RepoClient | None, ReleaseDoc | None]:
        if self.config.never:
            return Outcome("disabled", "Updates are switched off (never = true)."), None, None
        if self.config.hold:
            return Outcome("held", "The fleet holds updates for this host: its rollout is "
                           "paused or has not reached it yet."), None, None
        client = self.client(state)
        current, image = self.host.version, self.host.image
        doc = client.channel(self.config.channel)
        offer = choose(doc, image, current, host_seed(self.host), self.now(),
                       skip=frozenset(state.bad), only=self.config.target)
        if offer.entry is None:
            return Outcome("up-to-date", f"Nothing to do: {offer.reason}."), client, None
        rel = client.release(image, offer.entry.version)
        assert self.arch is not None
        if self.arch not in rel.arches:
            return (Outcome("up-to-date", f"{rel.version} has no {self.arch} build."),
                    client, None)
        notes = f" It fixes {len(rel.cves)} CVEs." if rel.cves else ""
        return (Outcome("available", f"{rel.version} is available (running {current}).{notes}",
                        rel.version, {"cves": rel.cves}), client, rel)

    def run(self, *, apply: bool = True, reboot: bool | None = None,
            ignore_window: bool = False) -> Outcome:
        """The timer's job: reconcile, reboot into a staged release in the window, or apply."""
        with self.locked() as state:
            self.reconcile(state)
            if state.staged and state.staged.get("version") == self.host.version:
                # Booted into the staged release, which is not marked good yet: its
                # health check decides, a reboot now would only spend one of its tries.
                return Outcome("waiting", f"{self.host.version} runs from slot "
                               f"{state.staged.get('slot', '?')} and waits for its health "
                               "check.", self.host.version)
            if state.staged:
                held = self._recheck_staged(state)
                if held is not None:
                    return held
                return self._maybe_reboot(state, reboot, ignore_window)
            outcome, client, rel = self._read_offer(state)
            if rel is None or client is None or not apply:
                if outcome.result in ("up-to-date", "disabled"):
                    state.record(outcome.result, outcome.message, self.now())
                return outcome
            blessed = self.bless_status()
            if blessed not in ("good", "clean"):
                return Outcome("waiting", f"This boot is not marked good yet ({blessed}); "
                               "updates wait until it is.")
            try:
                self._apply(state, client, rel)
            except (UpdateError, OSError) as e:
                msg = str(e) if isinstance(e, UpdateError) else \
                    f"Installing {rel.version} failed: {e.strerror or e}."
                state.record("failed", msg, self.now())
                self._count_failure(state, rel.version, e, msg)
                raise UpdateError(msg) from e
            state.install_failures.pop(rel.version, None)
            return self._maybe_reboot(state, reboot, ignore_window)

    def _recheck_staged(self, state: State) -> Outcome | None:
        """Whether the repository still offers the staged release; None: it does.

        Withdrawn (or gone from the channel, or no longer the fleet's target): its boot
        entry is removed and the slot invalidated, so that no reboot boots it. Paused:
        its entry is set aside until the release is resumed. A repository that cannot
        be read (or is refused) confirms nothing: the release stays staged, no reboot.
        """
        assert state.staged is not None
        v = state.staged["version"]
        if self.config.never:
            # Updates are switched off: nothing is read from the repository, so nothing
            # confirms the staged release either; it stays staged and is not rebooted into.
            return Outcome("disabled", f"Updates are switched off ('never'); {v} stays "
                           "staged and is not rebooted into.", v)
        try:
            doc = self.client(state).channel(self.config.channel)
        except (RefusedError, TransientError) as e:
            self._record_repo_error(state, e)
            raise UpdateError(f"{str(e).rstrip('.')}; {v} stays staged and is not "
                              "rebooted into until the repository confirms it.") from e
        entry = doc.find(self.host.image, v)
        esp = self.esp()
        if entry is None or entry.state == "withdrawn":
            where = f"the {self.config.channel} channel"
            why = (f"it was withdrawn from {where}" if entry is not None
                   else f"{where} no longer offers it")
            return self._unstage(state, "withdrawn", why)
        if self.config.target and self.config.target != v:
            return self._unstage(state, "unstaged",
                                 f"the fleet's target is now {self.config.target}")
        live = [ent for ent in boot.entries(esp) if ent.version == v]
        if entry.state == "paused":
            for ent in live:
                boot.pause(ent)
            msg = (f"{v} is staged, but its rollout in the {self.config.channel} channel is "
                   "paused: its boot entry is set aside until it is resumed.")
            state.record("paused", msg, self.now())
            self.say(msg)
            return Outcome("paused", msg, v)
        for path in boot.paused(esp, v):
            if live:
                boot.remove(path)
            else:
                boot.resume(path)
                self.say(f"{v} was resumed; its boot entry is back.")
        return None

    def _unstage(self, state: State, result: str, why: str) -> Outcome:
        """Make sure the staged release is never booted: its entry goes, then its slot."""
        assert state.staged is not None
        v = state.staged["version"]
        esp = self.esp()
        for e in boot.entries(esp):
            if e.version == v:
                boot.remove(e.path)
        for path in boot.paused(esp, v):
            boot.remove(path)
        slot = "?"
        try:
            lay = self.layout()
            slot = lay.other.name
            disk.set_partition(lay.disk, lay.other.data, label=disk.EMPTY)
            disk.set_partition(lay.disk, lay.other.hash, label=disk.EMPTY)
        except (UpdateError, OSError) as e:  # the entry is gone: it cannot boot anyway
            self.say(f"warning: slot {slot} could not be marked empty: {e}")
        state.staged = None
        msg = (f"{v} is not booted: {why} after it was staged; its boot entry is removed "
               f"and slot {slot} invalidated.")
        state.record(result, msg, self.now())
        self.say(msg)
        return Outcome(result, msg, v)

    def _count_failure(self, state: State, version: str, e: Exception, msg: str) -> None:
        """A failed install counts against the release when the release's own bytes or
        their writing failed (a signed hash that does not match, a payload that does not
        unpack, a slot that does not read back, an I/O error), not when nothing was
        wrong with it (an unreachable or too slow repository, a full disk: TransientError,
        ENOSPC). After INSTALL_TRIES such failures it is given up like a failed boot."""
        if isinstance(e, TransientError) or (
                isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return
        n = state.install_failures.get(version, 0) + 1
        if n < INSTALL_TRIES:
            state.install_failures[version] = n
            return
        state.install_failures.pop(version, None)
        state.bad[version] = f"installing it failed {n} times, the last: {msg.rstrip('.')}"
        text = (f"{version} is given up: installing it failed {n} times; it is not tried "
                "again.")
        state.record("given-up", text, self.now())
        self.say(text)

    def _maybe_reboot(self, state: State, reboot: bool | None, ignore_window: bool) -> Outcome:
        assert state.staged is not None
        v = state.staged["version"]
        want = self.config.reboot if reboot is None else reboot
        if not want:
            return Outcome("staged", f"{v} is staged; it boots at the next reboot.", v)
        if not ignore_window and not in_window(self.config.window, self.now()):
            nxt = next_opening(self.config.window, self.now())
            when = f" at {nxt:%a %H:%M} UTC" if nxt else ""
            return Outcome("staged", f"{v} is staged; the maintenance window opens{when}.", v)
        state.record("rebooting", f"Rebooting into {v}.", self.now())
        save_state(self.host, state)
        self._audit(state)  # now: the shutdown may stop this process
        self.say(f"Rebooting into {v}.")
        self.reboot_cmd()
        return Outcome("rebooting", f"Rebooting into {v}.", v)

    # -- writing a release -----------------------------------------------------------

    def _apply(self, state: State, client: RepoClient, rel: ReleaseDoc) -> None:
        assert self.arch is not None
        ar = rel.arches[self.arch]
        current = self.host.version
        lay = self.layout()
        target = lay.other
        esp = self.esp()
        disk_path = lay.disk
        self.say(f"Installing {rel.version} into slot {target.name} "
                 f"(running {current} from slot {lay.booted.name}).")
        work = self.host.state_dir / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        running_uki = [e for e in boot.entries(esp) if e.version == current]

        def from_partition(src: disk.Partition) -> Callable[[int, Path], str]:
            return lambda size, path: disk.read_bytes_to(disk_path, src, size, path)

        def from_esp(size: int, path: Path) -> str:
            if not running_uki:
                raise UpdateError("the running release's UKI is not on the ESP")
            shutil.copyfile(running_uki[0].path, path)
            return integrity.file_sha256(path)

        try:
            # 1. Every part downloaded, verified by TUF, and unpacked once to check that
            #    it gives exactly the signed bytes: nothing on disk changes before this.
            sources = {
                "usr": self._prepare(client, "usr", ar.parts["usr"], current, work,
                                     from_partition(lay.booted.data)),
                "verity": self._prepare(client, "verity", ar.parts["verity"], current, work,
                                        from_partition(lay.booted.hash)),
                "uki": self._prepare(client, "uki", ar.parts["uki"], current, work, from_esp),
            }
            # 2. Invalidate the slot and every boot entry but the running release's.
            for e in boot.entries(esp):
                if e.version != current:
                    boot.remove(e.path)
            boot.clean_partials(esp)
            disk.set_partition(disk_path, target.data, label=disk.EMPTY)
            disk.set_partition(disk_path, target.hash, label=disk.EMPTY)
            # 3. The slot's contents, read back against the signed hashes.
            for name, dest in (("usr", target.data), ("verity", target.hash)):
                part = ar.parts[name]
                self.say(f"{name}: writing {part.size / 1048576:.1f} MiB to {dest.node}")
                disk.write_stream(disk_path, dest, _zstd_stream(sources[name]), part.size,
                                  part.sha256)
            # 4. Its identity.
            data_uuid, hash_uuid = verity_uuids(ar.roothash)
            disk.set_partition(disk_path, target.data, part_uuid=data_uuid,
                               label=f"usr-{target.name}")
            disk.set_partition(disk_path, target.hash, part_uuid=hash_uuid,
                               label=f"usr-{target.name}-verity")
            # 5. The boot entry, last.
            uki = ar.parts["uki"]

            def check(path: Path) -> None:
                if not boot.matches(path, uki.size, uki.sha256):
                    raise UpdateError("The new UKI does not match its signed hash.")

            boot.install(esp, rel.version, self.config.boot_tries, _zstd_stream(sources["uki"]),
                         check)
            try:  # the agent's integrity check knows this UKI from now on
                integrity.record_uki(self.host.root, rel.version, uki.sha256)
            except OSError as e:
                self.say(f"warning: the boot manifest could not be updated: {e}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Whether the host had a network: the new release must then bring it up too.
        network = "yes" if health.default_route() else "no"
        state.staged = {"version": rel.version, "slot": target.name, "from": current,
                        "uki_size": str(uki.size), "uki_sha256": uki.sha256,
                        "network": network}
        state.record("staged", f"{rel.version} is written to slot {target.name} and verified.",
                     self.now())

    def _prepare(self, client: RepoClient, name: str, part: Part, current: str, work: Path,
                 base: Callable[[int, Path], str]) -> list[str]:
        """Download one part (the delta against *current* if there is one, else in full)
        and check it unpacks to the signed bytes; returns zstd's arguments to unpack it."""
        delta = part.deltas.get(current)
        free = shutil.disk_usage(work).free
        if delta is not None and free < delta.base_size + delta.payload.size + 16 * CHUNK:
            self.say(f"{name}: not enough free space in {work} for the delta; using the full "
                     "payload.")
            delta = None
        if delta is not None:
            base_path = work / f"{name}.base"
            patch_path = work / f"{name}.delta.zst"
            try:
                if base(delta.base_size, base_path) != delta.base_sha256:
                    raise UpdateError(f"the running {name} is not the delta's base")
                client.payload(delta.payload, patch_path)
                args = [f"--patch-from={base_path}", str(patch_path)]
                self._check_unpacks(name, args, part)
                self.say(f"{name}: a {delta.payload.size / 1048576:.1f} MiB delta "
                         f"(full: {part.full.size / 1048576:.1f} MiB), verified")
                return args
            except UpdateError as e:
                self.say(f"{name}: the delta could not be used ({e}); using the full payload.")
                base_path.unlink(missing_ok=True)
                patch_path.unlink(missing_ok=True)
        if free < 2 * part.full.size + 16 * CHUNK:
            raise TransientError(
                f"Installing needs {(2 * part.full.size) // CHUNK + 16} MiB free in {work}; "
                f"there are {free // CHUNK} MiB.")
        full = client.payload(part.full, work / f"{name}.zst")
        self._check_unpacks(name, [str(full)], part)
        self.say(f"{name}: the full payload ({part.full.size / 1048576:.1f} MiB), verified")
        return [str(full)]

    def _check_unpacks(self, name: str, args: list[str], part: Part) -> None:
        h = hashlib.sha256()
        size = 0
        for chunk in _zstd_stream(args):
            h.update(chunk)
            size += len(chunk)
        if size != part.size or h.hexdigest() != part.sha256:
            raise UpdateError(f"the {name} payload does not unpack to its signed hash")

    # -- going back ------------------------------------------------------------------

    def rollback(self, *, reboot: bool = True) -> Outcome:
        """Give up the running release for the other slot's (it is remembered as failed)."""
        with self.locked() as state:
            current = self.host.version
            ents = boot.entries(self.esp())
            others = [e for e in ents if e.version != current and not e.exhausted]
            if not others:
                raise UpdateError("There is no other release on this host to roll back to.")
            mine = [e for e in ents if e.version == current]
            for e in mine:
                boot.mark_bad(e)
            state.bad[current] = "rolled back by an administrator"
            state.record("rolling-back", f"Rolling back from {current} to "
                         f"{others[0].version}.", self.now())
        if reboot:
            self.say(f"Rebooting into {others[0].version}.")
            self.reboot_cmd()
        return Outcome("rolling-back", f"{others[0].version} boots next.", others[0].version)

    def network_expected(self) -> bool:
        """Whether this boot's health check requires the network (a default route).

        Only the boots that judge a new release do, and only if the host had a
        default route when it installed it: a release that loses the network of
        a networked host is given up, while a host without one (an isolated
        site, an image on its first boot) is not judged by it.
        """
        staged = load_state(self.host).staged
        return bool(staged and staged.get("version") == self.host.version
                    and staged.get("network") == "yes")

    def health_failed(self, problems: list[str]) -> Outcome:
        """The health check failed: on a counted boot, mark it bad and reboot."""
        current = self.host.version
        status = self.bless_status()
        with self.locked() as state:
            why = "its health check failed: " + "; ".join(problems)
            if status != "indeterminate":
                state.record("unhealthy", f"{current} is unhealthy ({'; '.join(problems)}); "
                             f"this boot is {status}, so it stays.", self.now())
                return Outcome("unhealthy", "The running release is unhealthy but was already "
                               "marked good; nothing to fall back to automatically.")
            state.bad[current] = why
            state.record("unhealthy", f"{current}: {why}; falling back.", self.now())
        self.bless_cmd("bad")
        self.say(f"{current} is unhealthy; rebooting into the previous release.")
        self.reboot_cmd()
        return Outcome("rebooting", "Falling back to the previous release.")
