"""The ``cortex`` command. Click lives here and nowhere else."""

from __future__ import annotations

import contextlib
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import orjson

from cortex import __version__, config, logs


def _run(coro: Any) -> None:
    """Run a coroutine on uvloop; Ctrl-C ends it quietly."""
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(coro)


def _load(path: str | None) -> config.Config:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _resolved(path: str | None) -> Path | None:
    """The file ``config.load(path)`` reads, if any."""
    if path:
        return Path(path)
    return next((p for p in config.DEFAULT_PATHS if p.is_file()), None)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: ./cortex.toml, then /etc/cortex/cortex.toml).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cortex")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe level logged (to stderr).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object a line, for log shippers.",
)
def main(log_level: str, log_format: str) -> None:
    """cortex: one OpenAI + Anthropic API in front of a fleet of mistral.rs nodes."""
    logs.setup(log_level, log_format)  # type: ignore[arg-type]


@main.command()
@_config_option
def serve(config_path: str | None) -> None:
    """Run the gateway (API port and metrics port) until SIGTERM; SIGHUP reloads the config."""
    from cortex.app import serve as run_gateway

    cfg = _load(config_path)
    try:
        _run(run_gateway(cfg, _resolved(config_path)))
    except config.ConfigError as exc:  # TLS files, api_keys_file, a port in use
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The gateway.")
@click.option(
    "--admin-key", envvar="CORTEX_ADMIN_KEY", default="", help="gateway.admin_key, if set."
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw fleet JSON.")
def status(url: str, admin_key: str, as_json: bool) -> None:
    """Show the fleet of a running gateway: nodes, models, VRAM, in-flight requests."""
    from cortex.status import render_fleet

    req = urllib.request.Request(url.rstrip("/") + "/admin/fleet")
    if admin_key:
        req.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            fleet = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise click.ClickException(
            f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach the gateway at {url}: {exc}") from None
    if as_json:
        click.echo(orjson.dumps(fleet, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_fleet(fleet))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="ID[:SIZE_MB[:LOAD_S[:TOK_PER_S]]]",
    help="A model the node serves (repeatable). Default: one 4 GB model.",
)
@click.option(
    "--vram-mb", default=24576, show_default=True, type=int, help="The node's VRAM budget."
)
@click.option(
    "--max-seqs",
    default=32,
    show_default=True,
    type=int,
    help="Sequences run at once; the rest queue.",
)
@click.option("--answer-tokens", default=None, type=int, help="Tokens per answer (all models).")
@click.option("--unloaded", multiple=True, metavar="ID", help="Start this model unloaded.")
@click.option("--instant", is_flag=True, help="No token pacing (throughput benchmarks).")
@click.option("--native-messages", is_flag=True, help="Serve /v1/messages like newer nodes.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KNOB=VALUE",
    help="Start with a fault knob set, e.g. drop_after_chunks=5, no_done=true, stall=true.",
)
def sim(
    host: str,
    port: int,
    models: tuple[str, ...],
    vram_mb: int,
    max_seqs: int,
    answer_tokens: int | None,
    unloaded: tuple[str, ...],
    instant: bool,
    native_messages: bool,
    faults: tuple[str, ...],
) -> None:
    """Run one emulated mistral.rs node (quirks included) for tests, demos and capacity planning."""
    from cortex import sim as simnode

    try:
        specs = [simnode.SimModel.parse(m) for m in models] or [simnode.SimModel("sim/model-4b")]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    for m in specs:
        if m.id in unloaded:
            m.loaded = False
        if answer_tokens is not None:
            m.answer_tokens = answer_tokens
    cfg = simnode.SimConfig(
        models=specs,
        vram_mb=vram_mb,
        max_seqs=max_seqs,
        instant=instant,
        native_messages=native_messages,
    )
    fault_values = dict(_parse_fault(f) for f in faults)
    _run(simnode.serve_forever(cfg, host, port, faults=fault_values))


def _parse_fault(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise click.BadParameter(f"{text!r} is not KNOB=VALUE", param_hint="--fault")
    try:
        return key, orjson.loads(value)
    except orjson.JSONDecodeError:
        return key, value


@main.command()
@click.option("--port", default=8000, show_default=True, type=int, help="The gateway's API port.")
@click.option(
    "--metrics-port", default=9100, show_default=True, type=int, help="The Prometheus port."
)
@click.option(
    "--node-port-base",
    default=18081,
    show_default=True,
    type=int,
    help="The three emulated nodes listen on this port and the next two (0: free ports).",
)
def demo(port: int, metrics_port: int, node_port_base: int) -> None:
    """Start three emulated nodes and a gateway in front of them, on loopback."""
    from cortex.demo import run_demo

    node_ports = tuple(node_port_base + i if node_port_base else 0 for i in range(3))
    try:
        _run(run_demo(port, metrics_port, node_ports))
    except (config.ConfigError, OSError) as exc:  # a port in use
        raise click.ClickException(str(exc)) from None


@main.command()
@_config_option
def agent(config_path: str | None) -> None:
    """Run the node agent next to `mistralrs serve` (GPU facts, defrag restarts)."""
    from cortex import agent as node_agent

    cfg = _load(config_path)
    try:
        _run(node_agent.serve(cfg.agent))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.group("config")
def config_group() -> None:
    """Check or print the configuration."""


@config_group.command("check")
@_config_option
def config_check(config_path: str | None) -> None:
    """Validate the config (file + CORTEX_* env) and the files it names; exit 1 on errors."""
    from cortex.app import check_files

    cfg = _load(config_path)
    try:
        check_files(cfg, str(_resolved(config_path) or "<defaults>"))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for warning in config.warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    nodes = ", ".join(n.name for n in cfg.nodes) or "none"
    click.echo(f"config OK: {len(cfg.nodes)} node(s) ({nodes}), {len(cfg.models)} model fact(s)")


@config_group.command("show")
@_config_option
def config_show(config_path: str | None) -> None:
    """Print the effective config (file + environment + defaults) as TOML."""
    click.echo(config.dump(_load(config_path)), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
