"""The [api] config section: where the HTTP API, SSE stream, metrics and dashboard listen.

    [api]
    enabled = true                # false: no server at all
    listen = "127.0.0.1:9466"     # host:port ("[::1]:9466" for IPv6); "" serves only on unix_socket
    unix_socket = "/run/ksift/api.sock"   # optional, alongside or instead of listen
    token = "..."                 # or token_file = "/etc/ksift/api.token"; Bearer auth on every endpoint
                                  # but /healthz and /readyz. Required when listen is not a loopback address.
    auth = "token"                # "none": no token at all, loopback only (any local user reads alerts)
    heartbeat = "15s"             # SSE comment sent to idle clients
    sse_queue = 1000              # events buffered per SSE client; a slower client loses (and counts) the rest
    max_connections = 512         # open connections at once (SSE streams included)
    max_connections_per_peer = 256  # of them from one client address (every local client is 127.0.0.1)
    header_timeout = "10s"        # a request head (and body) must arrive within this
    idle_timeout = "60s"          # a keep-alive connection with no next request is closed after this
    fd_reserve = 256              # open files the API never takes: they stay for the funnel

The token is read from token_file once, when the config is parsed, so a
missing or empty file is a config error at start, not a 401 later. With no
token configured (and auth not "none"), `ksift run` makes one at first start in
api.token next to the alert store, readable by root only, and reuses it after
(with_generated_token).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlencode

from ksift.config import AgentConfig
from ksift.errors import ConfigError, KsiftError
from ksift.settings_fields import FROM_TO, boolean, choice, duration_between, integer_between, non_empty_path

log = logging.getLogger("ksift.api")

DEFAULT_LISTEN = "127.0.0.1:9466"
MIN_TOKEN_CHARS = 16
TOKEN_FILE_NAME = "api.token"  # the generated token, next to the alert store
_FIELDS = ("enabled", "listen", "unix_socket", "token", "token_file", "heartbeat", "sse_queue", "max_connections",
           "max_connections_per_peer", "header_timeout", "idle_timeout", "fd_reserve", "auth")


@dataclass(frozen=True)
class ApiSettings:
    enabled: bool = True
    listen: str = DEFAULT_LISTEN  # "" = no TCP listener
    host: str | None = "127.0.0.1"  # parsed from listen; None when listen is ""
    port: int | None = 9466
    unix_socket: str | None = None
    token: str | None = field(default=None, repr=False)  # never printed
    token_file: str | None = None
    auth: str = "token"  # "none": no token, loopback only
    heartbeat_s: float = 15.0
    sse_queue: int = 1000
    max_connections: int = 512
    max_connections_per_peer: int = 256
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    fd_reserve: int = 256

    @property
    def loopback_only(self) -> bool:
        """True when no TCP listener, or one bound to a loopback address only."""
        return self.host is None or is_loopback(self.host)


def parse_api(table: dict, source: str, read_text: Callable[[str], str] | None = None) -> ApiSettings:
    """Parse the [api] table; every error names api.<field> and the bad value.

    read_text reads the token file (injected for tests).
    """
    for name in table:
        if name not in _FIELDS:
            raise ConfigError(source, f"unknown field (allowed: {', '.join(_FIELDS)})", field=f"api.{name}")
    values: dict = {}
    if "enabled" in table:
        values["enabled"] = boolean(table["enabled"], source, "api.enabled")
    listen = table.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str):
        raise ConfigError(source, f"invalid value {listen!r}: must be a string like \"127.0.0.1:9466\"",
                          field="api.listen")
    host, port = parse_listen(listen, source, "api.listen")
    values.update(listen=listen.strip(), host=host, port=port)
    if "unix_socket" in table:
        path = non_empty_path(table["unix_socket"], source, "api.unix_socket")
        if not path.startswith("/"):
            raise ConfigError(source, f"invalid value {path!r}: must be an absolute path", field="api.unix_socket")
        values["unix_socket"] = path
    if "auth" in table:
        values["auth"] = choice(table["auth"], source, "api.auth", ("token", "none"))
        if values["auth"] == "none" and ("token" in table or "token_file" in table):
            raise ConfigError(source, 'auth = "none" with a token: remove one of them', field="api.auth")
    if "token" in table and "token_file" in table:
        raise ConfigError(source, "set token or token_file, not both", field="api.token_file")
    if "token" in table:
        values["token"] = _token(table["token"], source, "api.token")
    if "token_file" in table:
        path = non_empty_path(table["token_file"], source, "api.token_file")
        try:
            text = (read_text or _read_file)(path)
        except OSError as exc:
            raise ConfigError(source, f"cannot read {path}: {exc.strerror or exc}", field="api.token_file") from None
        except UnicodeDecodeError:
            raise ConfigError(source, f"cannot read {path}: not UTF-8 text", field="api.token_file") from None
        values["token_file"] = path
        values["token"] = _token(text.strip(), source, "api.token_file", shown=f"the content of {path}")
    if "heartbeat" in table:
        values["heartbeat_s"] = duration_between(table["heartbeat"], source, "api.heartbeat", 0.05, 300.0)
    if "sse_queue" in table:
        values["sse_queue"] = integer_between(table["sse_queue"], source, "api.sse_queue", 1, 1_000_000, FROM_TO)
    for name in ("max_connections", "max_connections_per_peer"):
        if name in table:
            values[name] = integer_between(table[name], source, f"api.{name}", 1, 1_000_000, FROM_TO)
    if "fd_reserve" in table:
        values["fd_reserve"] = integer_between(table["fd_reserve"], source, "api.fd_reserve", 16, 1_000_000, FROM_TO)
    if "header_timeout" in table:
        values["header_timeout_s"] = duration_between(table["header_timeout"], source, "api.header_timeout",
                                                      0.1, 300.0)
    if "idle_timeout" in table:
        values["idle_timeout_s"] = duration_between(table["idle_timeout"], source, "api.idle_timeout", 0.1, 3600.0)
    settings = ApiSettings(**values)
    if settings.max_connections_per_peer > settings.max_connections:
        raise ConfigError(source, f"invalid value {settings.max_connections_per_peer}: more than max_connections "
                          f"({settings.max_connections})", field="api.max_connections_per_peer")
    if settings.enabled and settings.host is None and settings.unix_socket is None:
        raise ConfigError(source, "nothing to listen on: set listen, unix_socket, or enabled = false",
                          field="api.listen")
    _require_token_off_loopback(settings, source, "api.listen")
    return settings


def override_listen(settings: ApiSettings, value: str, source: str = "--api") -> ApiSettings:
    """The command line's `--api LISTEN|off` applied over the config's [api]."""
    if value.strip().lower() == "off":
        return replace(settings, enabled=False)
    host, port = parse_listen(value, source, None)
    if host is None:
        raise ConfigError(source, f"invalid value {value!r}: expected host:port like 127.0.0.1:9466, or off")
    updated = replace(settings, enabled=True, listen=value.strip(), host=host, port=port)
    _require_token_off_loopback(updated, source, None)
    return updated


def apply_api_override(config: AgentConfig, value: str) -> AgentConfig:
    """`ksift run --api LISTEN|off`: the config with its [api] section overridden."""
    api = override_listen(config.section("api"), value)
    return replace(config, extensions=MappingProxyType({**config.extensions, "api": api}))


def parse_listen(value: str, source: str, field_name: str | None) -> tuple[str | None, int | None]:
    """"host:port" or "[v6]:port" -> (host, port); "" -> (None, None). Port 0 picks a free one."""
    text = value.strip()
    if not text:
        return None, None
    expected = 'expected host:port like "127.0.0.1:9466" or "[::1]:9466"'
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ConfigError(source, f"invalid value {value!r}: {expected}", field=field_name)
        host, port_text = text[1:end], text[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(source, f"invalid value {value!r}: {host!r} is not an IPv6 address",
                              field=field_name) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(source, f"invalid value {value!r}: {expected}", field=field_name)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(source, f"invalid value {value!r}: port must be a number from 0 to 65535",
                          field=field_name)
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Loopback addresses and the name localhost; any other name could resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_token_off_loopback(settings: ApiSettings, source: str, field_name: str | None) -> None:
    # Alerts carry command lines and the API will grow actions: never serve them
    # to the network without authentication.
    if settings.enabled and not settings.loopback_only and settings.token is None:
        raise ConfigError(
            source,
            f"listening on {settings.listen} (not a loopback address) needs a token: set api.token or "
            "api.token_file, or listen on 127.0.0.1",
            field=field_name,
        )


def _token(value: object, source: str, field_name: str, shown: str | None = None) -> str:
    what = shown or "the token"
    if not isinstance(value, str):
        raise ConfigError(source, "invalid value: must be a string", field=field_name)
    if len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value) or not value.isprintable():
        # The value itself is a secret: describe it, never echo it.
        raise ConfigError(
            source,
            f"{what} must be at least {MIN_TOKEN_CHARS} printable characters without spaces "
            "(for example the output of `openssl rand -hex 32`)",
            field=field_name,
        )
    return value


class TokenFileError(KsiftError):
    """The generated API token's file cannot be made or is not safe to use."""


