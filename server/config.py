"""Configuration: ``pypubsub.yaml`` (0.7.4's format) parsed once into frozen dataclasses.

Owns reading and validating every key, with defaults named next to each; a bad value raises
:class:`~server.errors.ConfigError` naming the file and the dotted key; an unknown key is a
warning. Plugins parse their own sections through a :class:`Section` so their errors name the
key the same way. No I/O beyond reading the file; nothing here starts anything.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import netaddr
import yaml

from server.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_TEXT",
    "LOG_FORMATS",
    "AdminConfig",
    "BacklogConfig",
    "ClientsConfig",
    "Config",
    "ConfigErrors",
    "Section",
    "ServerConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

logger = logging.getLogger(__name__)

# -- named defaults ---------------------------------------------------------------------------
DEFAULT_PORT = 2069  # 0.7.4's port
DEFAULT_BIND = ("127.0.0.1",)  # loopback unless told otherwise (0.7.4 bound 0.0.0.0)
#: 0.7.4's limit on a published event body, in bytes.
DEFAULT_MAX_PAYLOAD = 102_400
#: Bytes a subscriber may have unsent before it is disconnected (it can resume by cursor).
DEFAULT_STREAM_BUFFER = 4 * 1024 * 1024
#: Keep-alive interval: asfpy gives up after 11 s of silence, svnwcsub after 60 s.
DEFAULT_PING_INTERVAL = 5.0
#: How long shutdown waits for streams and plugins before giving up on them.
DEFAULT_SHUTDOWN_GRACE = 3.0
#: Seconds a client has to send a complete request head, from its connection (a total: a
#: client trickling bytes does not extend it).
DEFAULT_HEADER_TIMEOUT = 30.0
#: A replay never sends more than this many events (no request scans forever); 0 = no cap.
DEFAULT_MAX_REPLAY = 100_000
#: The Redis Streams key of a cluster's shared log (``server.backlog.stream``).
DEFAULT_STREAM = "pypubsub"
#: Seconds a publish waits for Redis before it is answered 503 (``server.backlog.timeout``).
DEFAULT_LOG_TIMEOUT = 1.0
#: URL schemes of ``server.backlog.storage`` that select the Redis Streams log.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

#: The configuration the daemon runs on when no file is given and none is found.
DEFAULT_CONFIG_TEXT = """\
server:
  port: 2069
  bind: 127.0.0.1
  max_payload_size: 102400
  backlog:
    size: 0
    max_age: 0
clients:
  payloaders:
    - 127.0.0.0/8
    - ::1/128
  oldschoolers:
    - svnwcsub
