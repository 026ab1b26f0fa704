"""DICOM over TLS (PS3.15 B.1): SSL contexts built from the config, and the words for a failed
handshake and a client certificate.

The SCP side's handshakes run in node.receive.listener's gate, non-blocking and under the
first-PDU timeout, never on the accept thread and never in a thread of their own: one client
that connects and never speaks TLS stalls nobody and holds no association slot.
"""

from __future__ import annotations

import socket
import ssl

from node.config import Config, ConfigError

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


def peer_name(sock: ssl.SSLSocket) -> str:
    """Subject common name of the client certificate, or 'none' (device names, not PHI)."""
    cert = sock.getpeercert()
    if not cert:
        return "none"
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return "(no common name)"