def with_generated_token(config: AgentConfig, store_path: str) -> AgentConfig:
    """The config with [api] token set from api.token next to the store (made at first start), when
    the API is on and neither a token nor auth = "none" is configured. Otherwise config unchanged."""
    api = config.section("api")
    if not api.enabled or api.token is not None or api.auth == "none":
        return config
    path = os.path.join(os.path.dirname(os.path.abspath(store_path)), TOKEN_FILE_NAME)
    token = load_or_create_token(path)
    api = replace(api, token=token, token_file=path)
    return replace(config, extensions=MappingProxyType({**config.extensions, "api": api}))


def dashboard_login_url(config: AgentConfig, store_path: str) -> str:
    """The address that logs a browser on this host into the dashboard (`ksift dashboard`): the
    TCP listener's URL, with the token (configured, or the one `ksift run` made next to the store)
    given once as ?token= (the API trades it for a session cookie and redirects it out of the
    address bar). Never makes a token: that is the agent's first start."""
    api = config.section("api")
    if not api.enabled or not api.listen:
        raise ConfigError("[api]", "the API has no TCP listener (enabled = false or listen = \"\"): "
                          "there is no dashboard to open", field="api.listen")
    if api.port == 0:
        raise ConfigError("[api]", "listen port 0 is chosen at start: set a fixed port to open the dashboard",
                          field="api.listen")
    host = "127.0.0.1" if api.host in ("0.0.0.0", "") else "[::1]" if api.host == "::" else api.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{host}:{api.port}/"
    if api.auth == "none":
        return url
    token = api.token
    if token is None:
        path = os.path.join(os.path.dirname(os.path.abspath(store_path)), TOKEN_FILE_NAME)
        if not os.path.lexists(path):
            raise TokenFileError(f"no API token yet at {path}: `ksift run` makes it at its first start "
                                 "(or set [api] token_file)")
        token = _read_private_token(path)
    return f"{url}?{urlencode({'token': token})}"


