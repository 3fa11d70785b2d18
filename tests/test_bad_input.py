"""Hostile and broken clients: each gets a 4xx in its own dialect (or is cut off in
bounded time), and the gateway keeps serving everyone else afterwards.

The cases `test_proxy.py` already covers (broken JSON, `[1, 2]`, missing or
non-string model, text/plain, a bad UTF-8 model name, a 2 MB body over a 1 MB
limit) are not repeated here."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from cortex.sim import SimConfig, SimModel
from tests.conftest import Fleet, FleetFactory, rss_mb
from tests.subproc import Cortex

HELLO = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "m1", "max_tokens": 16, "messages": HELLO}
MESSAGES = {"model": "m1", "max_tokens": 16, "messages": HELLO}
JSON = "application/json"


# --- helpers ---------------------------------------------------------------------------


async def post(
    fleet: Fleet, path: str, body: bytes, ctype: str | None = JSON, method: str = "POST"
) -> tuple[int, Any]:
    headers = {"content-type": ctype} if ctype else {}
    skip = () if ctype else ("Content-Type",)
    async with (
        aiohttp.ClientSession(skip_auto_headers=skip) as s,
        s.request(method, fleet.url + path, data=body, headers=headers) as r,
    ):
        raw = await r.read()
        return r.status, orjson.loads(raw) if raw[:1] in (b"{", b"[") else raw


async def assert_still_serving(fleet: Fleet) -> None:
    """A normal request in each dialect still works."""
    status, answer = await post(fleet, "/v1/chat/completions", orjson.dumps(CHAT))
    assert status == 200 and answer["choices"][0]["message"]["content"]
    status, answer = await post(fleet, "/v1/messages", orjson.dumps(MESSAGES))
    assert status == 200 and answer["content"][0]["text"]


def assert_openai_error(answer: Any, kind: str = "invalid_request_error") -> None:
    assert isinstance(answer, dict), answer
    assert set(answer) == {"error"}
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == kind


def assert_anthropic_error(answer: Any, kind: str = "invalid_request_error") -> None:
    assert isinstance(answer, dict), answer
    assert answer["type"] == "error"
    assert set(answer["error"]) == {"type", "message"}
    assert answer["error"]["type"] == kind


def request_bytes(
    path: str, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: cortex"]
    all_headers = {"Content-Type": JSON, "Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off a raw connection (Content-Length or chunked body)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
        return status, headers, body
    return status, headers, await reader.read()


class Raw:
    """A raw TCP client of the gateway's API port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within ``seconds`` (data is drained)."""
        try:
            await self.received_until_closed(seconds)
        except TimeoutError:
            return False
        return True

    async def received_until_closed(self, seconds: float) -> bytes:
        """What the server sends until it closes; TimeoutError if it is still open then."""
        got = b""
        async with asyncio.timeout(seconds):
            try:
                while data := await self.reader.read(65536):
                    got += data
            except ConnectionError:
                pass
        return got


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    opened: list[asyncio.StreamWriter] = []

    async def connect(fleet: Fleet, rcvbuf: int = 0) -> Raw:
        sock = None
        if rcvbuf:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", fleet.gateway.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", fleet.gateway.port)
        opened.append(writer)
        return Raw(reader, writer)

    yield connect
    for writer in opened:
        writer.transport.abort()
    await asyncio.sleep(0)


# --- broken bodies -------------------------------------------------------------------------

