"""The gateway's configuration: TOML file + ``CORTEX_*`` environment + defaults.

Decoded straight into msgspec Structs, so an unknown key or a wrong type is
rejected with its path. Checks that span several keys (duplicate node names,
a pin that cannot fit on its node, URLs, listen addresses) run after decoding.
Every error names the file and the key: ``cortex.toml: nodes[1].vram_mb: ...``.

Environment overrides: ``CORTEX_<SECTION>__<KEY>=value``, e.g.
``CORTEX_GATEWAY__LISTEN=127.0.0.1:8001`` or ``CORTEX_NODES__0__ENDPOINT=...``.
A value is read as a TOML value when it parses as one (numbers, booleans,
arrays), else as a plain string.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import tomli_w

DEFAULT_PATHS = (Path("cortex.toml"), Path("/etc/cortex/cortex.toml"))
ENV_PREFIX = "CORTEX_"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names file and key."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Gateway(_Strict):
    listen: str = "0.0.0.0:8000"
    metrics_listen: str = "0.0.0.0:9100"
    api_keys: list[str] = msgspec.field(default_factory=list)
    api_keys_file: str = ""
    admin_key: str = ""
    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 120.0
    queue_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    client_timeout_s: float = 60.0
    max_body_mb: int = 50
    tls_cert: str = ""
    tls_key: str = ""


class Poll(_Strict):
    interval_s: float = 5.0
    timeout_s: float = 2.0
    down_after: int = 2


class Eviction(_Strict):
    strategy: Literal["lru", "priority"] = "lru"
    defrag_after_cycles: int = 50
    grace_s: float = 30.0
    max_load_attempts: int = 3


class Node(_Strict):
    name: str
    endpoint: str
    vram_mb: int = 0
    pinned: list[str] = msgspec.field(default_factory=list)
    agent: str = ""
    agent_token: str = ""
    api_key: str = ""
    anthropic: Literal["translate", "native", "auto"] = "translate"


class Model(_Strict):
    id: str
    vram_mb: int = 0
    priority: int = 0
    aliases: list[str] = msgspec.field(default_factory=list)
    max_tokens: int = 0


class Agent(_Strict):
    """Settings of ``cortex agent``, the sidecar on each GPU node."""

    listen: str = "0.0.0.0:9200"
    token: str = ""
    unit: str = "mistralrs.service"
    node_url: str = "http://127.0.0.1:8080"
    restart_timeout_s: float = 600.0


class Config(_Strict):
    gateway: Gateway = msgspec.field(default_factory=Gateway)
    poll: Poll = msgspec.field(default_factory=Poll)
    eviction: Eviction = msgspec.field(default_factory=Eviction)
    nodes: list[Node] = msgspec.field(default_factory=list)
    models: list[Model] = msgspec.field(default_factory=list)
    model_map: dict[str, str] = msgspec.field(default_factory=dict)
    agent: Agent = msgspec.field(default_factory=Agent)

    def model(self, model_id: str) -> Model | None:
        """The ``[[models]]`` facts for ``model_id``, if any were given."""
        for m in self.models:
            if m.id == model_id:
                return m
        return None

    def node(self, name: str) -> Node | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, decode and validate a config.

    With no ``path``, the first of :data:`DEFAULT_PATHS` that exists is used;
    with none existing, defaults (and the environment) alone.
    """
    env = os.environ if env is None else env
    source = _resolve_path(path)
    raw = _read_toml(source) if source else {}
    label = str(source) if source else "<defaults>"
    apply_env(raw, env, label)
    return decode(raw, label)


def decode(raw: dict[str, Any], label: str = "<config>") -> Config:
    """Decode and validate a config from already-parsed TOML data."""
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{label}: {_explain(str(exc))}") from None
    problems = validate(cfg)
    if problems:
        raise ConfigError("\n".join(f"{label}: {p}" for p in problems))
    return cfg


def dump(cfg: Config) -> str:
    """The effective config as TOML."""
    data = msgspec.to_builtins(cfg)
    return tomli_w.dumps(data)


