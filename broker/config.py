"""The broker's configuration: one TOML file, typed and checked before anything starts.

Every setting has a default, so no file is needed. A file that names an
unknown section or key, a value of the wrong type, outside its range or not
of its form (an ssp.host that is no IP address), or that cannot be read,
stops startup with one line naming the file, the key and the problem: a
broker never starts half configured.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit


class ConfigError(Exception):
    """A configuration file that cannot be used; the message is one line for the operator."""


def _setting(default: Any, *, minimum: float | None = None, maximum: float | None = None,
             choices: tuple | None = None, item_type: type | None = None,
             check: Callable[[Any], None] | None = None) -> Any:
    """Declare a setting with its default and the checks its value must pass.

    check, if given, is called with a value of the right type and raises
    ValueError saying what is wrong with it.
    """
    metadata = {"minimum": minimum, "maximum": maximum, "choices": choices,
                "item_type": item_type, "check": check}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _ip_address(value: str) -> None:
    """The UDP socket binds an IP literal: Twisted's listenUDP takes no host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address such as \"127.0.0.1\", \"0.0.0.0\" or \"::\" "
                         f"(the UDP socket binds an address, not a host name), not {_shown(value)}"
                         ) from None


def _off_or_at_least(least: float, off: str) -> Callable[[float], None]:
    """0 turns the feature off; a positive value below ``least`` would mean absurd waits
    (1e-320 requests a second: a wait of inf seconds) or a flood (a keepalive every 1e-300 s)."""
    def check(value: float) -> None:
        if value != 0 and value < least:
            raise ValueError(f"must be 0 ({off}) or at least {least}, not {_shown(value)}")
    return check


def _not_empty(value: str) -> None:
    """An empty path or endpoint would silently mean "here" or nothing at all."""
    if not value:
        raise ValueError("must not be empty")


def _endpoint_fields(description: str) -> list[str]:
    """The colon-separated fields of a Twisted endpoint string (a backslash escapes a character)."""
    fields, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _endpoint(value: str) -> None:
    """A Twisted server endpoint string. A tcp:, tcp6: or ssl: port that is missing, not a
    number or out of range is named here: Twisted's parser would say "_parseTCP() missing
    1 required positional argument" or "invalid literal for int()", and bind() worse."""
    _not_empty(value)
    kind, *fields = _endpoint_fields(value)
    if kind.lower() not in ("tcp", "tcp6", "ssl"):
        return  # unix:, systemd: and the rest: Twisted's parser judges them when the broker starts
    positional = [field for field in fields if "=" not in field]
    named = dict(field.split("=", 1) for field in fields if "=" in field)
    port = named.get("port", positional[0] if positional else None)
    if port is None:
        raise ValueError(f"has no port: write {kind}:PORT first, e.g. {kind}:8080 "
                         f"(in {_shown(value)})")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port must be a number of 0 to 65535, not {_shown(port)} "
                         f"(in {_shown(value)})") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be 0 to 65535, not {number} (in {_shown(value)})")
    backlog = named.get("backlog")
    if backlog is not None and not backlog.strip().isdigit():
        raise ValueError(f"backlog must be a whole number, not {_shown(backlog)} (in {_shown(value)})")


def _optional_endpoint(value: str) -> None:
    """Empty (no listener of its own), or an endpoint string."""
    if value:
        _endpoint(value)


def _origins(value: tuple) -> None:
    """Browser origins, or "*": the API and WebSocket read them again on every reload."""
    from broker.web.origins import parse_origin  # pure: no Twisted

    for entry in value:
        if entry.strip() != "*":
            parse_origin(entry)


def _hash_tag(value: str) -> None:
    """The prefix goes in braces ({ssp}:...): empty or braced, keys would spread over Cluster slots."""
    _not_empty(value)
    if "{" in value or "}" in value:
        raise ValueError(f"must not contain braces (it is put inside some), not {_shown(value)}")