DEEP = b'{"model":"m1","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
OPENAI_CASES: list[tuple[str, bytes, str | None, int]] = [
    ("a JSON string", b'"hello"', JSON, 400),
    ("JSON null", b"null", JSON, 400),
    ("a JSON number", b"42", JSON, 400),
    ("an empty body", b"", JSON, 400),
    ("model null", b'{"model": null, "messages": []}', JSON, 400),
    ("model empty", b'{"model": "", "messages": []}', JSON, 400),
    ("model a list", b'{"model": ["m1"], "messages": []}', JSON, 400),
    ("stream not a bool", b'{"model": "m1", "stream": "yes", "messages": []}', JSON, 400),
    ("max_tokens a string", b'{"model": "m1", "max_tokens": "lots", "messages": []}', JSON, 400),
    (
        "bad UTF-8 in the content",
        b'{"model":"m1","messages":[{"role":"user","content":"\xff\xfe"}]}',
        JSON,
        400,
    ),
    (
        "a lone surrogate escape",
        b'{"model":"m1","messages":[{"role":"user","content":"\\ud800"}]}',
        JSON,
        400,
    ),
    ("100k levels of nesting", DEEP, JSON, 400),
    ("trailing garbage", orjson.dumps(CHAT) + b" }{", JSON, 400),
    ("a form post", b"model=m1", "application/x-www-form-urlencoded", 415),
    ("multipart", b"--x\r\n\r\n--x--\r\n", "multipart/form-data; boundary=x", 415),
]