"""

T = TypeVar("T")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.I)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 10**6,
               "mb": 10**6, "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30,
               "gi": 2**30}


def parse_duration(value: object) -> float:
    """Seconds from ``45``, ``45s``, ``30m``, ``12h``, ``7d`` or ``2w``. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 45s, 30m, 12h or 7d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration such as 45s, 30m, 12h or 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_size(value: object) -> int:
    """Bytes from ``102400``, ``100KiB``, ``4MiB``, ``1M``. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE_RE.match(str(value))
    unit = _SIZE_UNITS.get((m.group(2) or "").lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"{value!r} is not a size such as 102400, 100KiB or 4MiB")
    return int(m.group(1)) * unit


class Section:
    """A mapping read with typed getters whose errors name the file and the dotted key.

    Keys never read are reported by :meth:`warn_unknown`. Given an ``errors`` list, a getter
    records a bad value there and returns the default (so that every error of a file is
    reported at once, see :func:`parse_config`); without one it raises at once.
    """

    def __init__(self, data: object, file: str, prefix: str,
                 errors: list[ConfigError] | None = None) -> None:
        self.errors = errors
        self.file = file
        self.prefix = prefix
        self._seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self._fail("", "must be a mapping", None)
            data = {}
        self.data: Mapping[str, Any] = data

    def _fail(self, name: str, message: str, default: T) -> T:
        err = ConfigError(self.file, (self.key(name) if name else self.prefix) or "(top level)", message)
        if self.errors is None:
            raise err
        self.errors.append(err)
        return default

    def report(self, name: str, message: str) -> None:
        """Record (or raise, when not collecting) an error about key ``name``."""
        self._fail(name, message, None)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def has(self, name: str) -> bool:
        self._seen.add(name)
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        v = self.data.get(name)
        return default if v is None else v

    def section(self, name: str) -> Section:
        return Section(self.raw(name), self.file, self.key(name), self.errors)

    def detached(self, name: str) -> Section:
        """A sub-section parsed later (by a plugin): its errors raise at once."""
        return Section(self.raw(name), self.file, self.key(name))

    def typed(self, name: str, kind: type[T], default: T) -> T:
        v = self.raw(name, default)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
            return self._fail(name, f"expected {kind.__name__}, got {v!r}", default)
        return v

    def integer(self, name: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        v = self.typed(name, int, default)
        if minimum is not None and v < minimum:
            return self._fail(name, f"must be at least {minimum}, got {v}", default)
        if maximum is not None and v > maximum:
            return self._fail(name, f"must be at most {maximum}, got {v}", default)
        return v

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, minimum=0, maximum=65535)

    def duration(self, name: str, default: float) -> float:
        try:
            return parse_duration(self.raw(name, default))
        except ValueError as e:
            return self._fail(name, str(e), default)

    def size(self, name: str, default: int) -> int:
        try:
            return parse_size(self.raw(name, default))
        except ValueError as e:
            return self._fail(name, str(e), default)

    def string(self, name: str, default: str | None = None) -> str | None:
        v = self.raw(name, default)
        if v is None:
            return None
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            return self._fail(name, f"expected a string, got {v!r}", default)
        return str(v)

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of strings; a single string counts as a list of one."""
        v = self.raw(name, None)
        if v is None:
            return default
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return (str(v),)
        if not isinstance(v, list):
            return self._fail(name, f"expected a list of strings, got {v!r}", default)
        out = []
        for i, x in enumerate(v):
            if not isinstance(x, (str, int, float)) or isinstance(x, bool):
                self.report(f"{name}[{i}]", f"expected a string, got {x!r}")
                continue
            out.append(str(x))
        return tuple(out)

    def path(self, name: str, *, must_exist: bool = False) -> Path | None:
        v = self.string(name)
        if v is None or v == "":
            return None
        p = Path(v).expanduser()
        if must_exist and not p.is_file():
            return self._fail(name, f"file {str(p)!r} does not exist or is not a file", None)
        return p

    def warn_unknown(self) -> None:
        for k in self.data:
            if k not in self._seen:
                logger.warning("%s: unknown configuration key %s (ignored)", self.file, self.key(str(k)))


@dataclass(frozen=True, slots=True)
class TlsConfig:
    port: int
    cert: Path
    key: Path
    chain: Path | None = None


@dataclass(frozen=True, slots=True)
class BacklogConfig:
    #: events kept for replay; 0 disables the backlog
    size: int = 0
    #: seconds an event is kept; 0 = no age limit
    max_age: float = 0.0
    #: path of the persistent log; None = memory only (or Redis, see ``redis_url``)
    storage: Path | None = None
    #: ``storage`` given as a redis:// URL: the cluster log on Redis Streams; None = not a cluster
    redis_url: str | None = None
    #: the Redis Streams key every node of one cluster shares
    stream: str = DEFAULT_STREAM
    #: seconds an append may wait for Redis (then 503 + Retry-After)
    timeout: float = DEFAULT_LOG_TIMEOUT
    #: most events one replay request may send; 0 = no cap (not advised)
    max_replay: int = DEFAULT_MAX_REPLAY
    #: with storage: sync each (group) commit to disk before the 2xx (power-loss safe);
    #: false still survives a process crash (kill -9) but not a power cut
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``server.admin``: the operators' listener (/metrics, /healthz, /readyz, /status, /)."""

    #: None: no admin listener (the default)
    port: int | None = None
    bind: tuple[str, ...] = DEFAULT_BIND