def _http_url(value: str) -> None:
    """Empty, or an absolute http(s) URL: the address users open (its origin is allowed too)."""
    if not value:
        return
    parts = urlsplit(value)
    if "@" in parts.netloc:
        # Checked first, and the value never repeated: it may hold a password.
        raise ValueError("must not carry a user name or password (the value is not "
                         "repeated here, it may hold one)")
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be empty or a URL starting with http:// or https://, "
                         f"not {_shown(value)}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"has an invalid port: {_shown(value)}") from None
    if not parts.hostname:
        raise ValueError(f"has no host: {_shown(value)}")


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Process-wide settings."""

    data_dir: str = _setting("broker-data", check=_not_empty)
    workers: int = _setting(1, minimum=1, maximum=64)
    stop_timeout: float = _setting(10.0, minimum=0.0, maximum=300.0)
    # A worker failing this often within the window, without a stable run,
    # stops the broker with a failure (broker/workers.py); 0: restart forever.
    worker_failure_limit: int = _setting(5, minimum=0, maximum=1000)
    worker_failure_window: float = _setting(300.0, minimum=1.0, maximum=86400.0)


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Where log events go and in which format."""

    level: str = _setting("info", choices=("debug", "info", "warn", "error", "critical"))
    format: str = _setting("text", choices=("text", "json"))


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    """The HTTP listener: REST API, long polling, WebSocket, dashboard, health."""

    endpoint: str = _setting("tcp:8080:interface=127.0.0.1", check=_endpoint)
    public_url: str = _setting("", check=_http_url)
    allowed_origins: tuple = _setting((), item_type=str, check=_origins)
    max_request_bytes: int = _setting(65536, minimum=1024, maximum=16 * 1024 * 1024)
    max_requests_per_second: float = _setting(50.0, minimum=0.0, maximum=1_000_000.0,
                                              check=_off_or_at_least(0.01, "no limit"))
    query_tokens: bool = _setting(True)


