"""The unit files in systemd/: what they must say, and what ``systemd-analyze`` thinks of them.

``systemd-analyze verify`` checks that ExecStart= names an executable file, and
/opt/cortex/bin/cortex (or /usr/local/bin/mistralrs) exists only on an installed
machine. So each unit is verified twice: as shipped, where the only message
allowed is that missing binary, and as a copy whose ExecStart= program is
/bin/true, which must verify without a single message.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cortex import config

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("cortex.service", "cortex-agent.service", "mistralrs.service")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")

Unit = dict[str, dict[str, list[str]]]


def parse(path: Path) -> Unit:
    """Sections -> key -> every value given (keys like SystemCallFilter= repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values is not None, f"{key}= missing from [{section}]"
    return values[-1]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert m, f"cannot read {value!r} as a time span"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def _with_true(name: str, tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart= program exists everywhere."""
    text = (UNITS / name).read_text()
    copy = tmp_path / name
    copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M))
    return copy


# --- what systemd says --------------------------------------------------------------


@pytest.mark.external
@needs_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_verify_as_shipped(name: str) -> None:
    program = one(parse(UNITS / name), "ExecStart").split()[0]
    result = _analyze("verify", "--man=no", str(UNITS / name))
    messages = [m for m in (result.stdout + result.stderr).splitlines() if m.strip()]
    if Path(program).is_file():
        assert messages == []
        assert result.returncode == 0
    else:
        assert messages == [
            f"{name}: Command {program} is not executable: No such file or directory"
        ]


@pytest.mark.external
@needs_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_verify_is_clean_with_an_existing_program(name: str, tmp_path: Path) -> None:
    result = _analyze("verify", "--man=no", str(_with_true(name, tmp_path)))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.external
@needs_analyze
@pytest.mark.parametrize(
    ("name", "worst"), [("cortex.service", 2.0), ("cortex-agent.service", 2.5)]
)
def test_security_exposure_stays_low(name: str, worst: float, tmp_path: Path) -> None:
    """``systemd-analyze security`` scores 0 (locked down) to 10 (unsandboxed)."""
    result = _analyze("security", "--offline=true", str(_with_true(name, tmp_path)))
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= worst


# --- what the units must say ----------------------------------------------------


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "ConfigurationDirectory": "cortex",
}


@pytest.mark.parametrize("name", ["cortex.service", "cortex-agent.service"])
def test_cortex_units_are_sandboxed(name: str) -> None:
    unit = parse(UNITS / name)
    assert {key: unit["Service"].get(key, ["<missing>"])[-1] for key in HARDENING} == HARDENING
    families = one(unit, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "User") not in ("", "root", "0")
    assert "DynamicUser" not in unit["Service"]
    # Logs go to the journal, never to files.
    for key in ("StandardOutput", "StandardError"):
        assert unit["Service"].get(key, ["journal"])[-1] == "journal"
    assert "network-online.target" in one(unit, "After", "Unit").split()
    assert "network-online.target" in one(unit, "Wants", "Unit").split()


def test_gateway_unit() -> None:
    unit = parse(UNITS / "cortex.service")
    assert one(unit, "ExecStart") == "/opt/cortex/bin/cortex serve --config /etc/cortex/cortex.toml"
    assert re.fullmatch(r"/(usr/)?bin/kill -(s )?HUP \$MAINPID", one(unit, "ExecReload"))
    assert one(unit, "RestartSec") == "2"
    assert one(unit, "LimitNOFILE") == "65536"
    assert one(unit, "PrivateDevices") == "yes"
    assert one(unit, "MemoryDenyWriteExecute") == "yes"
    # SIGKILL must not cut the drain short.
    assert seconds(one(unit, "TimeoutStopSec")) > config.Gateway().drain_timeout_s + 5


def test_agent_unit_and_its_polkit_rule_agree() -> None:
    unit = parse(UNITS / "cortex-agent.service")
    assert one(unit, "ExecStart") == "/opt/cortex/bin/cortex agent --config /etc/cortex/agent.toml"
    rule = (UNITS / "50-cortex-agent.rules").read_text()
    code = "\n".join(line for line in rule.splitlines() if not line.lstrip().startswith("//"))
    # The rule grants exactly: this user, the agent's default unit, the verb restart.
    assert f'subject.user == "{one(unit, "User")}"' in code
    assert f'action.lookup("unit") == "{config.Agent().unit}"' in code
    assert 'action.lookup("verb") == "restart"' in code
    assert '"org.freedesktop.systemd1.manage-units"' in code
    assert code.count("polkit.Result.YES") == 1


def test_node_unit_is_the_seed_example() -> None:
    unit = parse(UNITS / "mistralrs.service")
    assert config.Agent().unit == "mistralrs.service"
    start = one(unit, "ExecStart").split()
    assert start[:2] == ["/usr/local/bin/mistralrs", "serve"]
    # The agent's default node_url points at this port.
    assert start[start.index("--port") + 1] == str(urlsplit(config.Agent().node_url).port)
    assert one(unit, "Restart") == "on-failure"
