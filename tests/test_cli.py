"""The ``cortex`` command: help, config check/show, status, serve errors; sim and demo as processes."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import click
import orjson
import pytest
import tomli_w
from click.testing import CliRunner, Result

from cortex import __version__, config, logs
from cortex.cli import main
from tests.conftest import FleetFactory
from tests.subproc import Cortex

Spawn = Callable[..., Awaitable[Cortex]]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` runs logs.setup(), bound to the runner's stderr: undo it for later tests."""
    logger = logging.getLogger("cortex")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    fast_path = logs._handler  # access lines skip `logging` when it is set
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
    logs._handler = fast_path


def cortex(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def commands(
    cmd: click.Command = main, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from commands(sub, (*path, name))


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("path", "cmd"), [pytest.param(p, c, id=" ".join(("cortex", *p))) for p, c in commands()]
)
def test_help_is_complete(path: tuple[str, ...], cmd: click.Command) -> None:
    result = cortex(*path, "--help")
    assert result.exit_code == 0, result.output
    text = _words(result.output)
    assert cmd.help, f"cortex {' '.join(path)} has no description"
    assert _words(cmd.help.split("\n\n")[0]) in text
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"cortex {' '.join(path)} {param.opts[0]} has no help"
            assert all(opt in text for opt in param.opts)
    if isinstance(cmd, click.Group):
        assert all(name in text for name in cmd.commands)


def test_version() -> None:
    result = cortex("--version")
    assert result.exit_code == 0
    assert result.output == f"cortex, version {__version__}\n"


# --- config check / show ----------------------------------------------------------------

CONFIG: dict[str, Any] = {
    "gateway": {"listen": "127.0.0.1:8000", "api_keys": ["k1"]},
    "nodes": [{"name": "gpu-a", "endpoint": "http://10.0.0.5:8080", "vram_mb": 24576}],
    "models": [{"id": "org/m", "vram_mb": 8000, "aliases": ["m"]}],
    "model_map": {"gpt-*": "org/m"},
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(tomli_w.dumps(CONFIG))
    return path


def test_config_check_ok(config_file: Path) -> None:
    result = cortex("config", "check", "--config", str(config_file))
    assert result.exit_code == 0, result.output
    assert result.stdout == "config OK: 1 node(s) (gpu-a), 1 model fact(s)\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nodes": [{"name": "gpu-a", "endpoint": "http://x:1", "bogus": 1}]}, "nodes[0].bogus"),
        ({"gateway": {"listen": "8000"}}, "gateway.listen: '8000' is not HOST:PORT"),
        ({"poll": {"interval_s": 0}}, "poll.interval_s: must be > 0"),
    ],
)
def test_config_check_names_file_and_key(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps({**CONFIG, **change}))
    result = cortex("config", "check", "--config", str(path))
    assert result.exit_code == 1
    assert f"Error: {path}: {message}" in result.stderr


@pytest.mark.parametrize("key", ["api_keys_file", "tls_cert"])
def test_config_check_reads_the_files_the_config_names(tmp_path: Path, key: str) -> None:
    path = tmp_path / "files.toml"
    missing = tmp_path / "missing"
    files = (
        {key: str(missing), "tls_key": str(missing)} if key == "tls_cert" else {key: str(missing)}
    )
    path.write_text(tomli_w.dumps({**CONFIG, "gateway": {**CONFIG["gateway"], **files}}))
    result = cortex("config", "check", "--config", str(path))
    assert result.exit_code == 1
    assert f"Error: {path}: gateway.{key}: cannot read {missing}" in result.stderr


