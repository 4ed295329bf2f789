"""The releases rollouts can choose from: the channels of the TUF update repository.

The fleet reads the repository the publisher writes (``update-repo`` in
fleet.toml: a directory, or an http(s) URL) the way a host does, through
python-tuf's ngclient, and trusts it no more: it starts from a root it was
given (``update-root``, the repository's ``root.json``), walks the root chain
from there, checks the signatures, thresholds, versions (no rollback) and
expiry of timestamp, snapshot and targets, and checks each channel and release
document against its signed length and hash. Each release comes with the CVEs
its release document says it fixes; a release document, named by its signed
hash, is read once. What it has verified is kept in
the data directory (``update-trust/``), so a repository that goes back to older
metadata later is refused.

A result is kept for :data:`RECHECK` seconds, or until the timestamp file of a
local repository changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from tuf.api import exceptions as tx
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from cerulean.agent.fileio import write_atomic
from cerulean.errors import CeruleanError
from cerulean.protocol.update import (
    CHANNELS,
    ChannelDoc,
    ProtocolError,
    ReleaseDoc,
    channel_path,
    release_path,
    version_key,
)

RECHECK = 60.0  # seconds a verified result is used without asking the repository again
HTTP_TIMEOUT = 10  # seconds without a byte before a download from an http(s) repository fails
HTTP_BUDGET = 60.0  # seconds for all the downloads of one verification of an http(s) repository
CHUNK = 1 << 16


@dataclass(frozen=True)
class Release:
    channel: str
    image: str
    version: str
    published: str
    state: str
    cves: tuple[str, ...] = ()  # the CVEs its package changes fix (from its release.json)


@dataclass(frozen=True)
class Source:
    """Where the fleet reads releases from and what it trusts them by.

    *repo* is a directory or an http(s) URL; *root* the trust anchor (``update-root``),
    ``None`` when fleet.toml names none; *data* the fleet's data directory, where the
    verified metadata is kept.
    """

    repo: str
    root: Path | None
    data: Path

    @property
    def is_url(self) -> bool:
        return self.repo.startswith(("http://", "https://"))


class DirectoryFetcher(FetcherInterface):  # type: ignore[misc]
    """A python-tuf fetcher that reads ``file:`` URLs of files under *root* only.

    A name that is not there (or not a regular file) is a 404, as a web server would
    answer, which ends ngclient's walk of the root chain. A path that leads outside
    *root*, by ``..`` or a symbolic link, is refused. ngclient stops reading as soon as
    a file is longer than the length it allows (the signed length, or its limit for a
    metadata file): the file is read in chunks, never whole.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise tx.DownloadError(f"{url} is not a file URL")
        path = Path(unquote(parts.path))
        try:
            real = path.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise tx.DownloadHTTPError(f"{path} does not exist", 404) from e
        except (OSError, RuntimeError) as e:
            raise tx.DownloadError(f"{path} cannot be read: {e}") from e
        if not real.is_relative_to(self.root):
            raise tx.DownloadError(f"{path} leads outside the repository")
        if not real.is_file():
            raise tx.DownloadHTTPError(f"{path} is not a file", 404)
        try:
            f = real.open("rb")
        except OSError as e:
            raise tx.DownloadError(f"{path} cannot be read: {e.strerror or e}") from e
        return _chunks(f)


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


def _sentence(e: BaseException) -> str:
    return str(e).strip().rstrip(".") or type(e).__name__


