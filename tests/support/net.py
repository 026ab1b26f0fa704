"""Sockets for tests and benchmarks: free ports, waiting for a listener, C-ECHO, DCMTK's env."""

from __future__ import annotations

import os
import socket

from pynetdicom import AE

from tests.support.wait import wait_for

NODE_AE = "DSCINT"
VERIFICATION = "1.2.840.10008.1.1"


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports the OS considers free now (all bound to port 0 at once, so
    the OS cannot hand the same port out twice, then closed for the server to take)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free TCP port (see free_ports)."""
    return free_ports(1)[0]


def listening(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port now."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Block until something listens on 127.0.0.1:port (WaitTimeout, a TimeoutError, if not)."""
    wait_for(lambda: listening(port), timeout, f"a listener on port {port}")


def dcmtk_env() -> dict[str, str]:
    """DCMTK leaves Nagle on unless TCP_NODELAY=1 is set: ~45 ms per C-STORE otherwise."""
    return {**os.environ, "TCP_NODELAY": "1"}


def echo_ok(port: int, timeout: float = 5.0, called_ae: str = NODE_AE) -> bool:
    """True when the node answers C-ECHO with Success on 127.0.0.1:port."""
    ae = AE(ae_title="SOAK_PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return getattr(rsp, "Status", None) == 0
    finally:
        assoc.release()