def load_or_create_token(path: str) -> str:
    """The token in path, made there first (random, 0600, O_EXCL|O_NOFOLLOW) if there is no file.

    A file that is not ours to trust is refused rather than used: a link, not a regular file, owned
    by another user, or readable or writable by group or others (anyone who could write it could
    choose the token; anyone who could read it could use it).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return _read_private_token(path)
    except OSError as exc:
        raise TokenFileError(f"cannot create the API token file {path}: {exc.strerror or exc} (set [api] token_file, "
                             "or put the store where ksift may write)") from None
    # Imported here, not at the top: `secrets` pulls in hmac and OpenSSL's libcrypto (~3.5 MiB), and
    # `ksift run` reads this module's settings before loading the kernel side (see ksift.compose).
    import secrets

    token = secrets.token_hex(32)
    try:
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("API token created in %s (root only): send it as Authorization: Bearer, or open "
             "http://HOST:PORT/?token=<it> once in a browser", path)
    return token


def _read_private_token(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise TokenFileError(f"refusing the API token file {path}: {why}; remove it and restart "
                             "(ksift makes a new one)") from None
    try:
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "not a regular file"
        elif info.st_uid != os.geteuid():
            problem = f"owned by uid {info.st_uid}, not by the agent's user"
        elif info.st_mode & 0o077:
            problem = f"mode {stat.S_IMODE(info.st_mode):04o} lets others read or write it"
        if problem:
            raise TokenFileError(f"refusing the API token file {path}: {problem}; remove it and restart "
                                 "(ksift makes a new one, mode 0600)")
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    try:
        return _token(text, path, "api token file", shown=f"the content of {path}")
    except ConfigError as exc:
        raise TokenFileError(f"{exc}; remove it and restart (ksift makes a new one)") from None


def _read_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")

