"""sd_notify(3) without libsystemd: tell systemd a service is ready, reloading, stopping.

Each call sends one datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract
socket written ``@name``) and returns whether it was sent. Outside systemd the
variable is unset and every call is a no-op returning False, so callers never
need to check where they run. A failed send is reported, never raised: a
service must not die because its manager stopped listening.
"""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to the service manager."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # Unset, or a vsock: address (VMs), which only systemd's own client handles.
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def ready() -> bool:
    """Startup finished (Type=notify), or a reload finished after :func:`reloading`."""
    return notify("READY=1")


def reloading() -> bool:
    """A configuration reload began; send :func:`ready` when it is done.

    ``MONOTONIC_USEC`` is required by Type=notify-reload, and lets systemd
    order this message against the reload request it sent.
    """
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    """Shutdown began: systemd shows "deactivating" instead of a hung service."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify("STATUS=" + " ".join(text.splitlines()))
