"""Reading the update repository through TUF (python-tuf's ngclient).

Every document and payload a host acts on comes through :class:`RepoClient`:
ngclient walks the root chain from the root the image shipped with, checks
signatures, thresholds, versions (no rollback) and expiry of timestamp,
snapshot and targets, and checks each download's length and sha256 against
the signed targets metadata. Any failure is raised as :class:`UpdateError`
with one sentence, and the host's trusted metadata stays as it was.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from cerulean.agent.fileio import write_atomic
from cerulean.agent.update.errors import RefusedError, TransientError, UpdateError
from cerulean.protocol.update import (
    ChannelDoc,
    Payload,
    ProtocolError,
    ReleaseDoc,
    channel_path,
    release_path,
)

if TYPE_CHECKING:
    from tuf.ngclient import FetcherInterface, Updater

# python-tuf (and the cryptography it pulls in) is imported only when the repository is
# read: `cerulean update health` and `status`, which run on every boot, never need it.
# Debian 12 has no python3-tuf: such a server reports, it does not update.
HAVE_TUF = importlib.util.find_spec("tuf") is not None

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """How long downloads may take. Every download has a deadline of *slack* seconds
    plus its length at *min_rate* bytes a second, and all those of one client (one
    updater run) end at *run_budget* seconds after it was made; a read that brings
    nothing for *read_timeout* seconds fails at once."""

    read_timeout: float = 30.0
    min_rate: float = 64 * 1024
    slack: float = 60.0
    run_budget: float = 90 * 60.0


CHUNK = 1 << 16
_FETCHER: list[type[FetcherInterface]] = []


def _fetcher_class() -> type[FetcherInterface]:
    """An ngclient fetcher on the standard library with deadlines, made when TUF is loaded.

    ngclient's own fetcher (requests in python-tuf 5, urllib3 from 6) has only a
    timeout between two reads, and reads its chunks whole: a mirror that sends a
    byte every few seconds holds it for ever. This one reads what has arrived
    (``read1``), checks the clock after every read and shortens the socket's
    timeout to what is left, so a download ends at its deadline. It follows
    redirects and the ``https_proxy`` variables as urllib does; TLS is checked
    against the system's CAs (TUF checks the contents in any case).
    """
    if _FETCHER:
        return _FETCHER[0]
    import tuf
    from tuf.api import exceptions as tuf_errors
    from tuf.ngclient.fetcher import FetcherInterface

    class DeadlineFetcher(FetcherInterface):  # type: ignore[misc]
        def __init__(self, limits: Limits, run_deadline: float) -> None:
            self.limits, self.run_deadline = limits, run_deadline
            self.deadline, self.why = run_deadline, ""
            self.agent = f"cerulean python-tuf/{tuf.__version__}"

        @contextlib.contextmanager
        def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
            lim = self.limits
            own = lim.slack + max_length / lim.min_rate
            name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
            if time.monotonic() + own < self.run_deadline:
                self.deadline = time.monotonic() + own
                self.why = (f"Downloading {name} took longer than its deadline of {own:.0f} s "
                            f"(a download must average {lim.min_rate / 1024:.0f} KiB/s, with "
                            f"{lim.slack:.0f} s to spare); giving up.")
            else:
                self.deadline = self.run_deadline
                self.why = (f"The downloads of this update run took longer than "
                            f"{lim.run_budget / 60:.0f} minutes together (stopped at {name}); "
                            "giving up, the next run starts afresh.")
            with super().download_file(url, max_length) as f:
                yield f

        def _left(self) -> float:
            left = self.deadline - time.monotonic()
            if left <= 0:
                err = tuf_errors.SlowRetrievalError(self.why)
                err.sentence = self.why
                raise err
            return min(left, self.limits.read_timeout)

        def _fetch(self, url: str) -> Iterator[bytes]:
            req = urllib.request.Request(url, headers={"User-Agent": self.agent})
            try:
                resp = urllib.request.urlopen(req, timeout=self._left())
            except urllib.error.HTTPError as e:
                e.close()
                raise tuf_errors.DownloadHTTPError(f"HTTP {e.code} {e.reason}", e.code) from e
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                self._left()  # the deadline, if that is what ended it
                reason = getattr(e, "reason", None) or e
                raise tuf_errors.DownloadError(f"{reason}") from e
            return self._chunks(resp)

        def _chunks(self, resp: Any) -> Iterator[bytes]:
            sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)
            with resp:
                while True:
                    left = self._left()
                    if resp.isclosed():
                        return  # the whole body was read; http.client closed the socket
                    try:
                        if sock is not None:
                            sock.settimeout(left)
                        chunk = resp.read1(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        self._left()
                        raise tuf_errors.SlowRetrievalError(
                            f"no data for {left:.0f} s" if isinstance(e, TimeoutError)
                            else f"{e}") from e
                    if not chunk:
                        return
                    yield chunk

    _FETCHER.append(DeadlineFetcher)
    return DeadlineFetcher


def _explain(e: Exception, what: str) -> UpdateError:
    """One sentence for what ngclient raised: RefusedError for what TUF refuses (the
    repository cannot be trusted as it is), TransientError for what did not arrive."""
    from tuf.api import exceptions as tuf_errors

    if isinstance(e, UpdateError):
        return e  # already explained (by refresh, say)
    if isinstance(e, tuf_errors.ExpiredMetadataError):
        return RefusedError(
            f"The update repository's metadata has expired ({e}); refusing it.")
    if isinstance(e, tuf_errors.BadVersionNumberError | tuf_errors.EqualVersionNumberError):
        return RefusedError(
            f"The update repository offered older metadata than this host already trusts "
            f"(a rollback; {e}); refusing it.")
    if isinstance(e, tuf_errors.UnsignedMetadataError):
        return RefusedError(
            f"The update repository's metadata is not signed by the keys this host trusts "
            f"({e}); refusing it.")
    if isinstance(e, tuf_errors.LengthOrHashMismatchError
                  | tuf_errors.DownloadLengthMismatchError):
        return RefusedError(
            f"{what} does not match its signed length and hash ({e}); refusing it.")
    sentence = getattr(e, "sentence", None)  # a deadline (see DeadlineFetcher)
    if sentence:
        return TransientError(str(sentence))
    if isinstance(e, tuf_errors.DownloadError):
        return TransientError(f"Downloading {what} from the update repository failed: "
                              f"{str(e).rstrip('.') or type(e).__name__}.")
    if isinstance(e, tuf_errors.RepositoryError):
        return RefusedError(f"The update repository is not trustworthy: {e}.")
    return UpdateError(f"Reading {what} from the update repository failed: "
                       f"{str(e).rstrip('.')}.")


class RepoClient:
    """One repository URL, with trusted metadata kept in *state_dir*.

    *trusted_root* (the ``root.json`` the image was built with) seeds
    *state_dir* the first time; after that the newest verified root is used.
    """

    def __init__(self, url: str, state_dir: Path, trusted_root: Path,
                 limits: Limits | None = None,
                 note: Callable[[str], None] | None = None) -> None:
        if not HAVE_TUF:
            raise UpdateError("Updates need python3-tuf, which is not installed on this host.")
        try:
            import tuf.ngclient  # noqa: F401  (here, so that a broken install is one sentence)
        except ImportError as e:
            raise UpdateError(f"Updates need python3-tuf, which does not load here: {e}") from e
        self.url = url.rstrip("/") + "/"
        self.meta_dir = state_dir / "metadata"
        self.download_dir = state_dir / "downloads"
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.trusted_root = trusted_root
        if not (self.meta_dir / "root.json").exists():
            if not trusted_root.is_file():
                raise UpdateError(
                    f"This host has no trusted root for updates ({trusted_root} is missing).")
            # Whole or not at all: the health check may read it while the updater seeds it.
            self._seed()
        self._updater: Updater | None = None
        self.limits = limits or Limits()
        self.note = note or (lambda _: None)  # told what was repaired
        self._fetcher = _fetcher_class()(self.limits, time.monotonic() + self.limits.run_budget)

    def refresh(self) -> None:
        """Fetch and verify the top-level metadata (timestamp, snapshot, targets)."""
        from tuf.ngclient import Updater, UpdaterConfig

        def updater() -> Updater:
            return Updater(str(self.meta_dir), self.url + "metadata/", str(self.download_dir),
                           self.url + "targets/", fetcher=self._fetcher,
                           config=UpdaterConfig(app_user_agent="cerulean"))

        try:
            try:
                up = updater()
            except Exception as e:  # only the trusted root.json is read here
                self._reseed(e)
                up = updater()
            up.refresh()
        except Exception as e:  # ngclient raises many kinds; each becomes one sentence
            raise _explain(e, "the metadata") from e
        self._updater = up

    def _seed(self) -> None:
        """The image's root as the trusted root.json, written whole (two processes may
        seed at once; each rename is whole)."""
        write_atomic(self.meta_dir / "root.json", self.trusted_root.read_bytes(),
                     durable=True)

    def _reseed(self, e: Exception) -> None:
        """The trusted root.json does not load (torn, edited, not signed by its own keys):
        start again from the image's root; ngclient then walks the chain of newer roots
        from the repository (N+1.root.json, each signed by the one before)."""
        root = self.meta_dir / "root.json"
        if not self.trusted_root.is_file():
            raise UpdateError(f"The trusted {root} is damaged ({e}) and this host has no "
                              f"root to start again from ({self.trusted_root} is missing).")
        self._seed()
        self.note(f"The trusted {root} was damaged ({str(e).rstrip('.') or type(e).__name__}); "
                  f"it was seeded again from the image's {self.trusted_root} and the chain "
                  "of newer roots is followed again from there.")

    @property
    def updater(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def fetch(self, target: str, dest: Path) -> Path:
        """Download *target*, verified against the signed targets metadata, to *dest*."""
        try:
            info = self.updater.get_targetinfo(target)
        except Exception as e:
            raise _explain(e, target) from e
        if info is None:
            raise UpdateError(f"The update repository has no {target}.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        try:
            self.updater.download_target(info, str(partial))
        except Exception as e:
            partial.unlink(missing_ok=True)
            raise _explain(e, target) from e
        partial.replace(dest)
        return dest

    def _document(self, target: str, parse: type[T]) -> T:
        path = self.fetch(target, self.download_dir / target.replace("/", "_"))
        try:
            data = json.loads(path.read_bytes())
            return parse.from_json(data)  # type: ignore[attr-defined, no-any-return]
        except (ValueError, ProtocolError) as e:
            raise UpdateError(f"The repository's {target} is not valid: {e}") from e
        finally:
            path.unlink(missing_ok=True)

    def has(self, target: str) -> bool:
        try:
            return self.updater.get_targetinfo(target) is not None
        except Exception as e:
            raise _explain(e, target) from e

    def channel(self, name: str) -> ChannelDoc:
        if not self.has(channel_path(name)):
            raise UpdateError(f"The update repository has no channel {name!r}.")
        return self._document(channel_path(name), ChannelDoc)

    def release(self, image: str, version: str) -> ReleaseDoc:
        doc = self._document(release_path(image, version), ReleaseDoc)
        if doc.image != image or doc.version != version:
            raise UpdateError(
                f"The repository's release document for {image} {version} describes "
                f"{doc.image} {doc.version}; refusing it.")
        return doc

    def payload(self, p: Payload, dest: Path) -> Path:
        return self.fetch(p.path, dest)
