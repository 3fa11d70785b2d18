"""``cortex agent``: the sidecar on each GPU node.

It does the two things the gateway cannot do over the network: read the GPUs'
real memory use (``GET /gpu``, from ``nvidia-smi``) and restart the node's
``mistralrs serve`` unit to defragment VRAM (``POST /restart``, through
``systemctl``, answering once the node's ``/health`` is 200 again).

Every route but ``/health`` needs ``Authorization: Bearer <agent.token>``, the
value the gateway has as ``nodes[].agent_token``. An agent without a token only
starts when it listens on loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import shutil
import signal
import time
from asyncio.subprocess import DEVNULL, PIPE

import aiohttp
import msgspec
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from cortex import config, notify

log = logging.getLogger(__name__)

GPU_QUERY = (
    "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
    "--format=csv,noheader,nounits",
)
_GPU_TIMEOUT_S = 10.0
_HEALTH_POLL_S = 0.25
_HEALTH_REQUEST_TIMEOUT_S = 5.0
_JSON = "application/json"
_HEALTH_BODY = b'{"status":"ok"}'


class Gpu(msgspec.Struct, frozen=True):
    """One GPU as ``nvidia-smi`` reports it; memory in MiB (what config calls ``vram_mb``)."""

    index: int
    name: str
    memory_used_mb: int | None
    memory_total_mb: int | None
    utilization_pct: int | None


class GpuReport(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of ``GET /gpu``: the GPUs, or why there are none to report."""

    available: bool
    gpus: list[Gpu] = []
    reason: str = ""


def problems(cfg: config.Agent) -> list[str]:
    """What keeps this agent config from being served; each problem names its key."""
    try:
        host, _ = config.split_hostport(cfg.listen)
    except ValueError as exc:
        return [f"agent.listen: {exc}"]
    out = []
    if not cfg.token and not config.is_loopback(host):
        out.append(
            f"agent.token is empty and agent.listen = {cfg.listen!r} is reachable from other "
            f"machines: refusing to start, since anyone could restart {cfg.unit}. Set agent.token "
            "(or CORTEX_AGENT__TOKEN) to the gateway's nodes[].agent_token, "
            "or listen on 127.0.0.1"
        )
    if not cfg.unit or cfg.unit.startswith("-"):
        out.append(f"agent.unit: {cfg.unit!r} is not a systemd unit name")
    if cfg.restart_timeout_s <= 0:
        out.append(f"agent.restart_timeout_s: must be > 0, got {cfg.restart_timeout_s}")
    return out


def build_app(
    cfg: config.Agent, *, systemctl: str = "systemctl", nvidia_smi: str = "nvidia-smi"
) -> web.Application:
    """The agent's routes; raises :class:`config.ConfigError` for an unsafe or broken config."""
    found = problems(cfg)
    if found:
        raise config.ConfigError("\n".join(found))
    if not cfg.token:
        log.warning("agent.token is empty: any local process may restart %s", cfg.unit)
    agent = _Agent(cfg, systemctl, nvidia_smi)
    app = web.Application(middlewares=[_bearer_auth(cfg.token)] if cfg.token else [])
    app.router.add_get("/health", _health)
    app.router.add_get("/gpu", agent.gpu)
    app.router.add_post("/restart", agent.restart)
    return app


