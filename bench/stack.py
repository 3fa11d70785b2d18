"""What a scenario talks to: emulated nodes, cortex, nginx, each reachable as a :class:`Target`.

``direct`` is the node itself, the baseline every proxy is compared against.
Each proxy runs on the proxy CPU of the :class:`~bench.procs.Layout`; the node
runs next to the load generator so that it costs every target the same.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Layout, Proc, Procs, free_port, http_ok, wait_until

MODEL = "bench/model"
PROMPT = [{"role": "user", "content": "Say something."}]


@dataclass(frozen=True)
class NodeSpec:
    """An emulated mistral.rs node: `instant` answers as fast as it can write."""

    answer_tokens: int
    instant: bool = True
    tok_per_s: float = 50.0


@dataclass
class Target:
    """Something to send requests to: a base URL, extra headers, the process behind it."""

    name: str
    base: str
    proc: Proc | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.base + path


def _cortex(*args: str) -> list[str]:
    return [sys.executable, "-m", "cortex", "--log-level", "warning", *args]


def start_node(procs: Procs, spec: NodeSpec, layout: Layout) -> Target:
    port = free_port()
    model = f"{MODEL}:1024:0:{spec.tok_per_s:g}"
    argv = _cortex("sim", "--port", str(port))
    argv += ["--model", model, "--answer-tokens", str(spec.answer_tokens), "--max-seqs", "100000"]
    if spec.instant:
        argv.append("--instant")
    proc = procs.start("node", argv, layout.node)
    target = Target("direct", f"http://127.0.0.1:{port}", proc)
    wait_until(proc, lambda: http_ok(target.url("/health")), what="healthy")
    return target


def start_cortex(procs: Procs, node: Target, layout: Layout) -> Target:
    port, metrics_port = free_port(), free_port()
    conf = procs.workdir / "cortex.toml"
    conf.write_text(
        "[gateway]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        "[poll]\ninterval_s = 5.0\n"
        '[[nodes]]\nname = "n1"\n'
        f'endpoint = "{node.base}"\n'
    )
    proc = procs.start("cortex", _cortex("serve", "--config", str(conf)), layout.proxy)
    return ready(Target("cortex", f"http://127.0.0.1:{port}", proc))


_NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream node {{
        server {upstream};
        keepalive 2048;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def start_nginx(procs: Procs, node: Target, layout: Layout) -> Target | None:
    """nginx (one worker) as a plain ``proxy_pass`` in front of the node, or None if absent."""
    binary = nginx_binary()
    if binary is None:
        return None
    prefix = procs.workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    upstream = node.base.removeprefix("http://")
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(prefix=prefix, port=port, upstream=upstream))
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-error.log")]
    proc = procs.start("nginx", argv, layout.proxy)
    return ready(Target("nginx", f"http://127.0.0.1:{port}", proc))


def ready(target: Target, timeout_s: float = 60.0) -> Target:
    """Wait until a real chat completion through ``target`` answers 200."""
    assert target.proc is not None
    wait_until(target.proc, lambda: completion_ok(target), timeout_s, what="answering completions")
    return target


def request_body(max_tokens: int, stream: bool) -> bytes:
    """A chat request; the same keys make a valid Anthropic Messages request."""
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "stream": stream}
    return json.dumps(body, separators=(",", ":")).encode()


def post(target: Target, path: str, body: bytes, timeout_s: float = 5.0) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **target.headers}
    req = urllib.request.Request(target.url(path), data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def completion_ok(target: Target) -> bool:
    status, _ = post(target, "/v1/chat/completions", request_body(4, stream=False), timeout_s=2.0)
    return status == 200


def check_stream(target: Target, path: str, body: bytes, tokens: int) -> str | None:
    """One streaming request through ``target``: None if it carried ``tokens`` deltas and ended
    properly, else what was wrong. Run before measuring, so that a fast broken proxy fails."""
    status, raw = post(target, path, body, timeout_s=30.0)
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    if path.endswith("/messages"):
        deltas = raw.count(b'"type":"text_delta"') or raw.count(b'"type": "text_delta"')
        end = b"message_stop" in raw
    else:
        deltas = raw.count(b'"content":"')
        end = raw.rstrip().endswith(b"data: [DONE]")
    if deltas < tokens or not end:
        return (
            f"{deltas} content deltas (wanted {tokens}), terminator {'seen' if end else 'missing'}"
        )
    return None