@dataclass(frozen=True, slots=True)
class SSPSettings:
    """The UDP SSP endpoint for sensor nodes (wire.md)."""

    enabled: bool = _setting(True)
    host: str = _setting("127.0.0.1", check=_ip_address)
    port: int = _setting(60001, minimum=0, maximum=65535)
    receive_buffer_bytes: int = _setting(4 * 1024 * 1024, minimum=65536, maximum=1 << 30)
    device_heartbeat: float = _setting(25.0, minimum=1.0, maximum=3600.0)
    offline_after: float = _setting(75.0, minimum=1.0, maximum=86400.0)
    broker_heartbeats: bool = _setting(False)
    max_sessions: int = _setting(2_000_000, minimum=1, maximum=100_000_000)
    max_datagrams_per_second: int = _setting(200_000, minimum=1, maximum=100_000_000)
    max_device_datagrams_per_second: int = _setting(50, minimum=1, maximum=100_000)
    max_new_sessions_per_second: int = _setting(2_000, minimum=1, maximum=1_000_000)
    # broker/udp/admission.py NEW_SESSIONS_PER_DEVICE
    max_device_new_sessions_per_second: int = _setting(2, minimum=1, maximum=1000)
    # 0: ten times max_new_sessions_per_second (broker/udp/admission.py).
    max_auth_attempts_per_second: int = _setting(0, minimum=0, maximum=10_000_000)
    cipher_cache_size: int = _setting(4096, minimum=16, maximum=1_000_000)
    park_after: float = _setting(0.5, minimum=0.05, maximum=60.0)
    auth_failure_budget: int = _setting(8, minimum=1, maximum=1000)
    facts_interval: float = _setting(1.0, minimum=0.1, maximum=60.0)
    # broker/udp/table.py: seconds a session's stored receive mark may lag
    # before a park writes it again (0: at every park).
    mark_interval: float = _setting(60.0, minimum=0.0, maximum=86400.0)
    # broker/udp/bridge.py MAX_PENDING_COMMANDS
    max_pending_commands: int = _setting(256, minimum=1, maximum=65536)


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """The device-state registry and its store."""

    backend: str = _setting("sqlite", choices=("sqlite", "memory", "redis"))
    history_size: int = _setting(32, minimum=0, maximum=10_000)
    # broker/registry/history.py HISTORY_BYTES (a quarter of it: the largest entry)
    history_bytes: int = _setting(131072, minimum=4096, maximum=1 << 26)
    max_state_bytes: int = _setting(8192, minimum=256, maximum=1 << 20)
    feed_retention: int = _setting(1_000_000, minimum=1000, maximum=1 << 40)
    redis_url: str = _setting("redis://127.0.0.1:6379/0")
    redis_cluster: bool = _setting(False)
    redis_key_prefix: str = _setting("ssp", check=_hash_tag)
    redis_username: str = _setting("")
    redis_password_file: str = _setting("")
    redis_tls_ca_file: str = _setting("")
    redis_tls_cert_file: str = _setting("")
    redis_tls_key_file: str = _setting("")
    redis_wait_replicas: int = _setting(0, minimum=0, maximum=16)
    redis_wait_timeout: float = _setting(1.0, minimum=0.001, maximum=60.0)
    redis_timeout: float = _setting(5.0, minimum=0.5, maximum=300.0)
    redis_sequence_check_interval: float = _setting(5.0, minimum=0.5, maximum=60.0)
    redis_stream_length: int = _setting(100_000, minimum=1000, maximum=100_000_000)
    redis_lease_ttl: float = _setting(15.0, minimum=1.0, maximum=3600.0)
    redis_lease_check_interval: float = _setting(5.0, minimum=0.1, maximum=1800.0)


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """The dashboard WebSocket endpoint (Autobahn) at /ws."""

    enabled: bool = _setting(True)
    max_message_bytes: int = _setting(65536, minimum=1024, maximum=16 * 1024 * 1024)
    max_subscriptions: int = _setting(100, minimum=1, maximum=100_000)
    max_clients: int = _setting(1000, minimum=1, maximum=1_000_000)
    ping_interval: float = _setting(30.0, minimum=0.0, maximum=3600.0)
    ping_timeout: float = _setting(10.0, minimum=0.0, maximum=3600.0)
    max_behind: float = _setting(60.0, minimum=1.0, maximum=86400.0)
    send_buffer_bytes: int = _setting(262144, minimum=65536, maximum=16 * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class PollingSettings:
    """The HTTP polling fallback: short polling, long polling, server-sent events."""

    enabled: bool = _setting(True)
    max_wait: float = _setting(30.0, minimum=0.0, maximum=3600.0)
    min_interval: float = _setting(1.0, minimum=0.0, maximum=3600.0)
    max_waiters: int = _setting(10_000, minimum=1, maximum=10_000_000)
    sse_keepalive: float = _setting(15.0, minimum=0.0, maximum=3600.0,
                                    check=_off_or_at_least(1.0, "none"))


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Prometheus metrics at /metrics, optionally on a listener of their own."""

    enabled: bool = _setting(True)
    endpoint: str = _setting("", check=_optional_endpoint)
    require_token: bool = _setting(False)


_SECTIONS = {
    "broker": BrokerSettings,
    "log": LogSettings,
    "http": HTTPSettings,
    "ssp": SSPSettings,
    "registry": RegistrySettings,
    "websocket": WebSocketSettings,
    "polling": PollingSettings,
    "metrics": MetricsSettings,
}


@dataclass(frozen=True, slots=True)
class Config:
    """All settings, one frozen dataclass per TOML section."""

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    ssp: SSPSettings = field(default_factory=SSPSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    polling: PollingSettings = field(default_factory=PollingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: str = "<defaults>"

    @property
    def data_path(self) -> Path:
        """The data directory; relative paths are taken from the working directory."""
        return Path(self.broker.data_dir)


_ANNOTATED_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple}
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               tuple: "an array"}


def _check_value(section: str, spec: dataclasses.Field, value: Any) -> Any:
    """Return the value converted to the setting's type, or raise ValueError saying why not."""
    kind = _ANNOTATED_TYPES[spec.type] if isinstance(spec.type, str) else spec.type
    meta = spec.metadata
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            # float() of an integer beyond 1.8e308; the range is what the operator needs.
            bound = ("at least", meta["minimum"]) if value < 0 else ("at most", meta["maximum"])
            raise ValueError(f"must be {bound[0]} {bound[1]}, not {_shown(value)}") from None
    if kind is tuple:
        if not isinstance(value, list):
            raise ValueError(f"must be {_TYPE_NAMES[tuple]}, not {_toml_type(value)}")
        item_type = meta["item_type"]
        for item in value:
            if item_type is not None and not isinstance(item, item_type):
                raise ValueError(f"every item must be {_TYPE_NAMES[item_type]}, "
                                 f"found {_toml_type(item)}")
            if isinstance(item, str):
                _no_nul(item)
        value = tuple(value)
        if meta["check"] is not None:
            meta["check"](value)
        return value
    if type(value) is not kind:
        raise ValueError(f"must be {_TYPE_NAMES[kind]}, not {_toml_type(value)}")
    if kind is str:
        _no_nul(value)
    if kind is float and math.isnan(value):
        # nan compares false with every bound, so the range checks below would pass it.
        raise ValueError("must be a number, not nan")
    if meta["choices"] is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(choice) for choice in meta["choices"])
        raise ValueError(f"must be one of {allowed}, not {_shown(value)}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ValueError(f"must be at least {meta['minimum']}, not {_shown(value)}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ValueError(f"must be at most {meta['maximum']}, not {_shown(value)}")
    if meta.get("check") is not None:
        meta["check"](value)
    return value


def _no_nul(value: str) -> None:
    """No path, endpoint or name holds a NUL: the system calls refuse one (ValueError
    deep in os.mkdir, open() or a lock file), so it is refused here, in one line."""
    if "\0" in value:
        raise ValueError("must not contain a NUL character (\\u0000)")


def _shown(value: Any) -> str:
    """A value for a message; a huge integer by its size (str() refuses 4300 digits and more)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        digits = math.ceil(abs(value).bit_length() * math.log10(2))
        if abs(value) < 10 ** (digits - 1):
            digits -= 1
        return f"an integer of {digits} digits"
    if isinstance(value, str) and len(value) > _SHOWN_CHARACTERS:
        # A message stays a line to read: the start of a long value says which.
        return f"{value[:_SHOWN_CHARACTERS]!r}... ({len(value)} characters)"
    return repr(value)


#: characters of a string setting a message shows at most.
_SHOWN_CHARACTERS = 80


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _cross_checks(config: Config) -> list[tuple[str, str]]:
    """Rules that relate two settings; each problem as (key, message).

    A check that raises ValueError or OverflowError (a value no rule foresaw)
    is a problem of its key too, never a traceback.
    """
    problems = []
    for key, check in _CROSS_CHECKS:
        try:
            message = check(config)
        except (ValueError, OverflowError) as problem:
            message = f"cannot be used: {problem}"
        if message:
            problems.append((key, message))
    return problems


def _offline_after(config: Config) -> str | None:
    if config.ssp.offline_after < config.ssp.device_heartbeat:
        return "must be at least ssp.device_heartbeat, or every device flaps offline"
    return None


def _ping(key: str) -> Callable[[Config], str | None]:
    def check(config: Config) -> str | None:
        value = getattr(config.websocket, key)
        if 0 < value < 1:
            # Autobahn truncates its ping deadlines to whole seconds.
            return f"must be 0 (off) or at least 1.0, not {_shown(value)}"
        return None
    return check


def _workers(config: Config) -> str | None:
    if config.broker.workers > 1 and config.registry.backend != "redis":
        return "more than 1 worker needs registry.backend = \"redis\" (a shared registry)"
    return None


def _redis_url(config: Config) -> str | None:
    if config.registry.backend != "redis" or importlib.util.find_spec("redis") is None:
        return None
    problem = _redis_url_problem(config.registry.redis_url, config.registry.redis_cluster)
    if problem is None:
        # What redis-py itself refuses (a ?socket_timeout=abc, an option it does not
        # know), found now rather than as a traceback when the broker connects.
        from broker.registry.redis_connection import client_problem
        problem = client_problem(config.registry)
    return problem


def _lease_check_interval(config: Config) -> str | None:
    if config.registry.redis_lease_check_interval > config.registry.redis_lease_ttl / 2:
        return "must be at most half of registry.redis_lease_ttl"
    return None


def _redis_package(config: Config) -> str | None:
    if config.registry.backend == "redis" and importlib.util.find_spec("redis") is None:
        return ('"redis" needs the redis package, an extra of the broker: '
                "pip install '.[redis]' from the source tree")
    return None


def _metrics_endpoint(config: Config) -> str | None:
    if config.metrics.endpoint and config.http.endpoint == config.metrics.endpoint:
        return "must differ from http.endpoint"
    return None


_CROSS_CHECKS = (
    ("ssp.offline_after", _offline_after),
    ("websocket.ping_interval", _ping("ping_interval")),
    ("websocket.ping_timeout", _ping("ping_timeout")),
    ("broker.workers", _workers),
    ("registry.backend", _redis_package),
    ("registry.redis_url", _redis_url),
    ("registry.redis_lease_check_interval", _lease_check_interval),
    ("metrics.endpoint", _metrics_endpoint),
)


def _redis_url_problem(url: str, cluster: bool) -> str | None:
    """What redis-py would choke on (a traceback) or silently read as database 0, or None.

    The URL is never repeated whole: it may carry a password.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "must start with redis://, rediss:// or unix://"
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit's only complaint: a "[" without its "]" (or the reverse).
        return ("is not a valid URL: an IPv6 address goes in brackets, both of them "
                "(redis://[::1]:6379/0)")
    query = parse_qs(parts.query)
    databases = [("?db=", value) for value in query.get("db", [])[:1]]
    if parts.scheme == "unix":
        if not parts.path:
            return "names no socket file: write unix:///path/to/redis.sock"
        if cluster:
            return "Redis Cluster is reached over TCP (redis:// or rediss://), not unix://"
    else:
        host_port = parts.netloc.rpartition("@")[2]
        port = host_port.rpartition("]")[2] if host_port.startswith("[") else host_port
        port = port.partition(":")[2] if ":" in port else None
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"port must be a number of 1 to 65535, not {_shown(port)}"
        if parts.path not in ("", "/"):
            databases.insert(0, ("path", parts.path))
    for where, value in databases:
        number = value[1:] if where == "path" else value
        if not (number.isdigit() and number.isascii()):
            if where == "path":
                return (f"the database must be a number such as /0 (redis://HOST:PORT/0), "
                        f"not {_shown(value)}")
            shown = "?db=" + value
            return f"the database must be a number such as ?db=0, not {shown!r}"
        if cluster and int(number) != 0:
            return "Redis Cluster has database 0 only (registry.redis_cluster = true)"
    return None


def _did_you_mean(name: str, known, form: str = "'{}'") -> str:
    """"; did you mean 'x'?" for the closest known name to a typo, else nothing."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {form.format(close[0])}?" if close else ""


def parse_config(document: dict, source: str = "<string>") -> Config:
    """Build a Config from a parsed TOML document, or raise ConfigError naming the key."""
    sections = {}
    for name, table in document.items():
        if name not in _SECTIONS:
            if not isinstance(table, dict):
                homes = [f"[{section}]" for section, kind in _SECTIONS.items()
                         if name in {spec.name for spec in dataclasses.fields(kind)}]
                where = " or ".join(homes) or "its section's header"
                raise ConfigError(f"{source}: {name}: a setting outside any [section]: "
                                  f"move it below {where}")
            known = ", ".join(sorted(_SECTIONS))
            hint = _did_you_mean(name, _SECTIONS, "[{}]")
            raise ConfigError(f"{source}: [{name}]: unknown section{hint} (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name}: must be a table ([{name}]), not {_toml_type(table)}")
        settings_type = _SECTIONS[name]
        fields = {spec.name: spec for spec in dataclasses.fields(settings_type)}
        values = {}
        for key, value in table.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                hint = _did_you_mean(key, fields)
                raise ConfigError(f"{source}: {name}.{key}: unknown setting{hint} "
                                  f"(known: {known})")
            try:
                values[key] = _check_value(name, fields[key], value)
            except (ValueError, OverflowError) as problem:
                raise ConfigError(f"{source}: {name}.{key}: {problem}") from None
        sections[name] = settings_type(**values)
    config = Config(source=source, **sections)
    for key, message in _cross_checks(config):
        raise ConfigError(f"{source}: {key}: {message}")
    return config


def load_config(path: str | None) -> Config:
    """Read and check the TOML file at path; None gives the embedded defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as problem:
        raise ConfigError(f"{path}: cannot read: {problem.strerror or problem}") from None
    try:
        # utf-8-sig: a byte order mark, as some Windows editors write, is dropped.
        document = tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as problem:
        line = data.count(b"\n", 0, problem.start) + 1
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (at line {line})") from None
    except tomllib.TOMLDecodeError as problem:
        raise ConfigError(f"{path}: not valid TOML: {_toml_problem(problem, data)}") from None
    except ValueError as problem:
        # tomllib lets int() refuse an integer of more than 4300 digits.
        raise ConfigError(f"{path}: not valid TOML: {problem}") from None
    return parse_config(document, source=str(path))


_HEADER = re.compile(r"\s*\[\[?\s*([^\[\]#]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                  r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _toml_problem(problem: tomllib.TOMLDecodeError, data: bytes) -> str:
    """tomllib's message, with the key named when it says only "Cannot overwrite a value"."""
    message = str(problem)
    if not message.startswith("Cannot overwrite a value"):
        return message
    seen: dict[str, int] = {}
    table = ""
    lines = data.decode("utf-8-sig").splitlines()
    for number, line in enumerate(lines, 1):
        header = _HEADER.match(line)
        if header:
            table = _dotted(header.group(1))
            if line.lstrip().startswith("[["):
                # A new element of an array of tables: its keys start afresh.
                seen = {name: at for name, at in seen.items()
                        if not name.startswith(table + ".")}
            continue
        key = _KEY.match(line)
        if key:
            name = ".".join(part for part in (table, _dotted(key.group(1))) if part)
            if name in seen:
                return f"{name} is set twice (lines {seen[name]} and {number})"
            seen[name] = number
    return message


def _dotted(key: str) -> str:
    """A TOML key as written ("a" . 'b' . c) as the dotted name a.b.c."""
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def replace(config: Config, section: str, **changes: Any) -> Config:
    """Return a copy of config with some settings of one section changed (tests, reloads)."""
    current = getattr(config, section)
    return dataclasses.replace(config, **{section: dataclasses.replace(current, **changes)})
