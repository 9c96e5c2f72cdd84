"""The [api] config section and `ksift run --api`: defaults, listen addresses, tokens, refusals."""

from __future__ import annotations

import os
import stat

import pytest

from ksift.config import AgentConfig, parse_config
from ksift.errors import ConfigError
from ksift.interfaces.settings import (
    ApiSettings,
    TokenFileError,
    apply_api_override,
    dashboard_login_url,
    load_or_create_token,
    override_listen,
    parse_api,
    with_generated_token,
)

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


def test_connection_limits_are_checked():
    settings = parse_api({"max_connections": 100, "max_connections_per_peer": 10, "header_timeout": "2s",
                          "idle_timeout": "1m", "fd_reserve": 64}, SRC)
    assert (settings.max_connections, settings.max_connections_per_peer, settings.fd_reserve) == (100, 10, 64)
    assert (settings.header_timeout_s, settings.idle_timeout_s) == (2.0, 60.0)
    refused({"max_connections": 0}, "api.max_connections", "from 1 to 1000000")
    refused({"max_connections": "many"}, "api.max_connections", "'many'")
    refused({"max_connections": 10, "max_connections_per_peer": 20}, "api.max_connections_per_peer",
            "more than max_connections (10)")
    refused({"header_timeout": "0s"}, "api.header_timeout", "between")
    refused({"idle_timeout": "2h"}, "api.idle_timeout", "between")
    refused({"fd_reserve": 8}, "api.fd_reserve", "from 16 to 1000000")
    refused({"auth": "maybe"}, "api.auth", "token, none")
    refused({"auth": "none", "token": TOKEN}, "api.auth", "remove one")
    refused({"auth": "none", "listen": "0.0.0.0:9466"}, "api.listen", "needs a token")


def test_the_connection_cap_leaves_the_reserve():
    from ksift.interfaces.api import ApiStartError, connection_budget

    assert connection_budget(512, 256, limit=524288, in_use=60).connections == 512
    assert connection_budget(512, 256, limit=1024, in_use=600).connections == 1024 - 600 - 256
    with pytest.raises(ApiStartError, match="fd_reserve"):
        connection_budget(512, 256, limit=1024, in_use=900)


# -- the token made at first start (issue 16 section 2) ------------------------------------


def test_a_token_is_made_once_root_only_and_reused(tmp_path):
    path = tmp_path / "api.token"
    token = load_or_create_token(str(path))
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.geteuid()
    assert path.read_text() == token + "\n"
    assert load_or_create_token(str(path)) == token  # a later start uses the same one


def test_a_token_file_that_others_could_have_made_or_read_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("0123456789abcdef0123456789\n")
    target.chmod(0o600)
    link = tmp_path / "link.token"
    link.symlink_to(target)
    with pytest.raises(TokenFileError, match="symbolic link"):
        load_or_create_token(str(link))
    assert target.read_text() == "0123456789abcdef0123456789\n"  # never written through the link
    loose = tmp_path / "loose.token"
    loose.write_text("0123456789abcdef0123456789\n")
    loose.chmod(0o644)
    with pytest.raises(TokenFileError, match="mode 0644"):
        load_or_create_token(str(loose))
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(TokenFileError, match="at least 16"):
        load_or_create_token(str(short))
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign.token"
        foreign.write_text("0123456789abcdef0123456789\n")
        foreign.chmod(0o600)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(TokenFileError, match="owned by uid 65534"):
            load_or_create_token(str(foreign))
    with pytest.raises(TokenFileError, match="cannot create"):
        load_or_create_token(str(tmp_path / "no-such-dir" / "api.token"))


def test_run_makes_a_token_next_to_the_store_unless_one_is_configured(tmp_path):
    db = str(tmp_path / "alerts.db")
    made = with_generated_token(AgentConfig(), db).section("api")
    assert made.token_file == str(tmp_path / "api.token") and made.token == (tmp_path / "api.token").read_text().strip()
    configured = parse_config_text(tmp_path, f'[api]\ntoken = "{TOKEN}"\n')
    assert with_generated_token(configured, db) is configured
    opted_out = parse_config_text(tmp_path, '[api]\nauth = "none"\n')
    assert with_generated_token(opted_out, db).section("api").token is None
    off = parse_config_text(tmp_path, "[api]\nenabled = false\n")
    assert with_generated_token(off, db) is off


def parse_config_text(tmp_path, text: str) -> AgentConfig:
    return parse_config(text, SRC)


RAISE = """
import resource
from ksift.compose import raise_open_file_limit
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
print(raise_open_file_limit() == (64, hard), resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
print(raise_open_file_limit() == (64, 64), resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64))
"""


def test_run_raises_the_soft_open_file_limit_to_the_hard_one():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RAISE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", "True"]


def test_dashboard_login_url_uses_the_token_the_agent_made(tmp_path):
    db = str(tmp_path / "alerts.db")
    with pytest.raises(TokenFileError, match="no API token yet"):
        dashboard_login_url(AgentConfig(), db)  # never made here: that is the agent's first start
    token = with_generated_token(AgentConfig(), db).section("api").token
    assert dashboard_login_url(AgentConfig(), db) == f"http://127.0.0.1:9466/?token={token}"
    configured = parse_config_text(tmp_path, f'[api]\nlisten = "[::1]:9500"\ntoken = "{TOKEN}"\n')
    assert dashboard_login_url(configured, db) == f"http://[::1]:9500/?token={TOKEN}"
    opted_out = parse_config_text(tmp_path, '[api]\nauth = "none"\n')
    assert dashboard_login_url(opted_out, db) == "http://127.0.0.1:9466/"


@pytest.mark.parametrize("text, fragment", [
    ("[api]\nenabled = false\n", "no TCP listener"),
    ('[api]\nlisten = "127.0.0.1:0"\n', "port 0"),
])
def test_dashboard_login_url_needs_a_fixed_tcp_listener(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        dashboard_login_url(parse_config_text(tmp_path, text), str(tmp_path / "alerts.db"))
    assert info.value.field == "api.listen"


def test_ksift_dashboard_prints_the_login_address(tmp_path, capsys):
    from ksift.cli.main import main

    db = str(tmp_path / "alerts.db")
    token = with_generated_token(AgentConfig(), db).section("api").token
    assert main(["dashboard", "--db", db]) == 0
    assert capsys.readouterr().out.strip() == f"http://127.0.0.1:9466/?token={token}"
    assert main(["dashboard", "--db", str(tmp_path / "elsewhere" / "alerts.db")]) == 1
    assert "no API token yet" in capsys.readouterr().err
