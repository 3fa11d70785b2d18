"""Config: the shipped file, strict decoding, cross-key checks, env overrides, dump."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cortex import config
from cortex.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path, env or {})
    return str(info.value)


def test_shipped_config_is_the_seed_fleet() -> None:
    cfg = config.load(REPO / "cortex.toml", {})
    assert [n.name for n in cfg.nodes] == ["gpu-large", "gpu-medium", "gpu-small"]
    assert [n.vram_mb for n in cfg.nodes] == [49152, 24576, 12288]
    assert cfg.nodes[0].pinned == ["your-org/large-model"]
    assert cfg.eviction.strategy == "lru" and cfg.eviction.defrag_after_cycles == 50
    assert cfg.gateway.listen == "0.0.0.0:8000" and cfg.gateway.metrics_listen == "0.0.0.0:9100"


def test_defaults_when_sections_are_absent(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), {})
    assert cfg.gateway.first_byte_timeout_s == 600.0
    assert cfg.gateway.queue_timeout_s == 300.0
    assert cfg.poll.down_after == 2
    assert cfg.eviction.grace_s == 30.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway]\nlisten_port = 1\n", "gateway.listen_port: unknown key"),
        ("[[nodes]]\nname='a'\nendpoint='http://a:1'\nvram='x'\n", "nodes[0].vram: unknown key"),
        (
            "[[nodes]]\nname='a'\nendpoint='http://a:1'\nvram_mb='lots'\n",
            "nodes[0].vram_mb: Expected `int`, got `str`",
        ),
        ("[[nodes]]\nname='a'\n", "nodes[0].endpoint: required key is missing"),
        ("[eviction]\nstrategy='fifo'\n", "eviction.strategy: Invalid enum value 'fifo'"),
        ("[gateway]\nlisten='8000'\n", "gateway.listen: '8000' is not HOST:PORT"),
        ("[gateway]\nqueue_timeout_s=0\n", "gateway.queue_timeout_s: must be > 0"),
        (
            "[gateway]\ntls_cert='c.pem'\n",
            "gateway.tls_cert / gateway.tls_key: set both or neither",
        ),
        ("[poll]\ndown_after=0\n", "poll.down_after: must be > 0"),
        (
            "[[nodes]]\nname='a'\nendpoint='http://a:1'\n[[nodes]]\nname='a'\nendpoint='http://b:1'\n",
            "nodes[1].name: duplicate node name 'a'",
        ),
        (
            "[[nodes]]\nname='a'\nendpoint='ftp://a'\n",
            "nodes[0].endpoint: 'ftp://a' is not an http:// or https:// URL",
        ),
        (
            "[[nodes]]\nname='a'\nendpoint='http://:8080'\n",
            "nodes[0].endpoint: 'http://:8080' has no host",
        ),
        (
            "[[nodes]]\nname='a'\nendpoint='http://a:1/v1'\n",
            "give the node's base URL, without a path",
        ),
        (
            "[[nodes]]\nname='a'\nendpoint='http://a:1'\nvram_mb=100\npinned=['m']\n"
            "[[models]]\nid='m'\nvram_mb=200\n",
            "nodes[0].pinned[0]: model 'm' needs 200 MB but node 'a' has vram_mb = 100",
        ),
        (
            "[[models]]\nid='m'\naliases=['x']\n[[models]]\nid='n'\naliases=['x']\n",
            "models[1].aliases[0]: 'x' already names 'm'",
        ),
        ("[model_map]\n'claude-*' = 'big-*'\n", "must be a model, not a pattern"),
        ("[gateway\n", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "cortex.toml") + ": ")
    assert expected in message


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[poll]\ninterval_s=0\ntimeout_s=-1\n")
    assert "poll.interval_s" in message and "poll.timeout_s" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "nope.toml", {})


def test_env_overrides_file_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[gateway]\nlisten='0.0.0.0:8000'\n[[nodes]]\nname='a'\nendpoint='http://a:1'\n"
    )
    env = {
        "CORTEX_GATEWAY__LISTEN": "127.0.0.1:8001",
        "CORTEX_GATEWAY__API_KEYS": '["k1", "k2"]',
        "CORTEX_POLL__INTERVAL_S": "1.5",
        "CORTEX_NODES__0__ENDPOINT": "http://10.0.0.5:8080",
        "CORTEX_EVICTION__STRATEGY": "priority",
        "UNRELATED": "x",
    }
    cfg = config.load(path, env)
    assert cfg.gateway.listen == "127.0.0.1:8001"
    assert cfg.gateway.api_keys == ["k1", "k2"]
    assert cfg.poll.interval_s == 1.5
    assert cfg.nodes[0].endpoint == "http://10.0.0.5:8080"
    assert cfg.eviction.strategy == "priority"


def test_env_errors_are_validated_like_the_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", {"CORTEX_GATEWAY__NOPE": "1"})
    assert "gateway.nope: unknown key" in message
    message = error_of(tmp_path, "", {"CORTEX_NODES__3__NAME": "x"})
    assert "CORTEX_NODES__3__NAME" in message


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = config.load(REPO / "cortex.toml", {"CORTEX_GATEWAY__ADMIN_KEY": "s3cret"})
    again = config.decode(tomllib.loads(config.dump(cfg)))
    assert again == cfg


def test_warns_about_open_listener_without_keys() -> None:
    cfg = config.load(REPO / "cortex.toml", {})
    assert any("api_keys is empty" in w for w in config.warnings(cfg))
    local = config.decode(
        {
            "gateway": {"listen": "127.0.0.1:8000"},
            "nodes": [{"name": "a", "endpoint": "http://a:1"}],
        }
    )
    assert config.warnings(local) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("claude-opus-5-5", "big"),
        ("claude-3-5-haiku-latest", "small"),
        ("gpt-4o", "default"),
        ("exact", "pinned-target"),
    ],
)
def test_model_map_exact_then_globs_in_order(name: str, expected: str) -> None:
    mapping = {
        "claude-*opus*": "big",
        "claude-*haiku*": "small",
        "exact": "pinned-target",
        "*": "default",
    }
    assert config.map_model(mapping, name) == expected
