"""Who may use the gateway, and what leaks where: API keys, the admin guard, the metrics
port, credentials on the way to nodes, and the warning for an open listener."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner

from cortex import config, logs
from tests.conftest import Fleet, FleetFactory

GOOD = "sk-good-7f3a91c2e5d8b4"
OTHER = "sk-other-0b1c2d3e4f5a6b"
WRONG = "sk-wrong-d00dfeedbeef42"
ADMIN = "adm-5e6f7a8b9c0d1e2f"
NODE_KEY = "node-key-9a8b7c6d5e4f"
JSON = {"content-type": "application/json"}
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "m1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
# Every /v1 route: (method, path, body, dialect).
V1_ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/v1/models", None, "openai"),
    ("GET", "/v1/models/m1", None, "openai"),
    ("POST", "/v1/chat/completions", CHAT, "openai"),
    ("POST", "/v1/completions", {"model": "m1", "prompt": "hi", "max_tokens": 4}, "openai"),
    ("POST", "/v1/embeddings", {"model": "m1", "input": "hi"}, "openai"),
    ("POST", "/v1/responses", {"model": "m1", "input": "hi"}, "openai"),
    ("POST", "/v1/messages", MESSAGES, "anthropic"),
    ("POST", "/v1/messages?beta=true", MESSAGES, "anthropic"),
    ("POST", "/v1/messages/count_tokens", MESSAGES, "anthropic"),
]


def assert_unauthorized(status: int, body: dict[str, Any], dialect: str) -> None:
    assert status == 401
    if dialect == "anthropic":
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        assert set(body["error"]) == {"type", "message"}
    else:
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def call(
    s: aiohttp.ClientSession,
    url: str,
    method: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> tuple[int, dict[str, Any]]:
    data = orjson.dumps(body) if body is not None else None
    if data is not None:
        headers = {"content-type": "application/json", **headers}
    async with s.request(method, url, data=data, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


# --- API keys --------------------------------------------------------------------------


async def test_every_v1_route_needs_a_key_and_answers_401_in_its_dialect(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(gateway={"api_keys": [GOOD, OTHER]})
    node = fleet.nodes["node-a"]
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": f"Bearer {WRONG}"},
        {"x-api-key": WRONG},
        {"Authorization": f"Basic {GOOD}"},  # the right key, the wrong scheme
        {"Authorization": GOOD},
        {"Authorization": f"Bearer {GOOD[:-1]}"},  # a prefix of a key
        {"Authorization": f"Bearer {GOOD}x"},
        {"x-api-key": WRONG, "Authorization": f"Bearer {GOOD}"},  # x-api-key wins
        {"Authorization": "Bearer "},
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, body, dialect in V1_ROUTES:
            for headers in bad_headers:
                status, answer = await call(s, fleet.url + path, method, body, headers)
                assert_unauthorized(status, answer, dialect)
        inference = {
            k: v for k, v in node.counters.items() if k.startswith("/v1/") and k != "/v1/models"
        }
        assert inference == {}, "a request without a valid key reached a node"
        for method, path, body, _ in V1_ROUTES:
            for headers in (
                {"Authorization": f"Bearer {GOOD}"},
                {"Authorization": f"bearer {OTHER}"},
                {"x-api-key": GOOD},
            ):
                status, _answer = await call(s, fleet.url + path, method, body, headers)
                assert status == 200, (path, headers)
        for path in ("/health", "/ready"):
            async with s.get(fleet.url + path) as r:
                assert r.status == 200


async def test_the_keys_file_is_read_at_start_and_again_on_reload(
    make_fleet: FleetFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# clients\n{GOOD}\n\n  {OTHER}  \n")
    fleet = await make_fleet(gateway={"api_keys_file": str(keys)})
    cfg_file = tmp_path / "cortex.toml"
    cfg_file.write_text(config.dump(fleet.gateway.cfg))
    fleet.gateway.config_path = cfg_file

    async def status(key: str) -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.get(fleet.url + "/v1/models", headers={"x-api-key": key}) as r,
        ):
            return r.status

    assert (await status(GOOD), await status(OTHER), await status(WRONG)) == (200, 200, 401)
    assert await status("# clients") == 401
    keys.write_text(f"{WRONG}\n")
    assert fleet.gateway.reload()
    assert (await status(GOOD), await status(OTHER), await status(WRONG)) == (401, 401, 200)
    keys.unlink()  # a reload that cannot read the file keeps the keys it had
    assert not fleet.gateway.reload()
    assert (await status(GOOD), await status(WRONG)) == (401, 200)
    keys.write_text("")  # an empty file on a loopback listener: the gateway is open again
    assert fleet.gateway.reload()
    assert await status("") == 200


class _Capture(logging.Handler):
    """Every record of every logger, formatted both ways cortex can write them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.formatters = (logs.TextFormatter(), logs.JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += [f.format(record) for f in self.formatters]
        self.lines.append(repr(record.__dict__))


@pytest.fixture
def captured() -> Iterator[_Capture]:
    handler = _Capture()
    loggers = [logging.getLogger(), logging.getLogger("cortex"), logging.getLogger("aiohttp")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    logging.getLogger("cortex").propagate = False  # one copy per record is enough
    try:
        yield handler
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


async def test_keys_never_reach_the_logs_or_the_metrics(
    make_fleet: FleetFactory, captured: _Capture
) -> None:
    fleet = await make_fleet(gateway={"api_keys": [GOOD], "admin_key": ADMIN})
    async with aiohttp.ClientSession() as s:
        for key in (WRONG, GOOD):
            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                headers["Cookie"] = f"session={key}"
                for path, body in (
                    ("/v1/chat/completions", CHAT),
                    ("/v1/chat/completions", {**CHAT, "stream": True}),
                    ("/v1/chat/completions", {**CHAT, "model": "nope"}),
                    ("/v1/messages", {**MESSAGES, "stream": True}),
                ):
                    async with s.post(
                        fleet.url + path,
                        data=orjson.dumps(body),
                        headers={"content-type": "application/json", **headers},
                    ) as r:
                        await r.read()
                        assert r.status in (200, 401, 404)
            async with s.get(
                fleet.url + "/admin/fleet", headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert r.status == 401
            # an oversized header holding the key: aiohttp's parse error quotes the line
            long = {"Authorization": f"Bearer {key}" + "x" * 9000, **JSON}
            async with s.post(fleet.url + "/v1/chat/completions", headers=long) as r:
                assert r.status == 400
        async with s.get(
            fleet.url + "/admin/fleet", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as r:
            assert r.status == 200
            assert ADMIN not in await r.text()
            assert GOOD not in await r.text()
        async with s.get(fleet.metrics_url + "/metrics") as r:
            scrape = await r.text()
    assert "cortex_requests_total" in scrape
    access = [line for line in captured.lines if "cortex.access" in line]
    assert len(access) >= 3 * 8  # the successful requests were logged...
    text = "\n".join(captured.lines)
    for secret in (GOOD, WRONG, ADMIN):
        assert secret not in text  # ...but no key, in any form
        assert secret not in scrape


# --- the admin API ---------------------------------------------------------------------


async def test_admin_routes_need_the_admin_key_when_one_is_set(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(gateway={"api_keys": [GOOD], "admin_key": ADMIN})
    async with aiohttp.ClientSession() as s:
        for headers in (
            {},
            {"Authorization": f"Bearer {GOOD}"},  # an API key is not an admin key
            {"Authorization": f"Bearer {WRONG}"},
            {"Authorization": f"Basic {ADMIN}"},
        ):
            for method, path in (("GET", "/admin/fleet"), ("POST", "/admin/reload")):
                async with s.request(method, fleet.url + path, headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    assert (await r.json())["error"]["type"] == "authentication_error"
        for headers in ({"Authorization": f"Bearer {ADMIN}"}, {"x-api-key": ADMIN}):
            async with s.get(fleet.url + "/admin/fleet", headers=headers) as r:
                assert r.status == 200
                assert [n["name"] for n in (await r.json())["nodes"]] == ["node-a"]
        # the admin key is not an API key either
        async with s.get(
            fleet.url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as r:
            assert r.status == 401


class _Transport(asyncio.Transport):
    """A connection from ``peer`` that keeps what the gateway writes to it."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.sent = b""
        self.answered = asyncio.Event()  # a whole answer (head and body: one write) came
        self.closed = asyncio.Event()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)
        self.answered.set()

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def close(self) -> None:
        self.closed.set()

    abort = close


async def _answer_from(fleet: Fleet, peer: str, request: bytes) -> tuple[int, bytes]:
    """Status and body of the gateway's answer to ``request``, sent from ``peer``."""
    server = fleet.gateway._server
    assert server is not None
    transport = _Transport((peer, 40000))
    conn = server()
    conn.connection_made(transport)
    conn.data_received(request)
    async with asyncio.timeout(5):
        await transport.answered.wait()
    conn.connection_lost(None)
    head, _, body = transport.sent.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.1.2.3", False),
        ("192.168.0.7", False),
        ("2001:db8::1", False),
        ("::ffff:10.1.2.3", False),
    ],
)
async def test_without_an_admin_key_only_loopback_clients_reach_the_admin_api(
    make_fleet: FleetFactory, peer: str, allowed: bool
) -> None:
    fleet = await make_fleet(gateway={"api_keys": [GOOD]})
    # A spoofed address header or an API key changes nothing: the peer address decides.
    headers = {"X-Real-IP": "127.0.0.1", "x-api-key": GOOD}
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET /admin/fleet HTTP/1.1\r\nHost: cortex\r\n{lines}\r\n".encode()
    status, body = await _answer_from(fleet, peer, request)
    if allowed:
        assert status == 200
    else:
        assert status == 403
        err = orjson.loads(body)["error"]
        assert err["type"] == "permission_error" and "loopback" in err["message"]
    async with aiohttp.ClientSession() as s, s.get(fleet.url + "/admin/fleet") as r:
        assert r.status == 200  # this test's own client is on loopback


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded"])
async def test_a_forwarded_request_from_loopback_is_not_trusted_as_local(
    make_fleet: FleetFactory, header: str
) -> None:
    # nginx on the same host makes every client a loopback peer: it says so in these headers.
    fleet = await make_fleet()
    forwarded = {header: "203.0.113.9"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(fleet.url + "/admin/fleet", headers=forwarded) as r,
    ):
        assert r.status == 403
        assert (await r.json())["error"]["type"] == "permission_error"


async def test_a_refused_key_leaves_an_access_line_and_a_metric(
    make_fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = await make_fleet(gateway={"api_keys": [GOOD]})
    with caplog.at_level(logging.INFO, logger="cortex.access"):
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                fleet.url + "/v1/chat/completions", data=b"{}", headers={"x-api-key": "wrong-key"}
            ) as r,
        ):
            assert r.status == 401
    fields = [getattr(rec, "fields", {}) for rec in caplog.records if rec.name == "cortex.access"]
    assert [(f["status"], f["error"], f["endpoint"]) for f in fields] == [
        (401, "unauthorized", "chat")
    ]
    assert "wrong-key" not in caplog.text
    assert fleet.gateway.metrics.sample("cortex_requests_total", endpoint="chat", code="4xx") == 1


async def test_the_metrics_port_cuts_a_client_that_trickles_its_headers(
    make_fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cortex.metrics.METRICS_IDLE_S", 0.5)
    fleet = await make_fleet()
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.gateway.metrics.bound_port)
    started = time.monotonic()
    try:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Pad: " + b"a" * 60:
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    assert time.monotonic() - started < 3.0  # the trickle alone would take over 4 s
    async with aiohttp.ClientSession() as s, s.get(fleet.metrics_url + "/metrics") as r:
        assert r.status == 200  # and the port still serves


async def test_the_metrics_port_serves_only_metrics(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.metrics_url + "/metrics") as r:
            assert r.status == 200
            assert "cortex_node_up" in await r.text()
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/admin/fleet"),
            ("POST", "/admin/reload"),
            ("GET", "/health"),
            ("GET", "/"),
            ("GET", "/metrics/../admin/fleet"),
            ("POST", "/metrics"),
            ("DELETE", "/metrics"),
        ]:
            async with s.request(method, fleet.metrics_url + path, data=b"{}") as r:
                assert r.status == 404, (method, path)
                assert b"node-a" not in await r.read()


# --- an open listener ------------------------------------------------------------------


@pytest.mark.parametrize("keys", [{}, {"api_keys": [GOOD]}])
async def test_listening_beyond_loopback_without_keys_warns_at_start(
    make_fleet: FleetFactory, caplog: pytest.LogCaptureFixture, keys: dict[str, Any]
) -> None:
    logging.getLogger("cortex").propagate = True  # an earlier logs.setup() may have cut it
    caplog.set_level(logging.WARNING, logger="cortex")
    await make_fleet(gateway={"listen": "0.0.0.0:0", **keys})
    loud = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "gateway.api_keys is empty" in r.getMessage()
    ]
    assert len(loud) == (0 if keys else 1)


def test_config_check_warns_about_an_open_listener(tmp_path: Path) -> None:
    open_cfg = tmp_path / "open.toml"
    open_cfg.write_text('[gateway]\nlisten = "0.0.0.0:8000"\n')
    local_cfg = tmp_path / "local.toml"
    local_cfg.write_text('[gateway]\nlisten = "127.0.0.1:8000"\n')
    keyed_cfg = tmp_path / "keyed.toml"
    keyed_cfg.write_text(f'[gateway]\nlisten = "0.0.0.0:8000"\napi_keys = ["{GOOD}"]\n')
    from cortex.cli import main

    logger = logging.getLogger("cortex")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        runner = CliRunner()
        loud = runner.invoke(main, ["config", "check", "--config", str(open_cfg)])
        local = runner.invoke(main, ["config", "check", "--config", str(local_cfg)])
        keyed = runner.invoke(main, ["config", "check", "--config", str(keyed_cfg)])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    assert loud.exit_code == 0, loud.output
    assert "warning: gateway.listen = '0.0.0.0:8000' is reachable from other machines" in (
        loud.stderr
    )
    assert "config OK" in loud.stdout
    for quiet in (local, keyed):
        assert quiet.exit_code == 0
        assert "reachable from other machines" not in quiet.output
        assert GOOD not in quiet.output


# --- credentials on the way to a node -----------------------------------------------------


class FakeNode:
    """A mistral.rs look-alike that records the headers of every request it gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    def _note(self, request: web.Request) -> None:
        self.seen.append((request.path, {k.lower(): v for k, v in request.headers.items()}))

    async def models(self, request: web.Request) -> web.Response:
        self._note(request)
        listing = {
            "object": "list",
            "data": [
                {"id": "default", "object": "model", "created": 1, "owned_by": "local"},
                {
                    "id": "m1",
                    "object": "model",
                    "created": 1,
                    "owned_by": "local",
                    "status": "loaded",
                },
            ],
        }
        return web.json_response(listing)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        body = await request.json()
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            delta = {"role": "assistant", "content": "ok"}
            chunk = {"id": "1", "choices": [{"index": 0, "delta": delta, "finish_reason": "stop"}]}
            await resp.write(b"data: " + orjson.dumps({**chunk, "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        message = {"role": "assistant", "content": "ok"}
        return web.json_response(
            {
                "id": "1",
                "object": "chat.completion",
                "model": "m1",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )


CLIENT_CREDENTIALS = {
    "Authorization": f"Bearer {GOOD}",
    "x-api-key": GOOD,
    "Cookie": f"session={GOOD}",
    "Proxy-Authorization": f"Basic {GOOD}",
    "anthropic-version": "2023-06-01",
}


@pytest.mark.parametrize("node_key", ["", NODE_KEY])
async def test_client_credentials_never_reach_a_node(
    make_fleet: FleetFactory, aiohttp_server: Any, node_key: str
) -> None:
    fake = FakeNode()
    server = await aiohttp_server(fake.app)
    endpoint = str(server.make_url("")).rstrip("/")
    fleet: Fleet = await make_fleet(
        {},
        gateway={"api_keys": [GOOD]},
        nodes=[{"name": "fake", "endpoint": endpoint, "api_key": node_key}],
    )
    async with aiohttp.ClientSession() as s:
        for path, body in (
            ("/v1/chat/completions", CHAT),
            ("/v1/chat/completions", {**CHAT, "stream": True}),
            ("/v1/messages", MESSAGES),
            ("/v1/messages", {**MESSAGES, "stream": True}),
        ):
            async with s.post(
                fleet.url + path,
                data=orjson.dumps(body),
                headers={"content-type": "application/json", **CLIENT_CREDENTIALS},
            ) as r:
                assert r.status == 200, await r.text()
                assert b"ok" in await r.read()
    chats = [h for p, h in fake.seen if p == "/v1/chat/completions"]
    polls = [h for p, h in fake.seen if p == "/v1/models"]
    assert len(chats) == 4 and polls
    for headers in chats + polls:
        assert GOOD not in repr(headers)
        for name in ("x-api-key", "cookie", "proxy-authorization", "anthropic-version"):
            assert name not in headers
        if node_key:
            assert headers["authorization"] == f"Bearer {NODE_KEY}"
        else:
            assert "authorization" not in headers
