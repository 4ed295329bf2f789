"""HTTP downloads from the archive: retries, parallelism and progress.

Everything downloaded is checked against an expected size and sha256 before it
enters the cache; a mismatch is never retried into acceptance.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cerulean import __version__
from cerulean.debian.cache import Cache
from cerulean.errors import CeruleanError, NetworkError, VerificationError

if TYPE_CHECKING:
    import httpx
    from rich.progress import Progress, TaskID

# httpx and rich.progress are imported where they are used: a warm build that
# downloads nothing should not pay for loading them.

RETRIES = 4
USER_AGENT = f"cerulean/{__version__}"
# A small document (an InRelease file) is at most this big and comes within this
# time, retries included: a mirror that trickles must not hold anyone for ever.
SMALL_LIMIT = 16 << 20
SMALL_DEADLINE = 300.0


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str
    size: int
    what: str  # e.g. "libc6 2.41-12 (amd64)"
    fallback_url: str = ""  # tried when url answers 404 (by-hash files can be pruned)


def client() -> httpx.Client:
    import httpx

    return httpx.Client(
        timeout=httpx.Timeout(30.0, connect=15.0),
        follow_redirects=True,
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
    )


class _TryFallback(Exception):
    """The primary URL answered 404 and a fallback URL exists."""


def _transient(status: int) -> bool:
    return status in (408, 429) or status >= 500


def get_bytes(http: httpx.Client, url: str, what: str, *, missing_ok: bool = False,
              limit: int = SMALL_LIMIT, deadline: float = SMALL_DEADLINE) -> bytes | None:
    """GET a small document (such as InRelease) with retries, at most *limit* bytes and
    *deadline* seconds in all."""
    import httpx

    end = time.monotonic() + deadline
    too_slow = NetworkError(f"Downloading {what} from {url} took longer than {deadline:.0f} s; "
                            "the mirror is too slow or stalled.")
    delay = 0.5
    for attempt in range(1, RETRIES + 1):
        try:
            with http.stream("GET", url) as r:
                if r.status_code == 200:
                    buf = bytearray()
                    for chunk in r.iter_bytes():
                        buf += chunk
                        if len(buf) > limit:
                            raise NetworkError(f"{what} from {url} is larger than "
                                               f"{limit >> 20} MiB; refusing it.")
                        if time.monotonic() > end:
                            raise too_slow
                    return bytes(buf)
                status = r.status_code
        except httpx.TransportError as e:
            if attempt == RETRIES or time.monotonic() > end:
                raise NetworkError(f"Could not download {what} from {url}: {e}.") from None
        else:
            if status == 404 and missing_ok:
                return None
            if not _transient(status) or attempt == RETRIES:
                raise NetworkError(f"Could not download {what}: {url} answered HTTP {status}.")
        if time.monotonic() + delay > end:
            raise too_slow
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _fetch_one(http: httpx.Client, cache: Cache, d: Download, progress: Progress | None,
               task: TaskID | None) -> None:
    import httpx

    delay = 0.5
    dest = cache.blob_path(d.sha256)
    url = d.url
    attempt = 0
    while attempt < RETRIES:
        attempt += 1
        fd, tmp = tempfile.mkstemp(prefix=".dl.", dir=dest.parent)
        done = 0
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f, http.stream("GET", url) as r:
                if r.status_code == 404 and d.fallback_url and url != d.fallback_url:
                    raise _TryFallback
                if r.status_code == 404 and "/pool/" in url:
                    raise NetworkError(
                        f"The archive no longer has {d.what} ({url} answered HTTP 404): "
                        "run `cerulean lock --refresh` to move the lock to current versions."
                    )
                if r.status_code != 200:
                    if _transient(r.status_code) and attempt < RETRIES:
                        raise httpx.TransportError(f"HTTP {r.status_code}")
                    raise NetworkError(
                        f"Could not download {d.what}: {url} answered HTTP {r.status_code}."
                    )
                for chunk in r.iter_bytes(1 << 16):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress is not None and task is not None:
                        progress.advance(task, len(chunk))
                    if done > d.size:
                        break
            if done != d.size or h.hexdigest() != d.sha256:
                raise VerificationError(
                    f"The download of {d.what} from {url} does not match the size and "
                    "sha256 its signed index gives (the mirror may be mid-update)."
                )
            os.replace(tmp, dest)
            return
        except _TryFallback:
            # A pruned by-hash file: the plain path is checked against the same hash.
            Path(tmp).unlink(missing_ok=True)
            url = d.fallback_url
            attempt -= 1
            continue
        except httpx.TransportError as e:
            Path(tmp).unlink(missing_ok=True)
            if progress is not None and task is not None:
                progress.advance(task, -done)
            if attempt == RETRIES:
                raise NetworkError(f"Could not download {d.what} from {url}: {e}.") from None
            time.sleep(delay)
            delay *= 2
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def fetch_all(cache: Cache, downloads: Sequence[Download], *, offline: bool = False,
              show_progress: bool = True, jobs: int = 8) -> None:
    """Make sure every download is in the cache, fetching what is missing in parallel."""
    missing = [d for d in downloads if not cache.has(d.sha256)]
    # The same blob may be wanted twice (e.g. an arch:all package for two arches).
    unique = list({d.sha256: d for d in missing}.values())
    if not unique:
        return
    if offline:
        names = ", ".join(d.what for d in unique[:3])
        more = f" and {len(unique) - 3} more" if len(unique) > 3 else ""
        raise CeruleanError(
            f"--offline was given but {len(unique)} package(s) are not in the cache: "
            f"{names}{more}."
        )
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    total = sum(d.size for d in unique)
    progress = Progress(
        TextColumn("[bold]Downloading[/] {task.fields[count]} packages"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not show_progress,
    )
    with progress, client() as http, ThreadPoolExecutor(max_workers=jobs) as pool:
        task = progress.add_task("download", total=total, count=len(unique))
        futures = [pool.submit(_fetch_one, http, cache, d, progress, task) for d in unique]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
