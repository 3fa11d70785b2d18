"""``cortex agent`` against a fake ``systemctl``, a fake ``nvidia-smi`` and a tiny node.

The fakes are shell scripts written into tmp_path; the real tools never run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from cortex import agent, config

TOKEN = "s3cret-agent-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TWO_GPUS = """\
0, NVIDIA GeForce RTX 4090, 20512, 24564, 87
1, NVIDIA GeForce RTX 4090, 301, 24564, 0
"""


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _systemctl(tmp_path: Path, tail: str = "exit 0") -> str:
    """A fake systemctl that writes its arguments, one a line, to tmp_path/argv."""
    return _script(tmp_path / "systemctl", f"printf '%s\\n' \"$@\" > '{tmp_path}/argv'\n{tail}\n")


def _argv(tmp_path: Path) -> list[str]:
    return (tmp_path / "argv").read_text().splitlines()


async def _appears(path: Path) -> None:
    exists = path.exists
    for _ in range(500):
        if exists():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{path} never appeared")


async def _node(aiohttp_server: AiohttpServer, statuses: list[int]) -> str:
    """A node whose /health answers ``statuses`` in turn, then repeats the last one."""
    calls = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=statuses[min(calls, len(statuses)) - 1])

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    return str(server.make_url(""))


async def _agent(
    aiohttp_client: AiohttpClient, tmp_path: Path, node_url: str = "http://127.0.0.1:9", **kw: str
) -> TestClient[web.Request, web.Application]:
    timeout = float(kw.pop("timeout", "5"))
    cfg = config.Agent(token=TOKEN, node_url=node_url, restart_timeout_s=timeout)
    if "systemctl" not in kw:
        kw["systemctl"] = _systemctl(tmp_path)
    kw.setdefault("nvidia_smi", str(tmp_path / "no-nvidia-smi"))
    return await aiohttp_client(agent.build_app(cfg, **kw))


# --- auth -----------------------------------------------------------------------


async def test_health_needs_no_token(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client = await _agent(aiohttp_client, tmp_path)
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "longer"],
)
@pytest.mark.parametrize(("method", "path"), [("GET", "/gpu"), ("POST", "/restart")])
async def test_routes_need_the_token(
    aiohttp_client: AiohttpClient, tmp_path: Path, headers: dict[str, str], method: str, path: str
) -> None:
    client = await _agent(aiohttp_client, tmp_path)
    resp = await client.request(method, path, headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert "agent.token" in (await resp.json())["error"]
    assert not (tmp_path / "argv").exists()


def test_empty_token_refused_unless_loopback() -> None:
    with pytest.raises(config.ConfigError, match=r"agent\.token is empty.*refusing to start"):
        agent.build_app(config.Agent(token="", listen="0.0.0.0:9200"))
    for listen in ("127.0.0.1:9200", "[::1]:9200", "localhost:9200"):
        assert agent.build_app(config.Agent(token="", listen=listen))


def test_bad_settings_are_named() -> None:
    bad = config.Agent(token="t", unit="--force", restart_timeout_s=0)
    assert [p.split(":")[0] for p in agent.problems(bad)] == [
        "agent.unit",
        "agent.restart_timeout_s",
    ]
    assert agent.problems(config.Agent(token="t", listen="9200")) == [
        "agent.listen: '9200' is not HOST:PORT"
    ]


async def test_open_on_loopback_without_token(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    cfg = config.Agent(token="", listen="127.0.0.1:9200")
    client = await aiohttp_client(agent.build_app(cfg, nvidia_smi=str(tmp_path / "none")))
    assert (await client.get("/gpu")).status == 200


# --- /gpu -----------------------------------------------------------------------


async def test_gpu_reports_each_gpu(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    smi = _script(
        tmp_path / "nvidia-smi",
        f"printf '%s\\n' \"$@\" > '{tmp_path}/smi-argv'\ncat <<EOF\n{TWO_GPUS}EOF\n",
    )
    client = await _agent(aiohttp_client, tmp_path, nvidia_smi=smi)
    resp = await client.get("/gpu", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {
        "available": True,
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA GeForce RTX 4090",
                "memory_used_mb": 20512,
                "memory_total_mb": 24564,
                "utilization_pct": 87,
            },
            {
                "index": 1,
                "name": "NVIDIA GeForce RTX 4090",
                "memory_used_mb": 301,
                "memory_total_mb": 24564,
                "utilization_pct": 0,
            },
        ],
    }
    assert (tmp_path / "smi-argv").read_text().splitlines() == list(agent.GPU_QUERY)


def test_parse_gpus_odd_fields() -> None:
    text = "0, Tesla, T4 (rev, b), 10, 15360, [N/A]\n\n3, A100, [Not Supported], 81920, 5\n"
    assert agent.parse_gpus(text) == [
        agent.Gpu(0, "Tesla, T4 (rev, b)", 10, 15360, None),
        agent.Gpu(3, "A100", None, 81920, 5),
    ]
    with pytest.raises(ValueError, match="expected 5 fields"):
        agent.parse_gpus("0, A100, 1\n")


async def test_gpu_unavailable_without_nvidia_smi(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    client = await _agent(aiohttp_client, tmp_path, nvidia_smi="nvidia-smi")
    resp = await client.get("/gpu", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"available": False, "reason": "nvidia-smi not found"}


async def test_gpu_unavailable_when_nvidia_smi_fails(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    smi = _script(
        tmp_path / "nvidia-smi", "echo 'NVML: Driver/library version mismatch' >&2\nexit 18\n"
    )
    client = await _agent(aiohttp_client, tmp_path, nvidia_smi=smi)
    resp = await client.get("/gpu", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {
        "available": False,
        "reason": "NVML: Driver/library version mismatch",
    }


# --- /restart -------------------------------------------------------------------


async def test_restart_waits_for_health(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node_url = await _node(aiohttp_server, [503, 200])
    # The default program names, found first on PATH.
    _systemctl(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = config.Agent(token=TOKEN, node_url=node_url, unit="mistralrs.service")
    client = await aiohttp_client(agent.build_app(cfg))
    resp = await client.post("/restart", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body["unit"] == "mistralrs.service"
    assert body["restarted"] is True
    # One 503, then a poll interval, then the 200.
    assert agent._HEALTH_POLL_S <= body["seconds"] < 5
    assert _argv(tmp_path) == ["--no-ask-password", "restart", "mistralrs.service"]


async def test_restart_reports_systemctl_failure(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    systemctl = _systemctl(
        tmp_path, "echo 'Failed to restart mistralrs.service: Unit not found.' >&2\nexit 1"
    )
    client = await _agent(aiohttp_client, tmp_path, systemctl=systemctl)
    resp = await client.post("/restart", headers=AUTH)
    assert resp.status == 500
    assert await resp.json() == {
        "unit": "mistralrs.service",
        "restarted": False,
        "error": "systemctl restart mistralrs.service exited with 1",
        "stderr": "Failed to restart mistralrs.service: Unit not found.",
    }


async def test_restart_times_out_when_node_stays_unhealthy(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    node_url = await _node(aiohttp_server, [503])
    client = await _agent(aiohttp_client, tmp_path, node_url, timeout="0.4")
    resp = await client.post("/restart", headers=AUTH)
    assert resp.status == 504
    body = await resp.json()
    assert body["restarted"] is False
    assert body["error"] == f"{node_url.rstrip('/')}/health did not answer 200 within 0.4 s"
    assert 0.4 <= body["seconds"] < 2
    assert _argv(tmp_path)[-1] == "mistralrs.service"


async def test_restart_times_out_in_a_hung_systemctl(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    systemctl = _systemctl(tmp_path, "exec sleep 30")
    client = await _agent(aiohttp_client, tmp_path, systemctl=systemctl, timeout="0.3")
    started = time.monotonic()
    resp = await client.post("/restart", headers=AUTH)
    assert resp.status == 504
    assert (await resp.json())["error"] == (
        "systemctl restart mistralrs.service did not finish within 0.3 s"
    )
    assert time.monotonic() - started < 5


async def test_second_concurrent_restart_is_refused(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    node_url = await _node(aiohttp_server, [200])
    systemctl = _systemctl(tmp_path, "sleep 0.3")
    client = await _agent(aiohttp_client, tmp_path, node_url, systemctl=systemctl)
    first = asyncio.create_task(client.post("/restart", headers=AUTH))
    await _appears(tmp_path / "argv")
    second = await client.post("/restart", headers=AUTH)
    assert second.status == 409
    assert (await second.json())["error"] == "a restart is already in progress"
    assert (await first).status == 200
    # And once the first is done, the next is welcome again.
    assert (await client.post("/restart", headers=AUTH)).status == 200


# --- serve ----------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


async def test_serve_notifies_and_stops_on_sigterm(notify_socket: socket.socket) -> None:
    serving = asyncio.create_task(agent.serve(config.Agent(token=TOKEN, listen="127.0.0.1:0")))

    async def message() -> bytes:
        recv = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(notify_socket, 4096))
        await asyncio.wait([recv, serving], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        if not recv.done():
            recv.cancel()
            serving.result()  # raises what made serve() stop early
            pytest.fail("no notify message within 5 s")
        return recv.result()

    status = await message()
    assert await message() == b"READY=1"
    url = status.decode().removeprefix("STATUS=listening on ").split(",")[0]
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
        assert resp.status == 200
    # READY=1 comes after the signal handlers are in place, so this cannot stop pytest.
    os.kill(os.getpid(), signal.SIGTERM)
    assert await message() == b"STOPPING=1"
    await asyncio.wait_for(serving, 5)