@dataclass(frozen=True, slots=True)
class ServerConfig:
    port: int = DEFAULT_PORT
    bind: tuple[str, ...] = DEFAULT_BIND
    max_payload_size: int = DEFAULT_MAX_PAYLOAD
    backlog: BacklogConfig = field(default_factory=BacklogConfig)
    tls: TlsConfig | None = None
    stream_buffer: int = DEFAULT_STREAM_BUFFER
    ping_interval: float = DEFAULT_PING_INTERVAL
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    #: send ``X-Subscribers`` on HEAD (it reveals how many clients are connected)
    subscriber_header: bool = True
    #: origins allowed cross-origin access (CORS, WebSocket handshakes); ("*",) = any origin
    #: without credentials; () = none (the default: same-origin only)
    cors_origins: tuple[str, ...] = ()
    #: serve plain publishes and subscriptions through the fast lane (false: aiohttp only)
    fast_lane: bool = True
    #: open client connections at most, on all listeners together; 0 disables the limit
    max_connections: int = 0
    #: open client connections at most from one IP address; 0 disables the limit
    max_connections_per_ip: int = 0
    #: seconds to send a complete request head (a total, from the connection)
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: ``text`` or ``json`` (one JSON object per line); ``--log-format`` overrides it
    log_format: str = "text"


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    payloaders: netaddr.IPSet = field(default_factory=netaddr.IPSet)
    oldschoolers: tuple[str, ...] = ()
    secure_topics: frozenset[str] = frozenset()
    #: the raw ``clients.ldap`` section (parsed by the LDAP plugin when configured)
    ldap: Section | None = None


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    server: ServerConfig
    clients: ClientsConfig
    #: the raw ``sqs`` section (parsed by the SQS plugin when configured)
    sqs: Section | None = None


class ConfigErrors(ConfigError):
    """Every error found in one file (each a :class:`ConfigError`), reported together."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.file, first.key, first.message)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


LOG_FORMATS = ("text", "json")


def _parse_cidrs(sec: Section, name: str) -> netaddr.IPSet:
    out = netaddr.IPSet()
    for i, entry in enumerate(sec.strings(name)):
        try:
            net = netaddr.IPNetwork(entry.strip()).cidr  # host bits allowed: 10.0.0.1/24
        except (netaddr.AddrFormatError, ValueError, TypeError):
            sec.report(f"{name}[{i}]", f"{entry!r} is not an IP address or CIDR")
            continue
        out.add(net)
    return out


def _parse_bind(sec: Section, default: tuple[str, ...] = DEFAULT_BIND) -> tuple[str, ...]:
    """Addresses or host names (resolved when listening: see ``server.run.resolve_binds``)."""
    binds = sec.strings("bind", default)
    for i, b in enumerate(binds):
        if b in ("", "*"):
            continue
        try:
            netaddr.IPAddress(b)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            if not re.match(r"^[A-Za-z0-9.-]+$", b):
                sec.report(f"bind[{i}]", f"{b!r} is not an address")
    return binds


_ORIGIN_RE = re.compile(r"^(https?)://([a-z0-9.\-]+|\[[0-9a-f:.]+\])(:\d{1,5})?$")


def _parse_origins(sec: Section, name: str) -> tuple[str, ...]:
    """``"*"`` or a list of ``scheme://host[:port]`` origins, normalised to lower case."""
    raw = sec.strings(name)
    if raw == ("*",):
        return raw
    out = []
    for i, o in enumerate(raw):
        norm = o.strip().rstrip("/").lower()
        if not _ORIGIN_RE.match(norm):
            raise ConfigError(sec.file, f"{sec.key(name)}[{i}]",
                              f"{o!r} is not an origin such as https://example.org or \"*\" alone")
        out.append(norm)
    return tuple(out)


def _parse_admin(srv: Section) -> AdminConfig:
    a = srv.section("admin")
    port = a.port("port", 0) if a.has("port") else None
    admin = AdminConfig(port=port, bind=_parse_bind(a))
    a.warn_unknown()
    return admin


