"""Test certificates made with the openssl command: a CA, a server and client it signed, a
rogue CA's client and a server certificate for the wrong name."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """A test CA, a server and a client certificate it signed, and a rogue client."""

    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(d: Path, name: str, ca: str, usage: str, san: str = "") -> None:
    """An EC key and a certificate for it signed by `ca`."""
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=d)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj",
             f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_pki(d: Path) -> Pki:
    """CA, server (localhost, 127.0.0.1), client, and a client from a rogue CA, in `d`."""
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _leaf(d, "client", "ca", "clientAuth")
    _leaf(d, "rogue", "rogue-ca", "clientAuth")
    _leaf(d, "wrong-name", "ca", "serverAuth", "DNS:pacs.example.org")
    return Pki(d)


def client_ctx(pki: Pki, cert: str | None = None, ca: str = "ca") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.crt(ca)))
    if cert is not None:
        ctx.load_cert_chain(str(pki.crt(cert)), str(pki.key(cert)))
    return ctx