@pytest.mark.parametrize("case", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
async def test_broken_openai_bodies(make_fleet: FleetFactory, case: tuple[Any, ...]) -> None:
    _, body, ctype, expected = case
    fleet = await make_fleet()
    status, answer = await post(fleet, "/v1/chat/completions", body, ctype)
    assert status == expected, answer
    assert_openai_error(answer)
    await assert_still_serving(fleet)


async def test_no_content_type_is_read_as_json(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    status, answer = await post(fleet, "/v1/chat/completions", orjson.dumps(CHAT), None)
    assert status == 200 and answer["object"] == "chat.completion"


ANTHROPIC_CASES: list[tuple[str, str, bytes, str | None]] = [
    ("broken JSON", "/v1/messages", b"{not json", JSON),
    ("a JSON list", "/v1/messages", b"[1, 2]", JSON),
    ("JSON null", "/v1/messages", b"null", JSON),
    ("no model", "/v1/messages", b'{"max_tokens": 5, "messages": []}', JSON),
    ("model a number", "/v1/messages", b'{"model": 7, "max_tokens": 5, "messages": []}', JSON),
    ("model empty", "/v1/messages", b'{"model": "", "max_tokens": 5, "messages": []}', JSON),
    ("no max_tokens", "/v1/messages", b'{"model": "m1", "messages": []}', JSON),
    ("messages a string", "/v1/messages", b'{"model":"m1","max_tokens":5,"messages":"hi"}', JSON),
    (
        "bad UTF-8",
        "/v1/messages",
        b'{"model":"m1","max_tokens":5,"messages":[{"role":"user","content":"\xff"}]}',
        JSON,
    ),
    ("100k levels of nesting", "/v1/messages", DEEP, JSON),
    ("text/plain", "/v1/messages", orjson.dumps(MESSAGES), "text/plain"),
    ("count_tokens broken JSON", "/v1/messages/count_tokens", b"{", JSON),
    ("count_tokens no model", "/v1/messages/count_tokens", b'{"messages": []}', JSON),
    ("count_tokens a string", "/v1/messages/count_tokens", b'"x"', JSON),
]


async def test_broken_anthropic_bodies(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    for name, path, body, ctype in ANTHROPIC_CASES:
        status, answer = await post(fleet, path, body, ctype)
        assert status == 400, (name, answer)
        assert_anthropic_error(answer)
    status, answer = await post(fleet, "/v1/messages", b"", JSON, method="GET")
    assert status == 405
    assert_anthropic_error(answer)
    status, answer = await post(fleet, "/v1/messages?beta=true", orjson.dumps(MESSAGES))
    assert status == 200
    await assert_still_serving(fleet)


# --- big bodies -------------------------------------------------------------------------------

HUNDRED_MB = 100 * 1024 * 1024


async def test_a_100_mb_content_length_is_refused_before_the_body_is_sent(
    make_fleet: FleetFactory, raw: Any
) -> None:
    fleet = await make_fleet()
    for path, check in (
        ("/v1/chat/completions", assert_openai_error),
        ("/v1/messages", lambda a: assert_anthropic_error(a, "request_too_large")),
    ):
        conn: Raw = await raw(fleet)
        head = request_bytes(path, headers={"Content-Length": str(HUNDRED_MB)})
        conn.writer.write(head + b'{"model":"m1"')  # a few bytes of the 100 MB, then nothing
        async with asyncio.timeout(2):
            status, _, body = await read_response(conn.reader)
        assert status == 413
        check(orjson.loads(body))
        if path == "/v1/chat/completions":
            assert orjson.loads(body)["error"]["code"] == "request_too_large"
    await assert_still_serving(fleet)


async def _hundred_mb() -> AsyncIterator[bytes]:
    piece = b"x" * (1 << 20)
    yield b'{"model":"m1","messages":[{"role":"user","content":"'
    for _ in range(100):
        yield piece
        await asyncio.sleep(0)
    yield b'"}]}'


async def test_sending_100_mb_anyway_does_not_grow_cortex(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    await assert_still_serving(fleet)
    before = rss_mb()
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(
                fleet.url + "/v1/chat/completions",
                data=_hundred_mb(),
                headers={"content-type": JSON, "content-length": str(HUNDRED_MB + 56)},
            ) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "request_too_large"
        except aiohttp.ClientOSError:
            pytest.fail("the gateway reset the connection instead of answering 413")
    assert time.monotonic() - started < 10
    assert rss_mb() - before < 25, "the refused body was buffered"
    await assert_still_serving(fleet)


async def test_a_chunked_body_over_the_limit_is_413(make_fleet: FleetFactory) -> None:
    """No Content-Length: the body is read up to ``max_body_mb`` (here 1 MB), then refused."""
    fleet = await make_fleet(gateway={"max_body_mb": 1})
    async with aiohttp.ClientSession() as s:
        for path, dialect in (("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")):
            async with s.post(
                fleet.url + path, data=_hundred_mb(), headers={"content-type": JSON}
            ) as r:
                assert r.status == 413
                assert r.headers.get("Transfer-Encoding") != "chunked"
                answer = await r.json()
            if dialect == "openai":
                assert answer["error"]["code"] == "request_too_large"
            else:
                assert_anthropic_error(answer, "request_too_large")
    await assert_still_serving(fleet)


# --- the HTTP layer --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flood", "expected"),
    [
        pytest.param({f"x-flood-{i}": "y" for i in range(1000)}, 400, id="1000-headers"),
        pytest.param({"x-huge": "y" * 200_000}, 400, id="one-200k-header"),
        pytest.param({"Authorization": "Bearer " + "k" * 100_000}, 400, id="100k-bearer"),
        # each within the limits (128 headers of up to 8190 bytes), ~1 MB in all
        pytest.param({f"x-big-{i}": "y" * 8000 for i in range(120)}, 431, id="120-8k-headers"),
        pytest.param({f"x-big-{i}": "y" * 8000 for i in range(7)}, 200, id="7-8k-headers"),
    ],
)
async def test_header_floods(
    make_fleet: FleetFactory, raw: Any, flood: dict[str, str], expected: int
) -> None:
    fleet = await make_fleet()
    conn: Raw = await raw(fleet)
    body = orjson.dumps(CHAT)
    conn.writer.write(request_bytes("/v1/chat/completions", body, flood))
    async with asyncio.timeout(5):
        status, headers, answer = await read_response(conn.reader)
    assert status == expected
    if expected != 200:
        assert headers["content-type"].startswith("text/plain")
        assert answer in (
            b"too many header fields",
            b"a request line or header field is too long",
            b"request header fields over 64 KiB in all",
        )
        assert await conn.closed_within(2)
    await assert_still_serving(fleet)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # a TLS hello
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\xff" * 1000 + b"\r\n\r\n",
    ],
    ids=["tls-hello", "100k-url", "two-lengths", "negative-length", "bad-chunk", "binary"],
)
async def test_garbage_on_the_wire_gets_a_4xx(
    make_fleet: FleetFactory, raw: Any, garbage: bytes
) -> None:
    fleet = await make_fleet()
    conn: Raw = await raw(fleet)
    conn.writer.write(garbage)
    async with asyncio.timeout(5):
        status, _, _ = await read_response(conn.reader)
    assert 400 <= status < 500
    assert await conn.closed_within(2)
    await assert_still_serving(fleet)


async def test_odd_request_ids(make_fleet: FleetFactory, raw: Any) -> None:
    """``x-request-id`` is echoed and sent upstream: bytes outside ASCII pass, controls are 400."""
    fleet = await make_fleet()
    body = orjson.dumps(CHAT)
    for rid, expected in (
        ("req-é-漢".encode(), 200),
        (b"a\tb", 200),
        (b"x" * 300, 200),  # over 200 bytes: replaced by one of cortex's own
        (b"a\x00b", 400),
        (b"a\x7fb", 400),
    ):
        conn: Raw = await raw(fleet)
        head = request_bytes("/v1/chat/completions", body).split(b"\r\n\r\n")[0]
        conn.writer.write(head + b"\r\nX-Request-Id: " + rid + b"\r\n\r\n" + body)
        async with asyncio.timeout(3):
            status, headers, _ = await read_response(conn.reader)
        assert status == expected, rid
        if expected == 200:
            echoed = headers["x-request-id"]
            assert echoed.startswith("req_") if len(rid) > 200 else echoed == rid.decode()
    await assert_still_serving(fleet)


async def test_pipelined_requests_are_answered_in_order(make_fleet: FleetFactory, raw: Any) -> None:
    fleet = await make_fleet()
    conn: Raw = await raw(fleet)
    first = {"model": "m1", "messages": [{"role": "user", "content": "first"}]}
    second = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "second"}]}
    third = {"model": "m1", "max_tokens": 4, "messages": HELLO}
    conn.writer.write(
        request_bytes("/v1/chat/completions", orjson.dumps(first), {"x-request-id": "pipe-1"})
        + request_bytes("/v1/chat/completions", orjson.dumps(second), {"x-request-id": "pipe-2"})
        + request_bytes("/v1/messages", orjson.dumps(third), {"x-request-id": "pipe-3"})
        + request_bytes("/v1/models", method="GET")
    )
    async with asyncio.timeout(5):
        answers = [await read_response(conn.reader) for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]
    assert [h.get("x-request-id") for _, h, _ in answers[:3]] == ["pipe-1", "pipe-2", "pipe-3"]
    assert orjson.loads(answers[0][2])["object"] == "chat.completion"
    assert answers[1][1]["content-type"].startswith("text/event-stream")
    assert answers[1][2].rstrip().endswith(b"data: [DONE]")
    assert orjson.loads(answers[2][2])["type"] == "message"
    assert [m["id"] for m in orjson.loads(answers[3][2])["data"]] == ["m1"]


