"""Serving an update repository over HTTP for trying updates out and for tests.

Production repositories are static files behind any web server or CDN (TUF
makes the transport untrusted); this is the small server for a laptop or a
test: read-only, no directory listings, nothing outside the repository.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class _Handler(http.server.SimpleHTTPRequestHandler):
    def list_directory(self, path: str | Any) -> None:
        self.send_error(404, "No listing")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.quiet:  # type: ignore[attr-defined]
            return
        super().log_message(format, *args)


class RepoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    quiet = True


def make_server(root: Path, host: str = "127.0.0.1", port: int = 0,
                quiet: bool = True) -> RepoServer:
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
