from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cortex import notify


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify.sock")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"cortex-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with _receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.notify("READY=1") is False


def test_unsupported_address_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


def test_nobody_listening_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.ready() is False


def test_ready_to_a_path_socket(path_socket: socket.socket) -> None:
    assert notify.ready() is True
    assert path_socket.recv(4096) == b"READY=1"


def test_ready_to_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert notify.ready() is True
    assert abstract_socket.recv(4096) == b"READY=1"


def test_stopping_and_status(path_socket: socket.socket) -> None:
    assert notify.stopping()
    assert path_socket.recv(4096) == b"STOPPING=1"
    assert notify.status("draining\n3 streams left")
    assert path_socket.recv(4096) == b"STATUS=draining 3 streams left"


def test_reloading_carries_the_monotonic_clock(abstract_socket: socket.socket) -> None:
    before = time.monotonic_ns() // 1000
    assert notify.reloading()
    after = time.monotonic_ns() // 1000
    lines = abstract_socket.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
