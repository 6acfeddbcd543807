"""What the service and the gateway share at start-up, importable without anything heavy
(the gateway does not load the service's stores to read its configuration): the tables of
the one configuration file both read, and the one line said when a port cannot be had."""

from __future__ import annotations

import errno
import socket

# Every table of the file. [gateway] is the gateway's (http_gateway/config.py checks its
# keys); the service checks the rest.
TABLES = (
    "service",
    "images",
    "rate_limits",
    "routing",
    "gateway",
    "providers",
    "catalog",
    "models",
)


def listen_error(host: str, port: int, what: str, setting: str, exc: OSError) -> str:
    """One line: which port could not be had, why, and what to change."""
    where = f"cannot listen on {host}:{port} ({what})"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: another process is already listening on port {port}; stop it, "
            f"or choose another port with {setting}"
        )
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied; choose a port above 1023 with {setting}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine; correct the host"
    reason = (exc.strerror or str(exc)).lower()
    if isinstance(exc, socket.gaierror):
        return f"{where}: {reason}; correct the host"
    return f"{where}: {reason}; check {setting}"