def warnings(cfg: Config) -> list[str]:
    """Things that work but that an operator should hear about."""
    out = []
    host, _ = split_hostport(cfg.gateway.listen)
    if not cfg.gateway.api_keys and not cfg.gateway.api_keys_file and not is_loopback(host):
        out.append(
            f"gateway.listen = {cfg.gateway.listen!r} is reachable from other machines and "
            "gateway.api_keys is empty: anyone who can reach it can use every model"
        )
    if not cfg.nodes:
        out.append("no [[nodes]] configured: every model request will fail")
    return out


def _resolve_path(path: Path | str | None) -> Path | None:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        return p
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes as UTF-8 first
        raise ConfigError(f"{path}: not UTF-8 text: byte {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


# --- environment overrides ---------------------------------------------------


def apply_env(raw: dict[str, Any], env: Mapping[str, str], label: str) -> None:
    """Apply ``CORTEX_SECTION__KEY`` overrides onto parsed TOML data, in place."""
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in parts):
            raise ConfigError(f"{label}: environment variable {name}: empty key segment")
        _set_path(raw, parts, _env_value(env[name]), name)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(raw: dict[str, Any], parts: list[str], value: Any, var: str) -> None:
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        node = _step(node, part, want_list=nxt.isdigit(), var=var)
    last = parts[-1]
    if isinstance(node, list):
        _list_index(node, last, var)
        node[int(last)] = value
    else:
        node[last] = value


def _step(node: Any, part: str, *, want_list: bool, var: str) -> Any:
    if isinstance(node, list):
        idx = _list_index(node, part, var)
        return node[idx]
    if part not in node:
        node[part] = [] if want_list else {}
    return node[part]


def _list_index(node: list[Any], part: str, var: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"environment variable {var}: no entry {part} (there are {len(node)})")
    return int(part)


# --- validation --------------------------------------------------------------

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _explain(msg: str) -> str:
    """Turn msgspec's ``Expected int, got str - at `$.a[0].b``` into ``a[0].b: ...``."""
    m = _PATH.search(msg)
    text = msg[: m.start()] if m else msg
    path = m.group("path").lstrip(".") if m else ""
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", text)
    if unknown:
        key = f"{path}.{unknown.group('key')}" if path else unknown.group("key")
        return f"{key}: unknown key"
    missing = re.match(r"Object missing required field `(?P<key>[^`]+)`", text)
    if missing:
        key = f"{path}.{missing.group('key')}" if path else missing.group("key")
        return f"{key}: required key is missing"
    return f"{path or '<top level>'}: {text}"


def validate(cfg: Config) -> list[str]:
    """Checks that span keys; each problem names its key path."""
    problems: list[str] = []
    problems += _check_gateway(cfg.gateway)
    problems += _check_positive(
        ("poll.interval_s", cfg.poll.interval_s),
        ("poll.timeout_s", cfg.poll.timeout_s),
        ("poll.down_after", cfg.poll.down_after),
        ("eviction.max_load_attempts", cfg.eviction.max_load_attempts),
    )
    if cfg.eviction.defrag_after_cycles < 0:
        problems.append("eviction.defrag_after_cycles: must be >= 0 (0 disables)")
    if cfg.eviction.grace_s < 0:
        problems.append("eviction.grace_s: must be >= 0")
    problems += _check_nodes(cfg)
    problems += _check_models(cfg)
    problems += _check_model_map(cfg)
    return problems


def _check_gateway(gw: Gateway) -> list[str]:
    problems = []
    for key in ("listen", "metrics_listen"):
        value = getattr(gw, key)
        try:
            split_hostport(value)
        except ValueError as exc:
            problems.append(f"gateway.{key}: {exc}")
    problems += _check_positive(
        ("gateway.connect_timeout_s", gw.connect_timeout_s),
        ("gateway.first_byte_timeout_s", gw.first_byte_timeout_s),
        ("gateway.idle_timeout_s", gw.idle_timeout_s),
        ("gateway.queue_timeout_s", gw.queue_timeout_s),
        ("gateway.client_timeout_s", gw.client_timeout_s),
        ("gateway.max_body_mb", gw.max_body_mb),
    )
    if gw.drain_timeout_s < 0:
        problems.append("gateway.drain_timeout_s: must be >= 0")
    if bool(gw.tls_cert) != bool(gw.tls_key):
        problems.append("gateway.tls_cert / gateway.tls_key: set both or neither")
    for i, key in enumerate(gw.api_keys):
        if not key or key != key.strip():
            problems.append(f"gateway.api_keys[{i}]: empty or surrounded by white space")
    return problems


