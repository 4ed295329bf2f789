"""Serving an update repository over HTTP for trying updates out and for tests.

Production repositories are static files behind any web server or CDN (TUF
makes the transport untrusted); this is the small server for a laptop or a
test: read-only, no directory listings, nothing outside the repository, no
hidden files (the lock, a publication in progress) and no key files; and it
refuses to start on a directory that holds a private key.
"""

from __future__ import annotations

import functools
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class _Handler(http.server.SimpleHTTPRequestHandler):
    def list_directory(self, path: str | Any) -> None:
        self.send_error(404, "No listing")

    def send_head(self) -> Any:
        """Only regular files inside the served directory, links resolved; no hidden
        names, no key files, nothing a trailing slash or an encoding could disguise."""
        path = urllib.parse.unquote(self.path.split("?", 1)[0].split("#", 1)[0])
        parts = [p for p in path.split("/") if p]
        root = Path(self.directory).resolve()
        try:
            real = Path(self.translate_path(self.path)).resolve()
        except (OSError, ValueError, RuntimeError):
            real = root / ".refused"
        if (any(p.startswith(".") or p.endswith((".pem", ".key")) for p in parts)
                or "\0" in path or root not in real.parents
                or (real.exists() and not real.is_file())
                or real.name.endswith((".pem", ".key"))):
            self.send_error(404, "Not served")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.quiet:  # type: ignore[attr-defined]
            return
        super().log_message(format, *args)


class RepoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    quiet = True


def make_server(root: Path, host: str = "127.0.0.1", port: int = 0,
                quiet: bool = True) -> RepoServer:
    from cerulean.release.keys import refuse_to_serve

    refuse_to_serve(root)
    handler = functools.partial(_Handler, directory=str(root))
    srv = RepoServer((host, port), handler)
    srv.quiet = quiet
    return srv


@contextmanager
def serving(root: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve *root* in a thread; yields the base URL (``http://HOST:PORT``)."""
    srv = make_server(root, host, port)
    t = threading.Thread(target=srv.serve_forever, name="repo-server", daemon=True)
    t.start()
    try:
        yield f"http://{host}:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