def _explain(e: Exception, what: str, src: Source) -> CeruleanError:
    if isinstance(e, CeruleanError):
        return e
    if isinstance(e, tx.ExpiredMetadataError):
        return CeruleanError(f"The update repository's metadata has expired ({_sentence(e)}); "
                             "the publisher must refresh it (cerulean release refresh).")
    if isinstance(e, tx.BadVersionNumberError | tx.EqualVersionNumberError):
        return CeruleanError(
            f"The update repository offered older metadata than the fleet already trusts "
            f"(a rollback: {_sentence(e)}); refusing it.")
    if isinstance(e, tx.UnsignedMetadataError):
        return CeruleanError(
            f"The update repository's metadata is not signed by the keys the fleet trusts "
            f"({_sentence(e)}); refusing it.")
    if isinstance(e, tx.LengthOrHashMismatchError | tx.DownloadLengthMismatchError):
        return CeruleanError(f"The update repository's {what} does not match its signed "
                             "length and hash; refusing it.")
    if isinstance(e, tx.DownloadError):
        cause = e.__cause__ or e.__context__
        reason = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", str(cause)) if cause else []
        detail = _sentence(e) + (f" ({reason[-1].strip()})" if reason else
                                 f" ({_sentence(cause)})" if cause else "")
        return CeruleanError(f"The update repository {src.repo} cannot be read: {detail}.")
    if isinstance(e, tx.RepositoryError):
        return CeruleanError(f"The update repository is not trustworthy: {_sentence(e)}.")
    if isinstance(e, OSError):
        return CeruleanError(f"The fleet cannot keep the update repository's verified "
                             f"metadata in {src.data / 'update-trust'}: {e.strerror or e}.")
    return CeruleanError(f"Reading {what} from the update repository failed: "
                         f"{_sentence(e)}.")


def read_anchor(path: Path) -> bytes:
    """The bytes of a trust anchor, checked to be TUF root metadata (not its signatures:
    whoever configures the fleet vouches for it)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CeruleanError(f"The update root {path} cannot be read: {e.strerror or e}.") from e
    try:
        md = Metadata.from_bytes(data)
    except Exception as e:  # python-tuf's DeserializationError, or anything under it
        raise CeruleanError(f"The update root {path} is not TUF root metadata: "
                            f"{_sentence(e)}.") from e
    if not isinstance(md.signed, Root):
        raise CeruleanError(f"The update root {path} is {md.signed.type} metadata, not root "
                            "metadata (give the repository's metadata/1.root.json).")
    return data


def trust_dir(src: Source) -> Path:
    """The directory of the metadata the fleet has verified, seeded with the anchor.

    Each anchor has a directory of its own (named by its hash): giving the fleet a
    different root starts afresh, and never mixes with what an earlier one verified.
    """
    if src.root is None:
        raise CeruleanError(
            "The fleet has an update-repo but no update-root to verify it by: set update-root "
            "to the repository's root.json (cerulean fleet init --update-root FILE).")
    anchor = read_anchor(src.root)
    d = src.data / "update-trust" / hashlib.sha256(anchor).hexdigest()[:16]
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (d / "root.json").is_file():
            write_atomic(d / "root.json", anchor)
    except OSError as e:
        raise CeruleanError(f"The fleet cannot keep the update repository's verified "
                            f"metadata in {d}: {e.strerror or e}.") from e
    return d


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    # Server processes of one data directory share its trusted metadata.
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _updater(src: Source, trusted: Path) -> Updater:
    config = UpdaterConfig(app_user_agent="cerulean-fleet")
    if src.is_url:
        # The host's fetcher, with a deadline for every file and for the whole read: a
        # repository that trickles must not hold the releases page (and the lock every
        # other request waits on) for ever.
        from cerulean.agent.update.client import Limits, _fetcher_class

        base = src.repo.rstrip("/") + "/"
        limits = Limits(read_timeout=HTTP_TIMEOUT, slack=HTTP_TIMEOUT, run_budget=HTTP_BUDGET)
        fetcher = _fetcher_class()(limits, time.monotonic() + limits.run_budget)
        return Updater(str(trusted), base + "metadata/", None, base + "targets/",
                       fetcher=fetcher, config=config)
    repo = Path(src.repo).resolve()
    return Updater(str(trusted), repo.joinpath("metadata").as_uri() + "/", None,
                   repo.joinpath("targets").as_uri() + "/", fetcher=DirectoryFetcher(repo),
                   config=config)


# Release documents already read, by target path and sha256: they never change.
_documents: dict[tuple[str, str], tuple[str, ...]] = {}


def _read(up: Updater, path: str, work: Path, src: Source) -> bytes | None:
    """A target's bytes, verified against the signed targets metadata (None: not there)."""
    dest = work / hashlib.sha256(path.encode()).hexdigest()
    try:
        info = up.get_targetinfo(path)
        if info is None:
            return None
        up.download_target(info, str(dest))
        return dest.read_bytes()
    except Exception as e:
        raise _explain(e, path, src) from e
    finally:
        dest.unlink(missing_ok=True)