def _check_positive(*pairs: tuple[str, float]) -> list[str]:
    return [f"{key}: must be > 0, got {value}" for key, value in pairs if value <= 0]


def _check_nodes(cfg: Config) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for i, node in enumerate(cfg.nodes):
        where = f"nodes[{i}]"
        if not node.name:
            problems.append(f"{where}.name: must not be empty")
        elif node.name in seen:
            problems.append(f"{where}.name: duplicate node name {node.name!r}")
        seen.add(node.name)
        problems += [f"{where}.endpoint: {p}" for p in _url_problems(node.endpoint)]
        if node.agent:
            problems += [f"{where}.agent: {p}" for p in _url_problems(node.agent)]
        if node.vram_mb < 0:
            problems.append(f"{where}.vram_mb: must be >= 0 (0 = unknown)")
        problems += _check_pins(cfg, node, where)
    return problems


def _check_pins(cfg: Config, node: Node, where: str) -> list[str]:
    problems = []
    pinned_mb = 0
    for j, model_id in enumerate(node.pinned):
        facts = cfg.model(model_id)
        size = facts.vram_mb if facts else 0
        pinned_mb += size
        if node.vram_mb and size > node.vram_mb:
            problems.append(
                f"{where}.pinned[{j}]: model {model_id!r} needs {size} MB "
                f"but node {node.name!r} has vram_mb = {node.vram_mb}"
            )
    if node.vram_mb and pinned_mb > node.vram_mb and not problems:
        problems.append(
            f"{where}.pinned: pinned models need {pinned_mb} MB together "
            f"but node {node.name!r} has vram_mb = {node.vram_mb}"
        )
    return problems


def _check_models(cfg: Config) -> list[str]:
    problems: list[str] = []
    names: dict[str, str] = {}
    for i, model in enumerate(cfg.models):
        where = f"models[{i}]"
        if not model.id:
            problems.append(f"{where}.id: must not be empty")
        if model.id in names:
            problems.append(f"{where}.id: {model.id!r} is described twice")
        names[model.id] = model.id
        if model.vram_mb < 0 or model.max_tokens < 0:
            problems.append(f"{where}: vram_mb and max_tokens must be >= 0")
        for j, alias in enumerate(model.aliases):
            if alias in names and names[alias] != model.id:
                problems.append(f"{where}.aliases[{j}]: {alias!r} already names {names[alias]!r}")
            names.setdefault(alias, model.id)
    return problems


def _check_model_map(cfg: Config) -> list[str]:
    problems = []
    for pattern, target in cfg.model_map.items():
        if not pattern or not target:
            problems.append(f"model_map.{pattern!r}: pattern and target must not be empty")
        elif any(c in target for c in "*?["):
            problems.append(
                f"model_map.{pattern!r}: target {target!r} must be a model, not a pattern"
            )
    return problems


def _url_problems(url: str) -> list[str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return [f"{url!r} is not an http:// or https:// URL"]
    if not parts.hostname:
        return [f"{url!r} has no host"]
    try:
        _ = parts.port
    except ValueError:
        return [f"{url!r} has an invalid port"]
    if parts.path not in ("", "/") or parts.query:
        return [f"{url!r}: give the node's base URL, without a path"]
    return []


def split_hostport(value: str) -> tuple[str, int]:
    """``"0.0.0.0:8000"`` -> ``("0.0.0.0", 8000)``; ``"[::1]:8000"`` works too."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{value!r} has no host")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def map_model(model_map: Mapping[str, str], name: str) -> str | None:
    """The fleet model a client's model name maps to: exact keys first, then globs in order."""
    exact = model_map.get(name)
    if exact is not None:
        return exact
    for pattern, target in model_map.items():
        if fnmatch.fnmatchcase(name, pattern):
            return target
    return None
