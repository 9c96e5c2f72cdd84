"""The [api] config section and `ksift run --api`: defaults, listen addresses, tokens, refusals."""

from __future__ import annotations

import pytest

from ksift.config import AgentConfig, parse_config
from ksift.errors import ConfigError
from ksift.interfaces.settings import ApiSettings, apply_api_override, override_listen, parse_api

SRC = "agent.toml"
TOKEN = "0123456789abcdef0123"


def refused(table: dict, field: str, *fragments: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_api(table, SRC, **kw)
    assert info.value.field == field, str(info.value)
    assert info.value.source == SRC
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


def test_defaults_listen_on_loopback_without_a_token():
    settings = parse_api({}, SRC)
    assert settings == ApiSettings()
    assert settings.enabled and settings.listen == "127.0.0.1:9466"
    assert (settings.host, settings.port) == ("127.0.0.1", 9466)
    assert settings.token is None and settings.unix_socket is None and settings.loopback_only
    # A config file without [api] reads as the same defaults.
    assert AgentConfig().section("api") == settings


def test_full_section_through_the_config_file(tmp_path):
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    config = parse_config(f"""
[api]
listen = "0.0.0.0:9500"
unix_socket = "{tmp_path}/api.sock"
token_file = "{token_file}"
heartbeat = "2s"
sse_queue = 50
""", SRC)
    api = config.section("api")
    assert (api.host, api.port, api.listen) == ("0.0.0.0", 9500, "0.0.0.0:9500")
    assert api.token == TOKEN  # read once, newline stripped
    assert api.token_file == str(token_file)
    assert api.unix_socket == f"{tmp_path}/api.sock"
    assert api.heartbeat_s == 2.0 and api.sse_queue == 50
    assert not api.loopback_only


@pytest.mark.parametrize("listen, host, port", [
    ("127.0.0.1:9466", "127.0.0.1", 9466),
    ("localhost:80", "localhost", 80),
    ("[::1]:9466", "::1", 9466),
    ("127.0.0.2:0", "127.0.0.2", 0),  # 0: any free port
])
def test_loopback_addresses_need_no_token(listen, host, port):
    settings = parse_api({"listen": listen}, SRC)
    assert (settings.host, settings.port) == (host, port)
    assert settings.loopback_only


@pytest.mark.parametrize("listen", ["0.0.0.0:9466", "[::]:9466", "10.1.2.3:9466", "example.com:9466"])
def test_any_other_address_without_a_token_is_refused(listen):
    refused({"listen": listen}, "api.listen", "needs a token", listen)
    # With a token it is fine.
    assert parse_api({"listen": listen, "token": TOKEN}, SRC).token == TOKEN


@pytest.mark.parametrize("listen, fragment", [
    ("9466", "host:port"),
    ("127.0.0.1", "host:port"),
    (":9466", "host:port"),
    ("127.0.0.1:http", "port must be a number"),
    ("127.0.0.1:70000", "port must be a number"),
    ("[::1]9466", "host:port"),
    ("[nope]:1", "not an IPv6 address"),
    ("::1:9466", "host:port"),
])
def test_bad_listen_values_name_the_field(listen, fragment):
    refused({"listen": listen}, "api.listen", fragment, repr(listen))


def test_listen_must_be_a_string():
    refused({"listen": 9466}, "api.listen", "must be a string")


def test_unix_socket_alone(tmp_path):
    settings = parse_api({"listen": "", "unix_socket": str(tmp_path / "s")}, SRC)
    assert settings.host is None and settings.port is None and settings.loopback_only
    refused({"listen": ""}, "api.listen", "nothing to listen on")
    refused({"unix_socket": "relative.sock"}, "api.unix_socket", "absolute")
    refused({"unix_socket": ""}, "api.unix_socket", "non-empty")


def test_disabled_needs_nothing():
    settings = parse_api({"enabled": False, "listen": "0.0.0.0:9466"}, SRC)
    assert not settings.enabled
    refused({"enabled": "yes"}, "api.enabled", "true or false")


def test_token_rules_never_echo_the_secret(tmp_path):
    short = "hunter2hunter2"
    error = refused({"token": short}, "api.token", "at least 16")
    assert short not in str(error)
    refused({"token": "has a space in the middle of it"}, "api.token", "without spaces")
    refused({"token": 12345678901234567890}, "api.token", "must be a string")
    refused({"token": TOKEN, "token_file": "/x"}, "api.token_file", "not both")
    assert TOKEN not in repr(parse_api({"token": TOKEN}, SRC))


def test_token_file_errors_name_the_field(tmp_path):
    refused({"token_file": str(tmp_path / "missing")}, "api.token_file", "cannot read", "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    refused({"token_file": str(empty)}, "api.token_file", f"the content of {empty}")
    # The reader is injected: no file system needed to test what is done with its text.
    settings = parse_api({"token_file": "/etc/ksift/api.token"}, SRC, read_text=lambda path: f"  {TOKEN}\n")
    assert settings.token == TOKEN


def test_other_fields_are_checked():
    refused({"port": 1}, "api.port", "unknown field", "listen")
    refused({"heartbeat": "10ms"}, "api.heartbeat", "between")
    refused({"heartbeat": "soon"}, "api.heartbeat")
    refused({"sse_queue": 0}, "api.sse_queue", "1 to 1000000")
    refused({"sse_queue": True}, "api.sse_queue")


def test_command_line_override():
    base = ApiSettings()
    assert override_listen(base, "off").enabled is False
    assert override_listen(base, "OFF").enabled is False
    moved = override_listen(base, "127.0.0.1:19466")
    assert (moved.enabled, moved.host, moved.port) == (True, "127.0.0.1", 19466)
    # Re-enables a config that had [api] enabled = false.
    assert override_listen(ApiSettings(enabled=False), "127.0.0.1:1").enabled
    with pytest.raises(ConfigError, match="needs a token") as info:
        override_listen(base, "0.0.0.0:9466")
    assert info.value.source == "--api"
    with pytest.raises(ConfigError, match="host:port"):
        override_listen(base, "")
    with pytest.raises(ConfigError, match="port must be a number"):
        override_listen(base, "127.0.0.1:x")
    with_token = parse_api({"token": TOKEN}, SRC)
    assert override_listen(with_token, "0.0.0.0:9466").token == TOKEN


def test_override_replaces_only_the_api_section():
    config = parse_config('[agent]\ntick = "250ms"\n', SRC)
    updated = apply_api_override(config, "127.0.0.1:9999")
    assert updated.tick_s == 0.25
    assert updated.section("api").port == 9999
    assert config.section("api").port == 9466  # the original is untouched (frozen)
    assert apply_api_override(config, "off").section("api").enabled is False
