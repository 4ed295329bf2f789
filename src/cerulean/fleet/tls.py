"""TLS for the fleet server: the client certificate of each connection, handed to the app.

uvicorn checks the client certificate in the handshake (against the fleet CA,
with its dates) but does not tell the application which one it was. This
protocol adds the ASGI TLS extension (``scope["extensions"]["tls"]``, with
``client_cert_chain`` as PEM) to every request of a TLS connection, the way the
ASGI specification describes it. Enrollment needs no certificate, so the server
asks for one (``CERT_OPTIONAL``) and each endpoint decides whether it needs it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TLSExtensionProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol on httptools (the C parser), with the TLS extension."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        obj = transport.get_extra_info("ssl_object")
        if obj is None:
            return
        der = obj.getpeercert(binary_form=True)
        tls = {"server_cert": None,
               "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
               "client_cert_name": None, "client_cert_error": None,
               "tls_version": None, "cipher_suite": None}
        app = self.app

        async def with_tls(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                scope.setdefault("extensions", {})["tls"] = tls
            await app(scope, receive, send)

        self.app = with_tls


def client_der(scope: Any) -> bytes | None:
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None
