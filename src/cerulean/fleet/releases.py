"""The releases rollouts can choose from: the channels of the TUF update repository.

The fleet reads the repository the publisher writes (``update-repo`` in
fleet.toml, a directory) and trusts it no more than a host would: the targets
metadata must carry the signatures its root asks for and must not have
expired, and each channel document must have the length and sha256 the
targets metadata gives it. What it read is kept until the repository's
timestamp changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cerulean.errors import CeruleanError
from cerulean.protocol.update import ChannelDoc, ProtocolError, channel_path, version_key


@dataclass(frozen=True)
class Release:
    channel: str
    image: str
    version: str
    published: str
    state: str


_cache: dict[Path, tuple[float, list[Release]]] = {}


def offered(repo_dir: Path, now: datetime | None = None) -> list[Release]:
    """Every release in every channel of the repository, newest first."""
    from tuf.api.exceptions import RepositoryError

    from cerulean.release.repo import Repository

    try:
        stamp = (repo_dir / "metadata" / "timestamp.json").stat().st_mtime
    except OSError as e:
        raise CeruleanError(f"The update repository {repo_dir} cannot be read: "
                            f"{e.strerror or e}.") from e
    hit = _cache.get(repo_dir)
    if hit and hit[0] == stamp:
        return hit[1]
    repo = Repository.read_only(repo_dir)
    root, targets = repo.load("root"), repo.load("targets")
    try:
        root.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    except RepositoryError as e:
        raise CeruleanError(f"The update repository's targets metadata is not signed as "
                            f"its root requires: {e}.") from e
    if targets.signed.is_expired(now or datetime.now(UTC)):
        raise CeruleanError("The update repository's targets metadata has expired; the "
                            "publisher must refresh it (cerulean release refresh).")
    out: list[Release] = []
    for name in repo.channels():
        path = channel_path(name)
        tf = targets.signed.targets[path]
        data = repo.read_target(path)
        if len(data) != tf.length or hashlib.sha256(data).hexdigest() != tf.hashes["sha256"]:
            raise CeruleanError(f"The update repository's {path} does not match its "
                                "targets metadata.")
        try:
            doc = ChannelDoc.from_json(json.loads(data))
        except (ValueError, ProtocolError) as e:
            raise CeruleanError(f"The update repository's {path} is not valid: {e}") from e
        out += [Release(name, e.image, e.version, e.published, e.state) for e in doc.entries]
    out.sort(key=lambda r: (version_key(r.version), r.channel, r.image), reverse=True)
    _cache[repo_dir] = (stamp, out)
    return out


def check_target(repo_dir: Path, channel: str, target: str) -> None:
    """Refuse a rollout target that the repository does not offer in *channel*."""
    from cerulean.fleet.hosts import Invalid

    versions = [r.version for r in offered(repo_dir) if r.channel == channel]
    if target and target not in versions:
        have = ", ".join(dict.fromkeys(versions[:5])) or "none"
        raise Invalid(f"Release {target} is not in the {channel} channel of the update "
                      f"repository (newest there: {have}).")
