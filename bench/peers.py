"""Peer gateways, each in its own venv under ``bench/.peers/``: installed on request, started
in front of the same emulated node as cortex when present, skipped (with the reason) when not.
"""

from __future__ import annotations

import math
import subprocess
import sys
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import scenarios
from bench.measure import Series, note, start_proxies
from bench.procs import Layout, ProcessDied, Procs, free_port
from bench.report import Check, Outcome, fmt, ratio
from bench.settings import Settings
from bench.stack import MODEL, Target, ready, start_node

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
LITELLM_KEY = "sk-bench-local"


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str
    """What ``pip install`` gets; LiteLLM is pinned below 1.82.7, the two releases of
    March 2026 that carried a credential stealer."""
    command: str

    @property
    def venv(self) -> Path:
        return PEERS_DIR / self.name

    @property
    def binary(self) -> Path:
        return self.venv / "bin" / self.command

    def installed(self) -> bool:
        return self.binary.is_file()


PEERS = (
    Peer("vllm-router", "vllm-router", "vllm-router"),
    Peer("litellm", "litellm[proxy]==1.82.6", "litellm"),
)


def install(names: list[str] | None = None) -> dict[str, str]:
    """Create each peer's venv and pip-install it; returns ``{name: "ok" | why it failed}``."""
    outcome = {}
    for peer in PEERS:
        if names and peer.name not in names:
            continue
        print(f"installing {peer.name} ({peer.requirement}) into {peer.venv} ...", flush=True)
        if not (peer.venv / "bin" / "python").exists():
            venv.create(peer.venv, with_pip=True)
        pip = [str(peer.venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade"]
        done = subprocess.run([*pip, "pip", peer.requirement], capture_output=True, text=True)
        if done.returncode == 0 and peer.installed():
            outcome[peer.name] = "ok"
        else:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            outcome[peer.name] = "pip failed: " + " | ".join(tail)
        print(f"  {peer.name}: {outcome[peer.name]}", flush=True)
    return outcome


def _start_vllm_router(peer: Peer, procs: Procs, node: Target, layout: Layout) -> Target:
    port = free_port()
    argv = [str(peer.binary), "--worker-urls", node.base, "--policy", "round_robin"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    proc = procs.start(peer.name, argv, layout.proxy)
    return ready(Target(peer.name, f"http://127.0.0.1:{port}", proc))


def _start_litellm(peer: Peer, procs: Procs, node: Target, layout: Layout) -> Target:
    port = free_port()
    conf = procs.workdir / "litellm.yaml"
    conf.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {node.base}/v1\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {
        "LITELLM_MASTER_KEY": LITELLM_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
    }
    argv = [str(peer.binary), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    proc = procs.start(peer.name, argv, layout.proxy, env=env, cwd=procs.workdir)
    headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
    return ready(Target(peer.name, f"http://127.0.0.1:{port}", proc, headers), timeout_s=120.0)


STARTERS: dict[str, Callable[[Peer, Procs, Target, Layout], Target]] = {
    "vllm-router": _start_vllm_router,
    "litellm": _start_litellm,
}


def installed() -> list[Peer]:
    return [p for p in PEERS if p.installed()]


def missing_reason() -> str:
    names = ", ".join(p.name for p in PEERS if not p.installed())
    return f"not installed: {names} (run `{Path(sys.executable).name} -m bench --install-peers`)"


def scenario(s: Settings) -> Outcome:
    """The overhead and relay loads against vllm-router and LiteLLM, next to cortex and nginx."""
    out = Outcome("peers")
    present = installed()
    if not present:
        out.skipped = missing_reason()
        return out
    if len(present) < len(PEERS):
        note(out, missing_reason())
    relay_table = scenarios.relay_table(s)
    specs = [scenarios.INSTANT_NODE] + ([scenarios.CHUNKED_NODE] if s.peer_chunked else [])
    for spec in specs:
        v = scenarios.relay_variants(spec)[0]
        with Procs(s.workdir / f"peers-{v.label.replace(' ', '')}") as procs:
            node = start_node(procs, spec, s.layout)
            targets = start_proxies(procs, node, s, out) + _start_peers(
                present, procs, node, s, out
            )
            if spec.instant:
                over = scenarios.measure_overhead(s, targets, node, out, s.peer_overhead_rounds)
                table, added = scenarios.overhead_table(over)
                out.tables.append(table)
                out.data["overhead"] = scenarios.dump(over)
            relay = scenarios.measure_relay(s, targets, node, v, out)
        scenarios.add_relay_rows(relay_table, v.label, relay)
        out.data[v.label] = scenarios.dump(relay)
        if spec.instant:
            out.checks += _checks(added, relay, v.label)
    out.tables.append(relay_table)
    return out


def _start_peers(
    present: list[Peer], procs: Procs, node: Target, s: Settings, out: Outcome
) -> list[Target]:
    started = []
    for peer in present:
        try:
            started.append(STARTERS[peer.name](peer, procs, node, s.layout))
        except ProcessDied as exc:
            note(out, f"{peer.name} did not start, left out: {exc.brief()}")
    return started


def _checks(added: dict[str, float], relay: dict[str, Series], label: str) -> list[Check]:
    rps = {name: x.med(lambda r: r.rps) for name, x in relay.items()}
    cortex, router = rps.get("cortex", math.nan), rps.get("vllm-router", math.nan)
    lat = added.get("cortex", math.nan)
    return [
        Check(
            f"peers: cortex req/s vs vllm-router ({label})",
            f"{fmt(ratio(cortex, router))} x vllm-router",
            ">= 1.0 x vllm-router",
            cortex >= router,
        ),
        Check("peers: cortex added p50 latency", f"{fmt(lat, 3)} ms", "<= 0.25 ms", lat <= 0.25),
    ]