async def serve(cfg: config.Agent) -> None:
    """Serve the agent until SIGINT or SIGTERM, telling systemd when it is ready."""
    app = build_app(cfg)
    host, port = config.split_hostport(cfg.listen)
    runner = web.AppRunner(app)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        await web.TCPSite(runner, host, port).start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        where = _url(runner.addresses[0])
        log.info("cortex agent listening on %s, restarts %s", where, cfg.unit)
        notify.status(f"listening on {where}, restarts {cfg.unit}")
        notify.ready()
        await stop.wait()
        notify.stopping()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def parse_gpus(text: str) -> list[Gpu]:
    """Parse ``nvidia-smi`` CSV (:data:`GPU_QUERY`); ``[N/A]`` fields become None."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5:
            raise ValueError(f"expected 5 fields, got {line!r}")
        used, total, util = (_count(f) for f in fields[-3:])
        # A name could hold a comma; the numbers around it cannot.
        gpus.append(Gpu(int(fields[0]), ", ".join(fields[1:-3]), used, total, util))
    return gpus


class _Agent:
    __slots__ = (
        "_health_url",
        "_nvidia_smi",
        "_restart_timeout_s",
        "_restarting",
        "_systemctl",
        "_unit",
    )

    def __init__(self, cfg: config.Agent, systemctl: str, nvidia_smi: str) -> None:
        self._systemctl = systemctl
        self._nvidia_smi = nvidia_smi
        self._health_url = cfg.node_url.rstrip("/") + "/health"
        self._restart_timeout_s = cfg.restart_timeout_s
        self._unit = cfg.unit
        self._restarting = False

    async def gpu(self, request: web.Request) -> web.Response:
        report = await self._query_gpus()
        return _json(report)

    async def _query_gpus(self) -> GpuReport:
        exe = shutil.which(self._nvidia_smi)
        if exe is None:
            return GpuReport(available=False, reason=f"{self._nvidia_smi} not found")
        try:
            async with asyncio.timeout(_GPU_TIMEOUT_S):
                code, out, err = await _run(exe, *GPU_QUERY)
        except TimeoutError:
            return GpuReport(False, reason=f"nvidia-smi did not answer within {_GPU_TIMEOUT_S} s")
        except OSError as exc:
            return GpuReport(False, reason=f"cannot run {exe}: {exc}")
        if code != 0:
            # nvidia-smi prints most failures ("couldn't communicate with the driver") on stdout.
            return GpuReport(False, reason=(err or out).strip() or f"{exe} exited with {code}")
        try:
            return GpuReport(True, gpus=parse_gpus(out))
        except ValueError as exc:
            return GpuReport(False, reason=f"unexpected nvidia-smi output: {exc}")

    async def restart(self, request: web.Request) -> web.Response:
        if self._restarting:
            return _json(_failed(self._unit, "a restart is already in progress"), 409)
        self._restarting = True
        try:
            return await self._restart()
        finally:
            self._restarting = False

    async def _restart(self) -> web.Response:
        unit, limit = self._unit, self._restart_timeout_s
        log.info("restarting %s", unit)
        start = time.monotonic()
        stuck = f"systemctl restart {unit} did not finish"
        try:
            async with asyncio.timeout(limit):
                # --no-ask-password: never block on a polkit password prompt.
                code, out, err = await _run(self._systemctl, "--no-ask-password", "restart", unit)
                if code != 0:
                    log.warning("systemctl restart %s failed (%d): %s", unit, code, err.strip())
                    failure = f"systemctl restart {unit} exited with {code}"
                    return _json(_failed(unit, failure, stderr=(err or out).strip()), 500)
                stuck = f"{self._health_url} did not answer 200"
                await self._wait_healthy()
        except TimeoutError:
            seconds = round(time.monotonic() - start, 3)
            failure = f"{stuck} within {limit} s"
            log.warning("restart of %s: %s", unit, failure)
            return _json(_failed(unit, failure, seconds=seconds), 504)
        except OSError as exc:
            return _json(_failed(unit, f"cannot run {self._systemctl}: {exc}"), 500)
        seconds = round(time.monotonic() - start, 3)
        log.info("restarted %s; healthy after %.1f s", unit, seconds)
        return _json({"unit": unit, "restarted": True, "seconds": seconds})

    async def _wait_healthy(self) -> None:
        # A fresh session: a pooled keep-alive connection would point at the old process.
        timeout = aiohttp.ClientTimeout(total=_HEALTH_REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(self._health_url) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(_HEALTH_POLL_S)


def _bearer_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/health":
            given = request.headers.get(hdrs.AUTHORIZATION, "")
            # surrogatepass: any header text encodes, and distinct texts stay distinct.
            if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
                return _json(
                    {"error": "missing or wrong Authorization: Bearer <agent.token>"},
                    401,
                    headers={hdrs.WWW_AUTHENTICATE: "Bearer"},
                )
        return await handler(request)

    return auth


async def _health(request: web.Request) -> web.Response:
    return web.Response(body=_HEALTH_BODY, content_type=_JSON)


async def _run(*argv: str) -> tuple[int, str, str]:
    """Run a program (no shell); its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        # Timed out or cancelled: reap the child rather than leave it running unseen.
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    code = await proc.wait()
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def _failed(unit: str, error: str, **extra: object) -> dict[str, object]:
    return {"unit": unit, "restarted": False, "error": error, **extra}


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type=_JSON, headers=headers
    )


def _count(field: str) -> int | None:
    # nounits still leaves "[N/A]" / "[Not Supported]" for what a GPU does not report.
    return None if field.startswith("[") else int(field)


def _url(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
