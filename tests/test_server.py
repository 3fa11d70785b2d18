"""The API port's HTTP/1.1 server on its own: framing, pipelining, limits, shutdown.

A small handler table is served by :class:`cortex.server.Server` on loopback.
Clients are raw sockets, to see the exact bytes on the wire, and aiohttp where a
real client says more.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import aiohttp
import pytest

from cortex.server import (
    SWEEP_S,
    Answer,
    BadBody,
    Connection,
    Request,
    Response,
    Server,
    Stream,
    TooLarge,
)

Route = Callable[[Request], Awaitable[Answer]]

HELLO = b'{"hello":"world"}'
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LIMIT = 16  # what /echo reads at most


# --- handlers --------------------------------------------------------------------------


async def hello(request: Request) -> Response:
    return Response(200, HELLO, headers={"X-Request-Id": "r-1"})


async def echo(request: Request) -> Response:
    """The body back: 413 over LIMIT bytes, 400 when its framing is broken."""
    try:
        body = await request.read(LIMIT)
    except TooLarge:
        return Response(413, b"too large", content_type="text/plain")
    except BadBody:
        return Response(400, b"bad body", content_type="text/plain")
    return Response(200, body, content_type="application/octet-stream")


async def slow_echo(request: Request) -> Response:
    body = await request.read(LIMIT)
    await asyncio.sleep(0.05)
    return Response(200, body, content_type="application/octet-stream")


async def where(request: Request) -> Response:
    return Response(200, f"{request.path} {request.target}".encode(), content_type="text/plain")


async def refuse(request: Request) -> Response:
    """Answers without reading the body, as a handler does with a Content-Length over its limit."""
    return Response(413, b"too large", content_type="text/plain")


async def three_parts(request: Request) -> Stream:
    stream = Stream(request, headers={"Cache-Control": "no-cache"})
    stream.start(b"first")
    await stream.write(b"")
    await stream.write(b"second")
    await stream.write_eof(b"last")
    return stream


async def fails(request: Request) -> Response:
    raise RuntimeError("a bug in a handler")


ROUTES: dict[str, Route] = {
    "/hello": hello,
    "/echo": echo,
    "/slow-echo": slow_echo,
    "/where": where,
    "/refuse": refuse,
    "/stream": three_parts,
    "/fails": fails,
}


@dataclass
class Gate:
    """A handler held until the test opens it; it says when it runs and when it is cancelled."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, request: Request) -> Response:
        self.entered.set()
        try:
            await self.opened.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(200, b"done", content_type="text/plain")


# --- clients ---------------------------------------------------------------------------


