"""Operating the gateway: reload, drain and stop, sd_notify, TLS; in process and as a process."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w
from openai.types.chat import ChatCompletionMessageParam

from cortex import config
from cortex.app import Gateway
from cortex.config import ConfigError
from cortex.sim import SimConfig, SimModel, SimNode
from tests.conftest import FleetFactory
from tests.subproc import Cortex

HELLO = [{"role": "user", "content": "hello there"}]
SDK_HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]

StartSim = Callable[..., Awaitable[SimNode]]
StartGateway = Callable[[dict[str, Any]], Awaitable[Gateway]]
Spawn = Callable[..., Awaitable[Cortex]]


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, "stream": stream}


def raw_config(nodes: Mapping[str, SimNode], **gateway: Any) -> dict[str, Any]:
    """A config file's data: a gateway on ephemeral loopback ports, fast polls."""
    return {
        "gateway": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", **gateway},
        "poll": {"interval_s": 0.2, "timeout_s": 0.5},
        "nodes": [{"name": name, "endpoint": node.url} for name, node in nodes.items()],
    }


def write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(tomli_w.dumps(raw))


async def first_data(resp: aiohttp.ClientResponse) -> str:
    """The first ``data:`` payload of an SSE response (the rest stays unread)."""
    async for line in resp.content:
        if line.startswith(b"data:"):
            return line[5:].strip().decode()
    raise AssertionError("the stream ended before its first event")


async def rest_data(resp: aiohttp.ClientResponse) -> list[str]:
    """The remaining ``data:`` payloads, until the server ends the response."""
    return [line[5:].strip().decode() async for line in resp.content if line.startswith(b"data:")]


