"""Agent config: defaults, the TOML layout, and every refused value."""

from __future__ import annotations

import dataclasses

import pytest

from ksift.config import AgentConfig, default_db_path, load_config, parse_config
from ksift.errors import ConfigError

SOURCE = "agent.toml"

FULL = """
[agent]
tick = "250ms"
log_level = "debug"

[transport]
ringbuf_bytes = 4194304
wakeup_bytes = 65536

[store]
db = "/tmp/k.db"

[rules]
file = "/etc/ksift/rules.toml"

[output]
json = true
"""


def parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    return info.value


def test_defaults():
    config = AgentConfig()
    assert config == AgentConfig(
        tick_s=1.0,
        log_level="info",
        ringbuf_bytes=1 << 20,
        wakeup_bytes=256 * 1024,
        db_path=None,
        rules_path=None,
        json_output=False,
    )
    assert load_config(None) == config
    assert parse_config("", SOURCE) == config
    assert parse_config("[agent]\n[transport]\n", SOURCE) == config


def test_full_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(FULL)
    assert load_config(str(path)) == AgentConfig(
        tick_s=0.25,
        log_level="debug",
        ringbuf_bytes=4 << 20,
        wakeup_bytes=65536,
        db_path="/tmp/k.db",
        rules_path="/etc/ksift/rules.toml",
        json_output=True,
    )


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AgentConfig().tick_s = 1.0  # type: ignore[misc]


def test_tick_accepts_numbers_and_bounds():
    assert parse_config("[agent]\ntick = 1\n", SOURCE).tick_s == 1.0
    assert parse_config('[agent]\ntick = "10ms"\n', SOURCE).tick_s == pytest.approx(0.01)
    assert parse_config('[agent]\ntick = "5s"\n', SOURCE).tick_s == 5.0


def test_log_level_is_case_insensitive():
    assert parse_config('[agent]\nlog_level = "WARNING"\n', SOURCE).log_level == "warning"


def test_small_ringbuf_shrinks_default_wakeup():
    config = parse_config("[transport]\nringbuf_bytes = 16384\n", SOURCE)
    assert config.wakeup_bytes == 8192


def test_wakeup_at_half_ringbuf_is_allowed():
    config = parse_config("[transport]\nringbuf_bytes = 65536\nwakeup_bytes = 32768\n", SOURCE)
    assert config.wakeup_bytes == 32768


@pytest.mark.parametrize(
    ("text", "field", "detail"),
    [
        ("[agnet]\n", "agnet",
         "unknown section (allowed: agent, transport, store, rules, output, api, sinks, kubernetes, remediation, "
         "pressure)"),
        ("agent = 3\n", "agent", "must be a table"),
        ('[agent]\ntik = "1s"\n', "agent.tik", "unknown field (allowed: tick, log_level)"),
        ("[transport]\nsize = 1\n", "transport.size", "allowed: ringbuf_bytes, wakeup_bytes"),
        ("[store]\npath = 'x'\n", "store.path", "allowed: db"),
        ('[agent]\ntick = "5ms"\n', "agent.tick", "'5ms': must be between 10ms and 5s"),
        ('[agent]\ntick = "6s"\n', "agent.tick", "'6s'"),
        ('[agent]\ntick = "fast"\n', "agent.tick", "'fast'"),
        ("[agent]\ntick = -1\n", "agent.tick", "-1"),
        (
            '[agent]\nlog_level = "loud"\n',
            "agent.log_level",
            "'loud' (expected one of: debug, info, warning, error)",
        ),
        ("[agent]\nlog_level = 1\n", "agent.log_level", "1"),
        (
            "[transport]\nringbuf_bytes = 100000\n",
            "transport.ringbuf_bytes",
            "100000: must be a power of two",
        ),
        ("[transport]\nringbuf_bytes = 8192\n", "transport.ringbuf_bytes", "8192"),
        (f"[transport]\nringbuf_bytes = {1 << 31}\n", "transport.ringbuf_bytes", str(1 << 31)),
        ("[transport]\nringbuf_bytes = '1M'\n", "transport.ringbuf_bytes", "'1M': must be an integer"),
        ("[transport]\nringbuf_bytes = true\n", "transport.ringbuf_bytes", "True"),
        ("[transport]\nwakeup_bytes = 0\n", "transport.wakeup_bytes", "0: must be > 0"),
        (
            "[transport]\nwakeup_bytes = 524289\n",
            "transport.wakeup_bytes",
            "524289: must be <= ringbuf_bytes // 2 (524288)",
        ),
        (
            "[transport]\nringbuf_bytes = 16384\nwakeup_bytes = 16384\n",
            "transport.wakeup_bytes",
            "must be <= ringbuf_bytes // 2 (8192)",
        ),
        ('[store]\ndb = ""\n', "store.db", "''"),
        ("[rules]\nfile = 3\n", "rules.file", "3"),
        ('[output]\njson = "yes"\n', "output.json", "'yes': must be true or false"),
        ("[agent\n", None, "invalid TOML: "),
    ],
)
def test_validation_errors(text, field, detail):
    error = parse_error(text)
    message = str(error)
    assert message.startswith(SOURCE + ":")
    assert error.field == field
    if field:
        assert field in message
    assert detail in message


def test_load_config_missing_file_names_path_and_reason(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_load_config_error_names_the_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\ntick = \"1y\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: agent.tick: ")


def test_default_db_path_root():
    assert default_db_path(euid=0, env={"XDG_STATE_HOME": "/x"}) == "/var/lib/ksift/ksift.db"


def test_default_db_path_xdg_state_home():
    env = {"XDG_STATE_HOME": "/state", "HOME": "/home/u"}
    assert default_db_path(euid=1000, env=env) == "/state/ksift/ksift.db"


def test_default_db_path_home_fallback():
    assert default_db_path(euid=1000, env={"HOME": "/home/u"}) == "/home/u/.local/state/ksift/ksift.db"


def test_default_db_path_ignores_relative_xdg():
    env = {"XDG_STATE_HOME": "relative", "HOME": "/home/u"}
    assert default_db_path(euid=1000, env=env) == "/home/u/.local/state/ksift/ksift.db"