@dataclass
class Head:
    status: str
    lines: list[str]  # the header lines, as sent

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased names (each header below is sent once)."""
        return {name.lower(): value for name, value in (ln.split(": ", 1) for ln in self.lines)}


class Conn:
    """A raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def head(self) -> Head:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status, *lines = raw[:-4].decode().split("\r\n")
        return Head(status, lines)

    async def answer(self) -> tuple[Head, bytes]:
        """The next answer, its body unframed."""
        head = await self.head()
        headers = head.headers
        if "content-length" in headers:
            return head, await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            return head, await self.chunked_body()
        return head, await self.reader.read()  # until the server closes

    async def chunked_body(self) -> bytes:
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
            parts.append((await self.reader.readexactly(size + 2))[:-2])
        assert await self.reader.readexactly(2) == b"\r\n"
        return b"".join(parts)

    async def rest(self) -> bytes:
        """Whatever comes until the server closes the connection."""
        return await self.reader.read()

    async def closed(self) -> None:
        """Wait for the server to close (or reset) the connection, dropping what comes."""
        with contextlib.suppress(ConnectionResetError):
            while await self.reader.read(1 << 16):
                pass

    async def silent_for(self, seconds: float) -> bool:
        """Whether nothing came, not even a close, within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                await self.reader.read(1)
        except TimeoutError:
            return True
        return False


@dataclass
class Served:
    server: Server
    listener: asyncio.Server
    port: int
    conns: list[Conn] = field(default_factory=list)

    async def connect(self, rcvbuf: int | None = None) -> Conn:
        """A raw connection; ``rcvbuf`` shrinks its socket's receive buffer."""
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            reader, writer = await asyncio.open_connection(sock=sock)
        conn = Conn(reader, writer)
        self.conns.append(conn)
        return conn

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(routes, receive_timeout=..., keepalive_timeout=...)``: a server on loopback."""
    started: list[Served] = []

    async def start(
        routes: dict[str, Route], *, receive_timeout: float = 5.0, keepalive_timeout: float = 5.0
    ) -> Served:
        async def dispatch(request: Request) -> Answer:
            route = routes.get(request.path)
            if route is None:
                return Response(404, b"no route", content_type="text/plain")
            return await route(request)

        server = Server(
            dispatch, receive_timeout=receive_timeout, keepalive_timeout=keepalive_timeout
        )
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        served = Served(server, listener, listener.sockets[0].getsockname()[1])
        started.append(served)
        return served

    yield start
    for served in started:
        for conn in served.conns:
            conn.writer.close()
            with contextlib.suppress(ConnectionError):
                await conn.writer.wait_closed()
        served.listener.close()
        await served.server.shutdown(0.5)
        await served.listener.wait_closed()


def get(target: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_head(target: str, length: int, *headers: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: test", f"Content-Length: {length}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(target: str, body: bytes) -> bytes:
    return post_head(target, len(body)) + body


def post_chunked_head(target: str) -> bytes:
    return f"POST {target} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


# --- framing ---------------------------------------------------------------------------


async def test_a_whole_answer_is_framed_by_content_length(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        for _ in range(2):  # the connection is kept alive
            conn.send(get("/hello"))
            head = await conn.head()
            assert head.status == "HTTP/1.1 200 OK"
            assert head.lines[:-1] == [
                "Content-Type: application/json",
                f"Content-Length: {len(HELLO)}",
                "X-Request-Id: r-1",
            ]
            name, date = head.lines[-1].split(": ")
            assert name == "Date"
            assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", date)
            assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5
            assert await conn.reader.readexactly(len(HELLO)) == HELLO


async def test_a_stream_is_chunked_and_its_head_leaves_with_the_first_chunk(
    serve: Serve,
) -> None:
    steps = [asyncio.Event(), asyncio.Event()]

    async def stepped(request: Request) -> Stream:
        stream = Stream(request, headers={"Cache-Control": "no-cache"})
        stream.start(b"data: 1\n\n")
        await steps[0].wait()
        await stream.write(b"")  # an empty chunk would end the body: nothing is sent
        await stream.write(b"data: 2\n\n")
        await steps[1].wait()
        await stream.write_eof(b"data: 3\n\n")
        return stream

    served = await serve({"/events": stepped, "/hello": hello})
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/events"))
        first = await conn.reader.read(1 << 16)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[:4] == [
            b"HTTP/1.1 200 OK",
            b"Content-Type: text/event-stream",
            b"Transfer-Encoding: chunked",
            b"Cache-Control: no-cache",
        ]
        assert body == b"9\r\ndata: 1\n\n\r\n"
        steps[0].set()
        assert await conn.reader.read(1 << 16) == b"9\r\ndata: 2\n\n\r\n"
        steps[1].set()
        assert await conn.reader.read(1 << 16) == b"9\r\ndata: 3\n\n\r\n0\r\n\r\n"
        conn.send(get("/hello"))  # the stream ended cleanly: the connection goes on
        assert (await conn.answer())[1] == HELLO


async def test_a_stream_returned_unended_is_ended_by_the_server(serve: Serve) -> None:
    async def forgets(request: Request) -> Stream:
        stream = Stream(request)
        await stream.write(b"only")
        return stream

    served = await serve({"/forgets": forgets})
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/forgets"))
        head = await conn.head()
        assert head.headers["transfer-encoding"] == "chunked"
        assert await conn.reader.readexactly(14) == b"4\r\nonly\r\n0\r\n\r\n"


async def test_head_gets_the_headers_without_the_body(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(b"HEAD /hello HTTP/1.1\r\nHost: test\r\n\r\n" + get("/where"))
        head = await conn.head()
        assert head.status == "HTTP/1.1 200 OK"
        assert head.headers["content-length"] == str(len(HELLO))
        # The next bytes are the next answer's.
        head, body = await conn.answer()
        assert head.status == "HTTP/1.1 200 OK" and body == b"/where /where"


async def test_a_failing_handler_gets_a_500_and_the_connection_goes_on(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/fails") + get("/hello"))
        head, body = await conn.answer()
        assert head.status == "HTTP/1.1 500 Internal Server Error"
        assert head.headers["content-type"] == "text/plain"
        assert body == b"500: Internal Server Error"
        assert (await conn.answer())[1] == HELLO


async def test_a_handler_failing_mid_stream_cuts_the_stream(serve: Serve) -> None:
    async def breaks(request: Request) -> Stream:
        stream = Stream(request)
        await stream.write(b"data: 1\n\n")
        raise RuntimeError("a bug after the head went out")

    served = await serve({"/breaks": breaks}, keepalive_timeout=0.3)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/breaks"))
        await conn.head()
        # Cut: no last chunk, nothing that is not a chunk, and the connection closed.
        assert await conn.rest() == b"9\r\ndata: 1\n\n\r\n"


async def test_a_real_client_reads_answers_and_streams_over_one_connection(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with (
        asyncio.timeout(5),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session,
    ):
        async with session.get(served.url("/hello")) as r:
            assert r.status == 200 and await r.json() == {"hello": "world"}
        async with session.get(served.url("/stream")) as r:
            assert r.headers["Cache-Control"] == "no-cache"
            assert await r.read() == b"firstsecondlast"
        async with session.post(served.url("/echo"), data=b"ping") as r:
            assert await r.read() == b"ping"
        assert len(served.server.connections) == 1


# --- HTTP/1.0 and Connection: close ----------------------------------------------------


async def test_http10_keep_alive_is_honoured_when_asked(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/hello", "Connection: keep-alive", version="1.0"))
        head, body = await conn.answer()
        assert head.headers["connection"] == "keep-alive"
        assert head.headers["content-length"] == str(len(HELLO)) and body == HELLO
        conn.send(get("/hello", version="1.0"))  # not asked this time
        head, body = await conn.answer()
        assert head.headers["connection"] == "close" and body == HELLO
        assert await conn.rest() == b""


async def test_a_stream_to_an_http10_client_is_unchunked_and_then_closed(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/stream", "Connection: keep-alive", version="1.0"))
        head = await conn.head()
        assert "transfer-encoding" not in head.headers
        assert "content-length" not in head.headers
        assert head.headers["connection"] == "close"
        assert await conn.rest() == b"firstsecondlast"


async def test_connection_close_from_the_client_closes_after_the_answer(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/hello", "Connection: close"))
        head, body = await conn.answer()
        assert head.headers["connection"] == "close" and body == HELLO
        assert await conn.rest() == b""


# --- pipelining and request targets ----------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(
            post("/slow-echo", b"first")  # slower than the ones after it
            + get("/hello")
            + post_chunked_head("/echo")
            + b"3\r\nthi\r\n2\r\nrd\r\n0\r\n\r\n"
            + get("/where?n=4")
        )
        bodies = [(await conn.answer())[1] for _ in range(4)]
        assert bodies == [b"first", HELLO, b"third", b"/where /where?n=4"]


async def test_more_pipelined_requests_than_are_queued_at_once_are_all_answered(
    serve: Serve,
) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(b"".join(get(f"/where?n={n}") for n in range(100)))
        bodies = [(await conn.answer())[1] for _ in range(100)]
        assert bodies == [f"/where /where?n={n}".encode() for n in range(100)]


async def test_the_path_is_decoded_and_the_target_kept_as_sent(serve: Serve) -> None:
    served = await serve({"/a b/café": where})
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/a%20b/caf%C3%A9?x=1&y=%2F"))
        _, body = await conn.answer()
        assert body.decode() == "/a b/café /a%20b/caf%C3%A9?x=1&y=%2F"


# --- request bodies --------------------------------------------------------------------


async def test_expect_100_continue_is_answered_when_the_handler_reads(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(post_head("/echo", 5, "Expect: 100-continue"))
        assert await conn.reader.readexactly(len(CONTINUE)) == CONTINUE
        conn.send(b"hello")
        head, body = await conn.answer()
        assert head.status == "HTTP/1.1 200 OK" and body == b"hello"


async def test_no_100_continue_when_the_handler_answers_without_reading(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(post_head("/refuse", 5, "Expect: 100-continue"))
        head, body = await conn.answer()  # would fail on a 100 Continue first
        assert head.status.startswith("HTTP/1.1 413 ") and body == b"too large"
        assert head.headers["connection"] == "close"
        conn.send(b"hello")  # the client sends the body anyway: it is read and dropped
        assert await conn.rest() == b""


async def test_a_chunked_body_over_the_limit_raises_too_large(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        # 20 bytes, over the limit of 16, and not the terminator: the body is read as it comes.
        conn.send(post_chunked_head("/echo") + b"a\r\n0123456789\r\n" * 2)
        head, body = await conn.answer()
        assert head.status.startswith("HTTP/1.1 413 ") and body == b"too large"
        assert head.headers["connection"] == "close"  # the body was not read to its end
        conn.send(b"0\r\n\r\n")
        assert await conn.rest() == b""


async def test_a_chunked_body_over_the_limit_that_came_whole_raises_too_large(
    serve: Serve,
) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(post_chunked_head("/echo") + b"14\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n")
        head, body = await conn.answer()
        assert head.status.startswith("HTTP/1.1 413 ") and body == b"too large"


async def test_broken_chunk_framing_raises_bad_body(serve: Serve) -> None:
    served = await serve(ROUTES, receive_timeout=0.5)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(post_chunked_head("/echo") + b"5\r\nhello\r\n")
        await asyncio.sleep(0.05)  # a later read: sent with the head, the request is refused
        conn.send(b"zz\r\nhello\r\n0\r\n\r\n")
        head, body = await conn.answer()
        assert head.status.startswith("HTTP/1.1 400 ") and body == b"bad body"


async def test_broken_framing_sent_with_the_head_gets_a_400(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(post_chunked_head("/echo") + b"zz\r\nhello\r\n0\r\n\r\n")
        head, _ = await conn.answer()
        assert head.status.startswith("HTTP/1.1 400 ")
        assert await conn.rest() == b""


async def test_an_answer_sent_before_the_body_was_read_still_reaches_the_client(
    serve: Serve,
) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        body = b"x" * (4 << 20)  # more than the sockets hold: the server must read it
        conn.send(post("/refuse", body))
        await conn.writer.drain()
        head, answer = await conn.answer()
        assert head.status.startswith("HTTP/1.1 413 ") and answer == b"too large"
        assert head.headers["connection"] == "close"
        assert await conn.rest() == b""


# --- parse errors ----------------------------------------------------------------------


async def test_a_request_that_cannot_be_parsed_gets_400_then_close(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/hello"))
        assert (await conn.answer())[1] == HELLO
        conn.send(get("/hello", "Not a header") + get("/hello"))
        head, body = await conn.answer()
        assert head.status == "HTTP/1.1 400 Bad Request"
        assert head.headers["content-type"] == "text/plain; charset=utf-8"
        assert head.headers["connection"] == "close"
        assert body and b"\n" not in body
        assert await conn.rest() == b""  # the request after it is not answered


async def test_a_head_over_64_kib_in_all_is_431(serve: Serve) -> None:
    """Each header within the limits, sent in pieces: the total is what counts."""
    served = await serve(ROUTES)
    fields = [f"X-Big-{i}: {'y' * 8000}" for i in range(9)]  # ~72 KB
    async with asyncio.timeout(5):
        conn = await served.connect()
        request = get("/hello", *fields)
        for at in range(0, len(request), 4096):
            with contextlib.suppress(ConnectionError):
                conn.send(request[at : at + 4096])
            await asyncio.sleep(0)
        head, body = await conn.answer()
        assert head.status == "HTTP/1.1 431 Request Header Fields Too Large"
        assert body == b"request header fields over 64 KiB in all"
        await conn.closed()


async def test_a_large_head_under_the_cap_and_large_bodies_are_served(serve: Serve) -> None:
    served = await serve({**ROUTES, "/big": big_echo})
    fields = [f"X-Big-{i}: {'y' * 8000}" for i in range(7)]  # ~56 KB, in pieces
    body = b"z" * 300_000  # body bytes never count as head bytes
    async with asyncio.timeout(5):
        conn = await served.connect()
        request = get("/hello", *fields)
        for at in range(0, len(request), 4096):
            conn.send(request[at : at + 4096])
            await asyncio.sleep(0)
        assert (await conn.answer())[1] == HELLO
        for _ in range(3):  # a body arriving with its head, and one after it, on one connection
            conn.send(post("/big", body))
            assert (await conn.answer())[1] == b"300000"


async def big_echo(request: Request) -> Response:
    return Response(200, str(len(await request.read(1 << 20))).encode(), content_type="text/plain")


async def test_the_400_does_not_quote_an_oversized_header(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/hello", "Authorization: Bearer " + "s3cr3t" * 17000))  # 100 KB
        head, body = await conn.answer()
        assert head.status == "HTTP/1.1 400 Bad Request"
        assert b"s3cr3t" not in body


# --- time limits -----------------------------------------------------------------------


async def test_a_trickling_request_is_cut_at_the_receive_deadline(serve: Serve) -> None:
    served = await serve(ROUTES, receive_timeout=0.5, keepalive_timeout=1.0)
    async with asyncio.timeout(5):
        conn = await served.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        conn.send(b"GET /hello HTTP/1.1\r\n")
        closed = asyncio.create_task(conn.closed())
        while not closed.done():
            with contextlib.suppress(ConnectionError):  # a header line every 0.1 s
                conn.send(b"X-Trickle: 1\r\n")
            await asyncio.wait([closed], timeout=0.1)
        assert 0.5 <= loop.time() - started <= 0.5 + SWEEP_S + 0.15


async def test_an_idle_connection_outlives_the_receive_deadline_until_keepalive_timeout(
    serve: Serve,
) -> None:
    served = await serve(ROUTES, receive_timeout=0.5, keepalive_timeout=1.0)
    async with asyncio.timeout(5):
        loop = asyncio.get_running_loop()
        conn = await served.connect()
        conn.send(get("/hello"))
        await conn.answer()
        answered = loop.time()
        assert await conn.silent_for(0.75)  # past receive_timeout, still open
        await conn.closed()
        assert 1.0 <= loop.time() - answered <= 1.0 + SWEEP_S + 0.15


# --- disconnects and backpressure ------------------------------------------------------


async def test_a_client_that_disconnects_cancels_its_handler(serve: Serve) -> None:
    gate = Gate()
    served = await serve({"/wait": gate.handler})
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/wait"))
        await gate.entered.wait()
        conn.writer.close()
        await gate.cancelled.wait()
        assert not served.server.connections


async def test_writing_to_a_client_that_went_away_raises_connection_reset(serve: Serve) -> None:
    entered = asyncio.Event()
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def keeps_writing(request: Request) -> Stream:
        stream = Stream(request)
        stream.start(b"data: 1\n\n")
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # the client went away; a handler may still write
            try:
                await stream.write(b"data: 2\n\n")
                outcome.set_result("written")
            except ConnectionResetError:
                outcome.set_result("reset")
            raise
        return stream

    served = await serve({"/events": keeps_writing})
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/events"))
        await entered.wait()
        conn.writer.close()
        assert await outcome == "reset"


async def test_a_stream_waits_for_a_client_that_does_not_read(serve: Serve) -> None:
    chunk = b"x" * (1 << 16)
    count = 256  # 16 MB: far more than the sockets between them hold
    sent = [0]
    most_buffered = [0]
    finished = asyncio.Event()

    async def firehose(request: Request) -> Stream:
        stream = Stream(request, content_type="application/octet-stream")
        transport = request.transport
        assert transport is not None
        for _ in range(count):
            await stream.write(chunk)
            sent[0] += len(chunk)
            most_buffered[0] = max(most_buffered[0], transport.get_write_buffer_size())
        await stream.write_eof()
        finished.set()
        return stream

    served = await serve({"/firehose": firehose})
    async with asyncio.timeout(5):
        conn = await served.connect(rcvbuf=1 << 16)
        conn.send(get("/firehose"))
        await conn.head()
        await asyncio.sleep(0.2)  # not reading
        stalled_at = sent[0]
        await asyncio.sleep(0.1)
        assert sent[0] == stalled_at < count * len(chunk)
        assert not finished.is_set()
        assert most_buffered[0] <= 4 * len(chunk)  # the transport's buffer stays bounded
        assert len(await conn.chunked_body()) == count * len(chunk)  # reading resumes it
        assert finished.is_set()


# --- shutdown --------------------------------------------------------------------------


async def test_pre_shutdown_closes_idle_connections_now_and_busy_ones_after_their_answer(
    serve: Serve,
) -> None:
    gate = Gate()
    served = await serve({"/hello": hello, "/wait": gate.handler})
    async with asyncio.timeout(5):
        idle = await served.connect()
        idle.send(get("/hello"))
        await idle.answer()
        busy = await served.connect()
        busy.send(get("/wait"))
        await gate.entered.wait()

        served.server.pre_shutdown()
        async with asyncio.timeout(0.2):
            assert await idle.rest() == b""
        assert await busy.silent_for(0.1)
        gate.opened.set()
        head, body = await busy.answer()
        assert head.headers["connection"] == "close" and body == b"done"
        assert await busy.rest() == b""
        assert not gate.cancelled.is_set()

        late = await served.connect()  # still listening: answered once, then closed
        late.send(get("/hello"))
        head, body = await late.answer()
        assert head.headers["connection"] == "close" and body == HELLO
        assert await late.rest() == b""


async def test_shutdown_lets_answers_end_within_grace_and_cancels_the_rest(serve: Serve) -> None:
    stuck = Gate()  # never opened
    slow = Gate()
    served = await serve({"/stuck": stuck.handler, "/slow": slow.handler})
    async with asyncio.timeout(5):
        a = await served.connect()
        a.send(get("/stuck"))
        b = await served.connect()
        b.send(get("/slow"))
        await stuck.entered.wait()
        await slow.entered.wait()

        loop = asyncio.get_running_loop()
        loop.call_later(0.1, slow.opened.set)
        started = loop.time()
        await served.server.shutdown(0.3)
        assert 0.3 <= loop.time() - started < 0.3 + 0.2
        assert stuck.cancelled.is_set() and not slow.cancelled.is_set()
        assert (await b.answer())[1] == b"done"
        await a.closed()
        assert not served.server.connections


# --- found in review -------------------------------------------------------------------


async def test_no_100_continue_to_an_http_1_0_client(serve: Serve) -> None:
    served = await serve(ROUTES)
    async with asyncio.timeout(5):
        conn = await served.connect()
        head = b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        conn.send(head)
        assert await conn.silent_for(0.2)  # HTTP/1.0 has no 1xx: the client just sends
        conn.send(b"hello")
        head_, body = await conn.answer()
        assert head_.status == "HTTP/1.1 200 OK" and body == b"hello"


async def test_requests_held_back_past_the_queue_limit_are_answered_one_at_a_time(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """33 pipelined requests pause reading; more arrive meanwhile (one with a body).
    Resuming must not start a second answer while one runs: all come back in order."""
    made = Connection.connection_made

    def big_buffer(self: Connection, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # one read takes all
        made(self, transport)

    monkeypatch.setattr(Connection, "connection_made", big_buffer)
    running: list[str] = []
    overlap: list[str] = []

    async def numbered(request: Request) -> Response:
        if running:
            overlap.append(request.path)
        running.append(request.path)
        body = await request.read(1 << 20)
        await asyncio.sleep(0.2 if request.path == "/n/0" else 0.001)
        running.remove(request.path)
        return Response(200, request.path.encode() + b" %d" % len(body))

    routes = {f"/n/{i}": numbered for i in (*range(33), *range(100, 120), *range(200, 205))}
    served = await serve(routes)
    async with asyncio.timeout(10):
        conn = await served.connect()
        conn.send(b"".join(get(f"/n/{i}") for i in range(33)))
        await asyncio.sleep(0.1)  # the queue is full: reading is paused
        later = [get(f"/n/{i}") for i in range(100, 120)]
        later.append(post("/n/200", b"a" * 200_000))
        later += [get(f"/n/{i}") for i in range(201, 205)]
        conn.send(b"".join(later))
        order = [*range(33), *range(100, 120), *range(200, 205)]
        answers = [(await conn.answer())[1] for _ in order]
    assert answers[:53] == [b"/n/%d 0" % i for i in order[:53]]
    assert answers[53] == b"/n/200 200000"
    assert answers[54:] == [b"/n/%d 0" % i for i in order[54:]]
    assert overlap == []


async def test_shutdown_lets_an_answer_already_written_go_out(serve: Serve) -> None:
    size = 20_000_000

    async def big(request: Request) -> Response:
        return Response(200, b"x" * size, content_type="application/octet-stream")

    served = await serve({"/big": big})
    async with asyncio.timeout(10):
        conn = await served.connect(rcvbuf=65536)
        conn.send(get("/big"))
        await asyncio.sleep(0.2)  # answered: most of it waits in the server's buffer
        served.server.pre_shutdown()
        await served.server.shutdown(0.5)
        head, body = await conn.answer()
    assert head.status == "HTTP/1.1 200 OK" and len(body) == size


async def test_an_empty_line_after_a_request_does_not_cut_its_stream(serve: Serve) -> None:
    served = await serve({"/slow": slow_stream}, receive_timeout=0.3)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/slow"))
        await asyncio.sleep(0.05)
        conn.send(b"\r\n")  # allowed between requests (RFC 9112, 2.2): no request starts
        _, body = await conn.answer()
    assert body == b"".join(b"data: %d\n\n" % i for i in range(8))


async def test_a_pipelined_request_s_clock_waits_for_the_answer_before_it(serve: Serve) -> None:
    """Bytes of the next request arriving during a long answer do not cut that answer;
    once it is out, the next request must be whole within the limit."""
    served = await serve({**ROUTES, "/slow": slow_stream}, receive_timeout=0.3)
    async with asyncio.timeout(5):
        conn = await served.connect()
        conn.send(get("/slow"))
        await asyncio.sleep(0.05)
        conn.send(b"GET /hello HTTP/1.1\r\n")  # the next request, begun and not finished
        _, body = await conn.answer()
        assert body == b"".join(b"data: %d\n\n" % i for i in range(8))
        loop = asyncio.get_running_loop()
        done = loop.time()
        await conn.closed()  # the unfinished request now runs out of time
        assert loop.time() - done <= 0.3 + SWEEP_S + 0.15


async def slow_stream(request: Request) -> Stream:
    """Eight frames over about 0.8 s: longer than the tests' receive_timeout."""
    stream = Stream(request)
    for i in range(8):
        await stream.write(b"data: %d\n\n" % i)
        await asyncio.sleep(0.1)
    await stream.write_eof()
    return stream