def _verify(src: Source) -> list[Release]:
    trusted = trust_dir(src)
    with _flock(trusted / ".lock"):
        work = Path(tempfile.mkdtemp(prefix=".download.", dir=trusted))
        try:
            try:
                up = _updater(src, trusted)
                up.refresh()
            except Exception as e:  # ngclient raises many kinds; each becomes one sentence
                raise _explain(e, "metadata", src) from e
            out: list[Release] = []
            for name in CHANNELS:
                data = _read(up, channel_path(name), work, src)
                if data is None:
                    continue
                try:
                    doc = ChannelDoc.from_json(json.loads(data))
                except (ValueError, ProtocolError) as e:
                    raise CeruleanError(f"The update repository's {channel_path(name)} is not "
                                        f"valid: {e}") from e
                for ent in doc.entries:
                    cves = _cves(up, ent.image, ent.version, work, src)
                    out.append(Release(name, ent.image, ent.version, ent.published, ent.state,
                                       cves))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    out.sort(key=lambda r: (version_key(r.version), r.channel, r.image), reverse=True)
    return out


def _cves(up: Updater, image: str, version: str, work: Path, src: Source) -> tuple[str, ...]:
    path = release_path(image, version)
    try:
        info = up.get_targetinfo(path)
    except Exception as e:
        raise _explain(e, path, src) from e
    if info is None:
        raise CeruleanError(f"The update repository offers {image} {version} but has no "
                            f"{path}; hosts could not install it.")
    key = (path, info.hashes.get("sha256", ""))
    if key in _documents:
        return _documents[key]
    data = _read(up, path, work, src)
    assert data is not None
    try:
        doc = ReleaseDoc.from_json(json.loads(data))
    except (ValueError, ProtocolError) as e:
        raise CeruleanError(f"The update repository's {path} is not valid: {e}") from e
    if (doc.image, doc.version) != (image, version):
        raise CeruleanError(f"The update repository's {path} describes {doc.image} "
                            f"{doc.version}; refusing it.")
    _documents[key] = tuple(doc.cves)
    return _documents[key]


def _stamp(src: Source) -> tuple[int, ...] | None:
    """What changes when a local repository publishes (its timestamp file is replaced)."""
    if src.is_url:
        return None
    path = Path(src.repo) / "metadata" / "timestamp.json"
    try:
        st = path.stat()
    except OSError as e:
        raise CeruleanError(f"The update repository {src.repo} cannot be read: "
                            f"{e.strerror or e}.") from e
    return (st.st_ino, st.st_mtime_ns, st.st_size)


_lock = threading.Lock()
_cache: dict[Source, tuple[float, tuple[int, ...] | None, list[Release]]] = {}


def offered(src: Source) -> list[Release]:
    """Every release in every channel of the repository, newest first."""
    with _lock:  # one verification at a time; the others then use its result
        stamp = _stamp(src)
        hit = _cache.get(src)
        if hit and hit[1] == stamp and time.monotonic() - hit[0] < RECHECK:
            return hit[2]
        _cache.pop(src, None)
        out = _verify(src)
        _cache[src] = (time.monotonic(), stamp, out)
        return out


def check_target(src: Source, channel: str, target: str) -> None:
    """Refuse a rollout target that the repository does not offer in *channel*."""
    from cerulean.fleet.hosts import Invalid

    versions = [r.version for r in offered(src) if r.channel == channel]
    if target and target not in versions:
        have = ", ".join(dict.fromkeys(versions[:5])) or "none"
        raise Invalid(f"Release {target} is not in the {channel} channel of the update "
                      f"repository (newest there: {have}).")


def release_cves(source: Source | None, update: dict[str, Any]) -> list[str]:
    """The CVEs the release a host runs fixes (its ``update`` as reported), from the
    verified repository; empty when the fleet has no repository, the repository cannot
    be verified now, or the release is not in it."""
    if source is None or not isinstance(update, dict):
        return []
    image, version = update.get("image"), update.get("version")
    try:
        found = [r for r in offered(source) if (r.image, r.version) == (image, version)]
    except CeruleanError:
        return []
    return sorted({c for r in found for c in r.cves})
