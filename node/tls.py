"""DICOM over TLS (PS3.15 B.1): SSL contexts built from the config, and an SCP server that
does each TLS handshake in the connection's own thread, under a timeout, logging every failure.

Why a server subclass: pynetdicom wraps accepted sockets inside its accept loop with the
handshake done on the spot, so one client that connects and never speaks TLS stalls every other
caller, and a failed handshake vanishes without a trace (socketserver drops the OSError). Here
the accept loop only wraps the socket; the handshake runs in the per-connection thread with the
ACSE timeout, and a refusal is logged with the peer address and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config, ConfigError

log = logging.getLogger(__name__)

MIN_TLS = ssl.TLSVersion.TLSv1_2


def _file(cfg: Config, key: str, value: str) -> str:
    """A configured PEM file that must exist; the error names the key."""
    path = cfg.file_path(value)
    if path is None or not path.is_file():
        raise ConfigError(f"{key}: file not found: {path or '(empty)'}")
    return str(path)


def _load_chain(ctx: ssl.SSLContext, cfg: Config, section: str, cert: str, key: str,
                prefix: str = "") -> None:
    """Certificate chain and private key; a bad pair stops start-up naming the keys."""
    cert_path = _file(cfg, f"{section}.{prefix}cert_file", cert)
    key_path = _file(cfg, f"{section}.{prefix}key_file", key)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{section}.{prefix}cert_file/{prefix}key_file: cannot load: "
                          f"{exc}") from exc


def _load_cas(ctx: ssl.SSLContext, cfg: Config, key: str, value: str) -> None:
    """Trusted CA bundle; a bad file stops start-up naming the key."""
    path = _file(cfg, key, value)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{key}: cannot load CA bundle: {exc}") from exc


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The SCP's context ([tls]); None when TLS is off. Client certificates are verified
    against [tls].ca_file when one is presented, and demanded with require_client_cert."""
    t = cfg.tls
    if not t.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS
    _load_chain(ctx, cfg, "[tls]", t.cert_file, t.key_file)
    if t.ca_file:
        _load_cas(ctx, cfg, "[tls].ca_file", t.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: Config) -> ssl.SSLContext | None:
    """The export SCU's context ([pacs].tls*); None when TLS to PACS is off. PACS's
    certificate and name are always checked."""
    p = cfg.pacs
    if not p.tls:
        return None
    cafile = _file(cfg, "[pacs].tls_ca_file", p.tls_ca_file) if p.tls_ca_file else None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[pacs].tls_ca_file: cannot load CA bundle: {exc}") from exc
    ctx.minimum_version = MIN_TLS
    if p.tls_cert_file:
        _load_chain(ctx, cfg, "[pacs]", p.tls_cert_file, p.tls_key_file, prefix="tls_")
    return ctx


def pacs_server_name(cfg: Config) -> str:
    """The name PACS's certificate must carry."""
    return cfg.pacs.tls_server_name or cfg.pacs.host


def describe_failure(exc: BaseException) -> str:
    """Why a handshake failed, in one line (OpenSSL's reason when it gives one)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "handshake timed out"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        verify = getattr(exc, "verify_message", None)
        return f"{reason}{': ' + verify if verify else ''}" or str(exc)
    return f"{type(exc).__name__}: {exc}"


def _peer_name(sock: ssl.SSLSocket) -> str:
    """Subject common name of the client certificate, or 'none' (device names, not PHI)."""
    cert = sock.getpeercert()
    if not cert:
        return "none"
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return "(no common name)"


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop."""

    def __init__(self, *args: Any, handshake_timeout: float = 30.0, **kwargs: Any) -> None:
        """As ThreadedAssociationServer, plus the handshake timeout in seconds."""
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept and wrap, without handshaking here (that would block every caller)."""
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Handshake (in this connection's thread), then the association as usual."""
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, address: Any) -> bool:
        """True when the handshake succeeded; a failure is logged with its reason."""
        host = address[0] if isinstance(address, tuple) else str(address)
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused TLS connection from %s: %s", host, describe_failure(exc))
            return False
        finally:
            with contextlib.suppress(OSError):  # the socket died meanwhile: nothing to restore
                sock.settimeout(previous)
        log.info("TLS %s from %s, client certificate: %s", sock.version(), host,
                 _peer_name(sock))
        return True


def start_scp(ae: AE, address: tuple[str, int], handlers: Sequence[Any],
              ssl_context: ssl.SSLContext | None, handshake_timeout: float
              ) -> ThreadedAssociationServer:
    """Start the SCP in a background thread: plain pynetdicom without TLS, the
    handshake-in-thread server with it."""
    if ssl_context is None:
        server = ae.start_server(address, block=False, evt_handlers=list(handlers))
        if server is None:  # only None when block=True
            raise RuntimeError("SCP did not start")
        return server
    tls_server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=list(handlers),
                                server_class=TlsAssociationServer,
                                handshake_timeout=handshake_timeout)
    thread = threading.Thread(target=tls_server.serve_forever, name="TlsAcceptor", daemon=True)
    thread.start()
    ae._servers.append(tls_server)  # as start_server does: shutdown() removes it from there
    return cast(ThreadedAssociationServer, tls_server)