def parse_config(data: object, file: str) -> Config:
    """Validate a parsed YAML document. Raises ConfigErrors naming file and key of every error."""
    errors: list[ConfigError] = []
    top = Section(data, file, "", errors)
    srv = top.section("server")
    bl = srv.section("backlog")
    raw_storage = bl.string("storage") or ""
    redis_url = raw_storage if raw_storage.startswith(REDIS_SCHEMES) else None
    stream = bl.string("stream", DEFAULT_STREAM) or ""
    if not stream:
        raise bl.error("stream", "must name a Redis key")
    timeout = bl.duration("timeout", DEFAULT_LOG_TIMEOUT)
    if timeout <= 0:
        raise bl.error("timeout", "must be more than 0 seconds")
    backlog = BacklogConfig(
        size=bl.integer("size", 0, minimum=0),
        max_age=bl.duration("max_age", 0.0),
        storage=None if redis_url else bl.path("storage"),
        redis_url=redis_url,
        stream=stream,
        timeout=timeout,
        max_replay=bl.integer("max_replay", DEFAULT_MAX_REPLAY, minimum=0),
        fsync=bl.typed("fsync", bool, True),
    )
    bl.warn_unknown()
    tls = None
    if srv.has("tls"):
        t = srv.section("tls")
        if t.has("port") or t.has("cert") or t.has("key"):
            missing = [req for req in ("port", "cert", "key") if not t.has(req)]
            for req in missing:
                t.report(req, "is required when server.tls is set")
            cert = t.path("cert", must_exist=True)
            key = t.path("key", must_exist=True)
            port = t.port("port", 0)
            chain = t.path("chain", must_exist=True)
            if cert is not None and key is not None and not missing:
                tls = TlsConfig(port=port, cert=cert, key=key, chain=chain)
        t.warn_unknown()
    log_format = srv.string("log_format", "text") or "text"
    if log_format not in LOG_FORMATS:
        srv.report("log_format", f"must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
        log_format = "text"
    server = ServerConfig(
        port=srv.port("port", DEFAULT_PORT),
        bind=_parse_bind(srv),
        max_payload_size=srv.size("max_payload_size", DEFAULT_MAX_PAYLOAD),
        backlog=backlog,
        tls=tls,
        stream_buffer=srv.size("stream_buffer", DEFAULT_STREAM_BUFFER),
        ping_interval=srv.duration("ping_interval", DEFAULT_PING_INTERVAL),
        shutdown_grace=srv.duration("shutdown_grace", DEFAULT_SHUTDOWN_GRACE),
        subscriber_header=srv.typed("subscriber_header", bool, True),
        cors_origins=_parse_origins(srv, "cors_origins"),
        fast_lane=srv.typed("fast_lane", bool, True),
        max_connections=srv.integer("max_connections", 0, minimum=0),
        max_connections_per_ip=srv.integer("max_connections_per_ip", 0, minimum=0),
        header_timeout=srv.duration("header_timeout", DEFAULT_HEADER_TIMEOUT),
        admin=_parse_admin(srv),
        log_format=log_format,
    )
    if server.header_timeout <= 0:
        srv.report("header_timeout", "must be positive")
    if server.ping_interval <= 0:
        srv.report("ping_interval", "must be positive")
    if server.stream_buffer < 65536:
        srv.report("stream_buffer", "must be at least 65536 bytes")
    srv.warn_unknown()

    cl = top.section("clients")
    clients = ClientsConfig(
        payloaders=_parse_cidrs(cl, "payloaders"),
        oldschoolers=tuple(s for s in cl.strings("oldschoolers") if s),
        secure_topics=frozenset(cl.strings("secure_topics")),
        ldap=cl.detached("ldap") if cl.has("ldap") else None,
    )
    cl.warn_unknown()
    sqs = top.detached("sqs") if top.has("sqs") else None
    top.warn_unknown()
    if errors:
        raise ConfigErrors(errors)
    if not clients.payloaders:
        logger.warning("%s: clients.payloaders is empty: nobody can publish over HTTP "
                       "(list the addresses allowed to publish)", file)
    return Config(file=file, server=server, clients=clients, sqs=sqs)


def load_config(path: str | None) -> Config:
    """Read and validate ``path``; ``None`` means the embedded defaults."""
    if path is None:
        return parse_config(yaml.safe_load(DEFAULT_CONFIG_TEXT), "(embedded defaults)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "(file)", f"not UTF-8: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "(file)", f"invalid YAML: {e}") from None
    return parse_config(data, path)
