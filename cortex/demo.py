"""``cortex demo``: the seed's three-node fleet, emulated on loopback, behind a gateway.

The fleet is sized so that asking for models in turn shows eviction: each node
lists more models than fit in its VRAM, and one model per node is pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from cortex import config
from cortex.app import Gateway
from cortex.sim import SimConfig, SimModel, SimNode

NODE_PORTS = (18081, 18082, 18083)

FLEET: tuple[tuple[str, int, list[SimModel], list[str]], ...] = (
    (
        "gpu-large",
        49152,
        [
            SimModel("your-org/large-model", size_mb=30000, load_s=4.0, tok_per_s=25.0),
            SimModel("your-org/coder", size_mb=16000, load_s=3.0, tok_per_s=40.0),
            SimModel("your-org/vision", size_mb=16000, load_s=3.0, tok_per_s=40.0, loaded=False),
        ],
        ["your-org/large-model"],
    ),
    (
        "gpu-medium",
        24576,
        [
            SimModel("your-org/medium-model", size_mb=12000, load_s=3.0, tok_per_s=45.0),
            SimModel("your-org/chat-small", size_mb=8000, load_s=2.0, tok_per_s=70.0),
            SimModel("your-org/reasoner", size_mb=10000, load_s=3.0, tok_per_s=35.0, loaded=False),
        ],
        ["your-org/medium-model"],
    ),
    (
        "gpu-small",
        12288,
        [
            SimModel("your-org/embedding-model", size_mb=1000, load_s=1.0, tok_per_s=200.0),
            SimModel("your-org/tiny", size_mb=4000, load_s=1.5, tok_per_s=90.0),
            SimModel("your-org/draft", size_mb=8000, load_s=2.0, tok_per_s=80.0, loaded=False),
        ],
        ["your-org/embedding-model"],
    ),
)


def demo_config(
    port: int, metrics_port: int, node_ports: tuple[int, ...] = NODE_PORTS
) -> config.Config:
    """The gateway config of the demo fleet."""
    nodes = [
        {"name": name, "endpoint": f"http://127.0.0.1:{p}", "vram_mb": vram, "pinned": pinned}
        for (name, vram, _, pinned), p in zip(FLEET, node_ports, strict=True)
    ]
    models = [
        {"id": m.id, "vram_mb": m.size_mb, "aliases": [m.id.split("/")[1]]}
        for _, _, specs, _ in FLEET
        for m in specs
    ]
    return config.decode(
        {
            "gateway": {
                "listen": f"127.0.0.1:{port}",
                "metrics_listen": f"127.0.0.1:{metrics_port}",
            },
            "poll": {"interval_s": 2.0, "timeout_s": 1.0},
            "eviction": {"grace_s": 10.0},
            "nodes": nodes,
            "models": models,
            "model_map": {
                "claude-*opus*": "your-org/large-model",
                "claude-*sonnet*": "your-org/medium-model",
                "claude-*haiku*": "your-org/chat-small",
                "gpt-*": "your-org/medium-model",
            },
        },
        "<demo>",
    )


def _banner(port: int, metrics_port: int, node_ports: tuple[int, ...]) -> str:
    base = f"http://127.0.0.1:{port}"
    nodes = ", ".join(f"{name} :{p}" for (name, *_), p in zip(FLEET, node_ports, strict=True))
    return f"""
cortex demo: three emulated mistral.rs nodes behind a gateway at {base}
  nodes: {nodes}
  metrics: http://127.0.0.1:{metrics_port}/metrics

Try:
  curl {base}/v1/models
  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model":"coder","messages":[{{"role":"user","content":"hello"}}]}}'
  curl -N {base}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model":"vision","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}'
      (vision is not loaded: cortex evicts coder on gpu-large to load it)
  curl {base}/v1/messages -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \\
       -d '{{"model":"claude-opus-4","max_tokens":64,"messages":[{{"role":"user","content":"hi"}}]}}'
  cortex status --url {base}

  python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='x'); \\
print(c.chat.completions.create(model='tiny', messages=[{{'role':'user','content':'hi'}}]).choices[0].message.content)"

Ctrl-C stops everything.
"""


async def run_demo(
    port: int = 8000, metrics_port: int = 9100, node_ports: tuple[int, ...] = NODE_PORTS
) -> None:
    """Run the demo fleet until Ctrl-C or SIGTERM; port 0 (anywhere) picks a free port."""
    nodes = [
        SimNode(SimConfig(models=specs, vram_mb=vram, name=name)) for name, vram, specs, _ in FLEET
    ]
    try:
        for node, p in zip(nodes, node_ports, strict=True):
            await node.start("127.0.0.1", p)
        node_ports = tuple(node.port for node in nodes)
        gateway = Gateway(demo_config(port, metrics_port, node_ports))
        await gateway.start()
        try:
            print(_banner(gateway.port, gateway.metrics.bound_port, node_ports), flush=True)
            await _until_signalled()
        finally:
            await gateway.stop()
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.stop()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