async def test_slowloris_headers_are_cut_off(make_fleet: FleetFactory, raw: Any) -> None:
    """Headers sent a byte at a time never finish: the connection is closed
    ``gateway.client_timeout_s`` after their first byte, however much it keeps trickling."""
    fleet = await make_fleet(gateway={"client_timeout_s": 1.0})
    slow: Raw = await raw(fleet)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in request_bytes("/v1/chat/completions", orjson.dumps(CHAT)):
            slow.writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        await assert_still_serving(fleet)  # everyone else is served meanwhile
        assert await slow.received_until_closed(4) == b""
    finally:
        trickling.cancel()
    assert 0.9 < time.monotonic() - started < 3.5


async def test_slowloris_after_a_good_request_is_cut_off_too(
    make_fleet: FleetFactory, raw: Any
) -> None:
    fleet = await make_fleet(gateway={"client_timeout_s": 1.0})
    conn: Raw = await raw(fleet)
    conn.writer.write(request_bytes("/v1/models", method="GET"))
    assert (await read_response(conn.reader))[0] == 200
    await asyncio.sleep(1.2)  # idle keep-alive is not slow: the connection stays open
    conn.writer.write(request_bytes("/v1/models", method="GET"))
    assert (await read_response(conn.reader))[0] == 200
    conn.writer.write(b"GET /v1/mod")
    started = time.monotonic()
    assert await conn.received_until_closed(3) == b""
    assert 0.9 < time.monotonic() - started < 3.0


