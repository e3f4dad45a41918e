"""Fleet addresses: loopback only, checked before anything heavy is imported."""

from __future__ import annotations

from edgeplug.errors import EdgeplugError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback(address: str) -> str:
    """`address` if it is HOST:PORT on this machine; anything else is an error naming the way out."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") not in LOOPBACK_HOSTS or not port.isdigit():
        raise EdgeplugError(f"--address {address}: edgeplug's fleet commands serve loopback only (127.0.0.1:PORT); "
                            "a networked fleet needs TLS and authentication: run Flower's SuperLink/SuperNode")
    return address