async def model_ids(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> set[str]:
    async with http.get(url + "/v1/models", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return {m["id"] for m in (await resp.json())["data"]}


async def until_listed(
    http: aiohttp.ClientSession, url: str, model: str, headers: Mapping[str, str] | None = None
) -> set[str]:
    """Poll ``/v1/models`` until ``model`` is listed (the new node's first poll)."""
    deadline = time.monotonic() + 5.0
    while True:
        ids = await model_ids(http, url, headers)
        if model in ids:
            return ids
        assert time.monotonic() < deadline, f"{model} not listed in time: {ids}"
        await asyncio.sleep(0.05)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(autouse=True)
def _logs_reach_caplog() -> Iterator[None]:
    """caplog listens on the root logger; an earlier logs.setup() may have cut "cortex" off it."""
    logger = logging.getLogger("cortex")
    saved = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = saved


@pytest.fixture
async def sims() -> AsyncIterator[StartSim]:
    """``await sims(SimModel(...), ..., instant=True)``: a started sim node, stopped at teardown."""
    started: list[SimNode] = []

    async def start(*models: SimModel, **settings: Any) -> SimNode:
        node = SimNode(SimConfig(models=list(models), **settings))
        await node.start("127.0.0.1", 0)
        started.append(node)
        return node

    yield start
    for node in started:
        await node.stop()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "cortex.toml"


@pytest.fixture
async def from_file(sims: StartSim, config_path: Path) -> AsyncIterator[StartGateway]:
    """``await from_file(raw)``: writes ``config_path`` and starts a gateway from it."""
    started: list[Gateway] = []

    async def start(raw: dict[str, Any]) -> Gateway:
        write(config_path, raw)
        gateway = Gateway(config.load(config_path, env={}), config_path)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


def base_url(gateway: Gateway, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{gateway.port}"


# --- hot reload, in process ---------------------------------------------------------


async def test_reload_adds_a_node_facts_and_a_key_while_a_stream_runs(
    sims: StartSim, from_file: StartGateway, config_path: Path
) -> None:
    a = await sims(SimModel("m1", tok_per_s=40.0, answer_tokens=40))
    b = await sims(SimModel("m2"), instant=True)
    raw = raw_config({"a": a})
    gateway = await from_file(raw)
    url = base_url(gateway)
    key = bearer("k-new")
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream,
    ):
        assert stream.status == 200
        await first_data(stream)
        raw["nodes"].append({"name": "b", "endpoint": b.url, "pinned": ["m2"]})
        raw["models"] = [{"id": "m2", "vram_mb": 1234, "aliases": ["two"]}]
        raw["gateway"]["api_keys"] = ["k-new"]
        write(config_path, raw)

        assert gateway.reload()
        assert gateway.active == 1  # the stream goes on
        ids = await until_listed(http, url, "m2", key)
        assert {"m1", "m2", "two"} <= ids
        async with http.get(url + "/v1/models") as resp:
            assert resp.status == 401  # keys are required now
        async with http.post(url + "/v1/chat/completions", json=chat("two"), headers=key) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-cortex-node"] == "b"
        async with http.get(url + "/admin/fleet") as resp:
            nodes = {n["name"]: n for n in (await resp.json())["nodes"]}
        (m2,) = nodes["b"]["models"]
        assert (m2["id"], m2["pinned"], m2["vram_mb"]) == ("m2", True, 1234)

        events = await rest_data(stream)
    assert events[-1] == "[DONE]"


async def test_a_removed_node_finishes_its_streams(
    sims: StartSim, from_file: StartGateway, config_path: Path
) -> None:
    a = await sims(SimModel("m1", tok_per_s=40.0, answer_tokens=30))
    b = await sims(SimModel("m2"), instant=True)
    raw = raw_config({"a": a, "b": b})
    gateway = await from_file(raw)
    url = base_url(gateway)
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream,
    ):
        await first_data(stream)
        raw["nodes"] = raw["nodes"][1:]
        write(config_path, raw)
        assert gateway.reload()
        assert await model_ids(http, url) == {"m2"}
        async with http.post(url + "/v1/chat/completions", json=chat("m1")) as resp:
            assert resp.status == 404
        events = await rest_data(stream)
    assert events[-1] == "[DONE]"


async def test_an_invalid_config_is_rejected_and_the_running_one_kept(
    sims: StartSim,
    from_file: StartGateway,
    config_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await sims(SimModel("m1"), instant=True)
    raw = raw_config({"a": a}, api_keys=["k1"])
    gateway = await from_file(raw)
    url = base_url(gateway)
    write(config_path, {**raw, "gateway": {**raw["gateway"], "bogus": 1}})
    with caplog.at_level(logging.ERROR, logger="cortex"):
        assert gateway.reload() is False
    (line,) = [r.getMessage() for r in caplog.records if "reload rejected" in r.getMessage()]
    assert f"{config_path}: gateway.bogus: unknown key" in line

    async with aiohttp.ClientSession() as http:
        assert await model_ids(http, url, bearer("k1")) == {"m1"}
        bad_endpoint = {**raw, "nodes": [{"name": "a", "endpoint": "ftp://nowhere"}]}
        write(config_path, bad_endpoint)
        async with http.post(url + "/admin/reload") as resp:
            assert resp.status == 400
            message = (await resp.json())["error"]["message"]
        assert f"{config_path}: nodes[0].endpoint" in message
        assert await model_ids(http, url, bearer("k1")) == {"m1"}

        write(config_path, {**raw, "gateway": {**raw["gateway"], "api_keys": ["k2"]}})
        async with http.post(url + "/admin/reload") as resp:
            assert resp.status == 200
            assert await resp.json() == {"reloaded": True}
        assert await model_ids(http, url, bearer("k2")) == {"m1"}


async def test_the_api_keys_file_is_read_again(
    sims: StartSim,
    from_file: StartGateway,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await sims(SimModel("m1"), instant=True)
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nk1\n")
    gateway = await from_file(raw_config({"a": a}, api_keys_file=str(keys)))
    url = base_url(gateway)
    async with aiohttp.ClientSession() as http:
        assert await model_ids(http, url, bearer("k1")) == {"m1"}
        keys.write_text("k2\n")
        assert gateway.reload()
        async with http.get(url + "/v1/models", headers=bearer("k1")) as resp:
            assert resp.status == 401
        assert await model_ids(http, url, bearer("k2")) == {"m1"}

        keys.unlink()
        with caplog.at_level(logging.ERROR, logger="cortex"):
            assert gateway.reload() is False
        assert f"gateway.api_keys_file: cannot read {keys}" in caplog.text
        assert await model_ids(http, url, bearer("k2")) == {"m1"}


async def test_what_a_reload_cannot_change_is_kept_with_a_warning(
    sims: StartSim,
    from_file: StartGateway,
    config_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await sims(SimModel("m1"), instant=True)
    raw = raw_config({"a": a})
    gateway = await from_file(raw)
    running = gateway.cfg.gateway
    raw["gateway"].update(listen="127.0.0.1:1", idle_timeout_s=7.0, connect_timeout_s=9.0)
    raw["poll"]["interval_s"] = 0.3
    write(config_path, raw)
    with caplog.at_level(logging.WARNING, logger="cortex"):
        assert gateway.reload()
    warned = caplog.text
    assert "gateway.listen changed to '127.0.0.1:1': that takes a restart" in warned
    assert "gateway.connect_timeout_s changed to 9.0" in warned
    assert gateway.cfg.gateway.listen == running.listen
    assert gateway.cfg.gateway.connect_timeout_s == running.connect_timeout_s
    assert (gateway.cfg.gateway.idle_timeout_s, gateway.proxy.idle_s) == (7.0, 7.0)
    assert gateway.cfg.poll.interval_s == 0.3
    async with aiohttp.ClientSession() as http:
        assert await model_ids(http, base_url(gateway)) == {"m1"}


async def test_without_a_config_file_there_is_nothing_to_reload(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet()
    assert fleet.gateway.reload() is False
    async with aiohttp.ClientSession() as http, http.post(fleet.url + "/admin/reload") as resp:
        assert resp.status == 400
        assert "without a config file" in (await resp.json())["error"]["message"]


# --- stop and drain, in process ---------------------------------------------------


async def test_stop_lets_a_stream_finish_and_takes_no_new_requests(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet({"a": SimConfig(models=[SimModel("m1", answer_tokens=40)])})
    url = fleet.url
    async with aiohttp.ClientSession() as idle, aiohttp.ClientSession() as http:
        async with idle.get(url + "/health") as resp:  # leaves a keep-alive connection
            assert resp.status == 200
        async with http.post(url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream:
            await first_data(stream)
            stopping = asyncio.create_task(fleet.gateway.stop())
            deadline = time.monotonic() + 2.0
            while True:  # the idle connection was closed too (poll: closing takes loop turns)
                try:
                    async with idle.get(url + "/health"):
                        pass
                except aiohttp.ClientError:
                    break
                assert time.monotonic() < deadline, "stop() left the idle keep-alive open"
                await asyncio.sleep(0.02)
            events = await rest_data(stream)
            finished = time.monotonic()
        assert events[-1] == "[DONE]"
        await asyncio.wait_for(stopping, 5.0)
    assert time.monotonic() - finished < 3.0


async def test_stop_with_nothing_in_flight_is_prompt(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    async with aiohttp.ClientSession() as http:
        async with http.post(fleet.url + "/v1/chat/completions", json=chat("m1")) as resp:
            assert resp.status == 200
        started = time.monotonic()
        await fleet.gateway.stop()
    assert time.monotonic() - started < 3.0
    assert fleet.gateway.active == 0


async def test_streams_are_cut_when_the_drain_time_is_over(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {"a": SimConfig(models=[SimModel("m1", tok_per_s=20.0, answer_tokens=400)])},
        gateway={"drain_timeout_s": 0.2},
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(fleet.url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream,
    ):
        await first_data(stream)
        started = time.monotonic()
        stopping = asyncio.create_task(fleet.gateway.stop())
        with pytest.raises(aiohttp.ClientPayloadError):
            await rest_data(stream)
        await asyncio.wait_for(stopping, 3.0)
    assert time.monotonic() - started < 2.0
    await fleet.wait_for(lambda: fleet.nodes["a"].running_sequences == 0)


async def test_cut_ends_a_long_drain(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {"a": SimConfig(models=[SimModel("m1", tok_per_s=20.0, answer_tokens=400)])},
        gateway={"drain_timeout_s": 30.0},
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(fleet.url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream,
    ):
        await first_data(stream)
        stopping = asyncio.create_task(fleet.gateway.stop())
        await asyncio.sleep(0.1)
        fleet.gateway.cut()
        with pytest.raises(aiohttp.ClientPayloadError):
            await rest_data(stream)
        await asyncio.wait_for(stopping, 3.0)


# --- as a process: SIGHUP, SIGTERM, sd_notify ------------------------------------------


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn("serve", "--config", F, env={...})``; killed and reaped at teardown."""
    procs: list[Cortex] = []

    async def start(*args: str, env: Mapping[str, str] | None = None) -> Cortex:
        proc = await Cortex.spawn(*args, env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        await proc.close()


async def test_sighup_reloads_a_running_process(
    sims: StartSim, spawn: Spawn, config_path: Path
) -> None:
    a = await sims(SimModel("m1"), instant=True)
    b = await sims(SimModel("m2"), instant=True)
    raw = raw_config({"a": a})
    write(config_path, raw)
    cortex = await spawn("serve", "--config", str(config_path))
    url = await cortex.url()
    async with aiohttp.ClientSession() as http:
        assert await model_ids(http, url) == {"m1"}

        raw["nodes"].append({"name": "b", "endpoint": b.url})
        write(config_path, raw)
        cortex.send(signal.SIGHUP)
        await cortex.expect(r"config reloaded from .*: nodes \+b;")
        assert await until_listed(http, url, "m2") == {"m1", "m2"}

        write(config_path, {**raw, "surprise": {}})
        cortex.send(signal.SIGHUP)
        line = (await cortex.expect("config reload rejected")).string
        assert f"{config_path}: surprise: unknown key" in line
        assert await model_ids(http, url) == {"m1", "m2"}
    cortex.send(signal.SIGTERM)
    assert await cortex.exit_code(5.0) == 0


async def test_sigterm_lets_streams_finish_then_exits(
    sims: StartSim, spawn: Spawn, config_path: Path
) -> None:
    a = await sims(SimModel("m1", tok_per_s=30.0, answer_tokens=40))
    write(config_path, raw_config({"a": a}))
    cortex = await spawn("serve", "--config", str(config_path))
    url = await cortex.url()
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream:
            await first_data(stream)
            cortex.send(signal.SIGTERM)
            await cortex.expect(r"draining 1 in-flight request")
            async with aiohttp.ClientSession() as other:
                with pytest.raises(aiohttp.ClientConnectorError):
                    await other.get(url + "/health")
            events = await rest_data(stream)
        assert events[-1] == "[DONE]"
    finished = time.monotonic()
    assert await cortex.exit_code(5.0) == 0
    assert time.monotonic() - finished < 3.0
    assert "cortex stopped" in cortex.output


async def test_sigterm_cuts_streams_after_the_drain_timeout(
    sims: StartSim, spawn: Spawn, config_path: Path
) -> None:
    a = await sims(SimModel("m1", tok_per_s=20.0, answer_tokens=400))
    write(config_path, raw_config({"a": a}, drain_timeout_s=0.3))
    cortex = await spawn("serve", "--config", str(config_path))
    url = await cortex.url()
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json=chat("m1", stream=True)) as stream,
    ):
        await first_data(stream)
        signalled = time.monotonic()
        cortex.send(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await rest_data(stream)
    assert await cortex.exit_code(5.0) == 0
    assert time.monotonic() - signalled < 4.0
    assert "cutting 1 request(s)" in cortex.output


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and its $NOTIFY_SOCKET value."""
    name = f"cortex-test-ops-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield sock, "@" + name


async def next_state(sock: socket.socket, within: float = 10.0) -> str:
    """The next sd_notify message that is not a STATUS= line."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        while True:
            message = (await loop.sock_recv(sock, 4096)).decode()
            if not message.startswith("STATUS="):
                return message


async def test_systemd_hears_ready_reloading_and_stopping(
    sims: StartSim,
    spawn: Spawn,
    config_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, address = notify_socket
    a = await sims(SimModel("m1"), instant=True)
    write(config_path, raw_config({"a": a}))
    cortex = await spawn("serve", "--config", str(config_path), env={"NOTIFY_SOCKET": address})

    assert await next_state(sock) == "READY=1"
    url = await cortex.url()  # logged before READY=1
    async with aiohttp.ClientSession() as http, http.get(url + "/health") as resp:
        assert resp.status == 200

    before = time.monotonic_ns() // 1000
    cortex.send(signal.SIGHUP)
    reloading, stamp = (await next_state(sock)).split("\n")
    assert reloading == "RELOADING=1"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= time.monotonic_ns() // 1000
    assert await next_state(sock) == "READY=1"

    cortex.send(signal.SIGTERM)
    assert await next_state(sock) == "STOPPING=1"
    assert await cortex.exit_code(5.0) == 0


# --- TLS -------------------------------------------------------------------------------

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def self_signed(directory: Path, name: str = "cortex") -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key (EC: quick to make)."""
    assert OPENSSL is not None
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *(OPENSSL, "req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={name}"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@needs_openssl
async def test_https_with_the_openai_sdk(tmp_path: Path, make_fleet: FleetFactory) -> None:
    cert, key = self_signed(tmp_path)
    fleet = await make_fleet(
        {"a": SimConfig(models=[SimModel("m1")], instant=True)},
        gateway={"tls_cert": str(cert), "tls_key": str(key)},
    )
    trust = ssl.create_default_context(cafile=str(cert))
    client = openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{fleet.gateway.port}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=trust),
    )
    async with client:
        whole = await client.chat.completions.create(model="m1", messages=SDK_HELLO)
        stream = await client.chat.completions.create(model="m1", messages=SDK_HELLO, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert whole.choices[0].message.content
    assert "".join(pieces) == whole.choices[0].message.content

    tls12 = ssl.create_default_context(cafile=str(cert))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    _, writer = await asyncio.open_connection("127.0.0.1", fleet.gateway.port, ssl=tls12)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.close()
    await writer.wait_closed()


@needs_openssl
async def test_a_reload_takes_a_renewed_certificate(
    sims: StartSim, from_file: StartGateway, config_path: Path, tmp_path: Path
) -> None:
    a = await sims(SimModel("m1"), instant=True)
    old_cert, old_key = self_signed(tmp_path, "old")
    new_cert, new_key = self_signed(tmp_path, "new")
    raw = raw_config({"a": a}, tls_cert=str(old_cert), tls_key=str(old_key))
    gateway = await from_file(raw)

    async def served() -> bytes:
        pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", gateway.port))
        return ssl.PEM_cert_to_DER_cert(pem)

    assert await served() == ssl.PEM_cert_to_DER_cert(old_cert.read_text())
    raw["gateway"].update(tls_cert=str(new_cert), tls_key=str(new_key))
    write(config_path, raw)
    assert gateway.reload()
    assert await served() == ssl.PEM_cert_to_DER_cert(new_cert.read_text())

    raw["gateway"]["tls_key"] = str(old_key)  # not the new certificate's key
    write(config_path, raw)
    assert gateway.reload() is False
    assert await served() == ssl.PEM_cert_to_DER_cert(new_cert.read_text())


@needs_openssl
async def test_unusable_tls_files_stop_the_start_naming_the_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = {
        "gateway.tls_cert: cannot read": {"tls_cert": str(tmp_path / "missing.crt")},
        "gateway.tls_key: cannot read": {"tls_key": str(tmp_path / "missing.key")},
        "gateway.tls_cert / gateway.tls_key: not a PEM": {"tls_cert": str(garbage)},
    }
    for expected, override in cases.items():
        gw = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}
        gw.update({"tls_cert": str(cert), "tls_key": str(key), **override})
        gateway = Gateway(config.decode({"gateway": gw}, "test.toml"), Path("test.toml"))
        with pytest.raises(ConfigError, match=f"^test.toml: {expected}"):
            await gateway.start()


async def test_a_port_in_use_is_a_config_error_naming_the_key(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    taken = f"127.0.0.1:{fleet.gateway.port}"
    cfg = config.decode(
        {"gateway": {"listen": taken, "metrics_listen": "127.0.0.1:0"}}, "test.toml"
    )
    with pytest.raises(ConfigError, match=rf"^<config>: gateway.listen = '{taken}': cannot listen"):
        await Gateway(cfg).start()