async def test_a_body_that_never_finishes_is_cut_off(make_fleet: FleetFactory, raw: Any) -> None:
    fleet = await make_fleet(gateway={"client_timeout_s": 1.0})
    node = fleet.nodes["node-a"]
    conn: Raw = await raw(fleet)
    body = orjson.dumps(CHAT)
    conn.writer.write(request_bytes("/v1/chat/completions", body)[: -len(body) // 2])
    await fleet.wait_for(lambda: fleet.gateway.active == 1)
    started = time.monotonic()
    assert await conn.received_until_closed(3) == b""
    assert time.monotonic() - started < 2.5
    await fleet.wait_for(lambda: fleet.gateway.active == 0)
    assert node.counters["/v1/chat/completions"] == 0
    await assert_still_serving(fleet)


async def test_a_slow_but_steady_stream_is_not_cut(make_fleet: FleetFactory) -> None:
    """The deadline is for receiving a request, not for answering it."""
    fleet = await make_fleet(
        {"node-a": SimConfig(models=[SimModel("m1", tok_per_s=10, answer_tokens=20)])},
        gateway={"client_timeout_s": 0.5},
    )
    started = time.monotonic()
    status, answer = await post(
        fleet, "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True})
    )
    assert status == 200 and answer.rstrip().endswith(b"data: [DONE]")
    assert time.monotonic() - started > 1.5


# --- a client that never reads -----------------------------------------------------------


def _buffered(fleet: Fleet) -> int:
    """Bytes cortex holds for its clients: what its API transports have yet to send."""
    server = fleet.gateway._server
    assert server is not None
    return sum(
        c.transport.get_write_buffer_size() for c in server.connections if c.transport is not None
    )


async def test_a_client_that_never_reads_its_stream_holds_bounded_memory(
    make_fleet: FleetFactory, raw: Any
) -> None:
    # The node in a process of its own, so that this process's RSS is cortex's (and the
    # emulator's instant mode writes a whole answer at once, 50 MB here, ignoring backpressure).
    node = await Cortex.spawn(
        "sim", "--port", "0", "--instant", "--answer-tokens", "200000", "--model", "m1"
    )
    try:
        url = (await node.expect(r"listening on (http://\S+)")).group(1)
        fleet = await make_fleet({}, nodes=[{"name": "n", "endpoint": url}])
        await assert_still_serving(fleet)
        before = rss_mb()
        conn: Raw = await raw(fleet, rcvbuf=32768)
        body = orjson.dumps({"model": "m1", "stream": True, "messages": HELLO})
        conn.writer.write(request_bytes("/v1/chat/completions", body))
        peak = 0
        for _ in range(20):  # 2 s: time enough to relay the whole 50 MB answer if unthrottled
            await asyncio.sleep(0.1)
            peak = max(peak, _buffered(fleet))
        assert fleet.gateway.active == 1, "the stream should still be stuck behind its client"
        assert peak < 1 << 20
        assert rss_mb() - before < 15
        await assert_still_serving(fleet)  # the stuck stream blocks nobody else
        conn.writer.transport.abort()
        await fleet.wait_for(lambda: fleet.gateway.active == 0)
        handle = fleet.gateway.supervisor.snapshot.nodes["n"].handle
        await fleet.wait_for(lambda: handle.inflight == 0)
    finally:
        await node.close()