def test_config_check_of_a_missing_file(tmp_path: Path) -> None:
    result = cortex("config", "check", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1
    assert "nope.toml: no such config file" in result.stderr


def test_config_show_round_trips_and_shows_the_environment(config_file: Path) -> None:
    env = {"CORTEX_GATEWAY__LISTEN": "127.0.0.1:8001", "CORTEX_NODES__0__VRAM_MB": "12288"}
    result = cortex("config", "show", "--config", str(config_file), env=env)
    assert result.exit_code == 0, result.output
    shown = config.decode(tomllib.loads(result.stdout), "<shown>")
    assert shown == config.load(config_file, env=env)
    assert shown.gateway.listen == "127.0.0.1:8001"
    assert shown.nodes[0].vram_mb == 12288
    assert shown.gateway.drain_timeout_s == 30.0  # defaults are shown too
    assert config.dump(shown) == result.stdout


# --- serve: errors before it runs ------------------------------------------------------


def test_serve_with_a_missing_tls_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "tls.toml"
    gateway = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}
    gateway.update(tls_cert=str(tmp_path / "none.crt"), tls_key=str(tmp_path / "none.key"))
    path.write_text(tomli_w.dumps({"gateway": gateway}))
    result = cortex("serve", "--config", str(path))
    assert result.exit_code == 1, result.output
    assert f"Error: {path}: gateway.tls_cert: cannot read" in result.stderr


def test_serve_on_a_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = tmp_path / "busy.toml"
        gateway = {"listen": f"127.0.0.1:{port}", "metrics_listen": "127.0.0.1:0"}
        path.write_text(tomli_w.dumps({"gateway": gateway}))
        result = cortex("serve", "--config", str(path))
    assert result.exit_code == 1, result.output
    assert f"gateway.listen = '127.0.0.1:{port}': cannot listen" in result.stderr


# --- status ----------------------------------------------------------------------------


async def status(*args: str) -> Result:
    """``cortex status`` in a thread: its HTTP call is blocking, the gateway runs on this loop."""
    return await asyncio.to_thread(cortex, "--log-level", "error", "status", *args)


async def test_status_prints_the_fleet(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(gateway={"admin_key": "s3cret"})
    table = await status("--url", fleet.url, "--admin-key", "s3cret")
    assert table.exit_code == 0, table.output
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:2] == ["NODE", "STATE"]
    assert row.split()[:2] == ["node-a", "up"]
    assert "m1" in table.stdout

    raw = await status("--url", fleet.url, "--admin-key", "s3cret", "--json")
    assert raw.exit_code == 0, raw.output
    (node,) = orjson.loads(raw.stdout)["nodes"]
    assert (node["name"], [m["id"] for m in node["models"]]) == ("node-a", ["m1"])

    denied = await status("--url", fleet.url)
    assert denied.exit_code == 1
    assert f"Error: {fleet.url}: HTTP 401" in denied.stderr


async def test_status_without_a_gateway_exits_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = await status("--url", url)
    assert result.exit_code == 1
    assert f"Error: cannot reach the gateway at {url}" in result.stderr


# --- sim and demo, as processes -------------------------------------------------------


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    procs: list[Cortex] = []

    async def start(*args: str) -> Cortex:
        proc = await Cortex.spawn(*args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        await proc.close()


async def listed(url: str) -> set[str]:
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/models") as resp:
        assert resp.status == 200
        return {m["id"] for m in (await resp.json())["data"]}


async def test_sim_answers_models(spawn: Spawn) -> None:
    sim = await spawn("sim", "--port", "0", "--model", "org/small:2000:0.1:500")
    url = (await sim.expect(r"listening on (http://\S+)")).group(1)
    assert await listed(url) == {"default", "org/small"}
    sim.send(signal.SIGTERM)
    assert await sim.exit_code(5.0) == 0


async def test_demo_runs_and_stops_on_ctrl_c(spawn: Spawn) -> None:
    demo = await spawn("demo", "--port", "0", "--metrics-port", "0", "--node-port-base", "0")
    url = (await demo.expect(r"behind a gateway at (http://\S+)")).group(1)
    await demo.expect(r"nodes: gpu-large :\d+, gpu-medium :\d+, gpu-small :\d+")
    ids = await listed(url)
    loaded = {"large-model", "coder", "medium-model", "chat-small", "embedding-model", "tiny"}
    assert {f"your-org/{m}" for m in loaded} | {"coder", "tiny"} <= ids
    demo.send(signal.SIGINT)
    assert await demo.exit_code(5.0) == 0
    assert "Traceback" not in demo.output
