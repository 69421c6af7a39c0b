"""What SHOAL_REDIS_URL names, read once: one Redis, over TCP or TLS, or the Sentinels that
watch a replicated primary; and how redis-py and Celery's broker each spell it.

Accepted forms (docs/deployment.md, "An external Redis"):

    redis://[[user]:password@]host:port[/db]
    rediss://[[user]:password@]host:port[/db][?ssl_ca_certs=/path/ca.pem]
    sentinel://[[user]:password@]host:port[,host:port...][/db]?master_name=NAME
        [&sentinel_password=PASSWORD]

`rediss://` always verifies the server's certificate and host name: against `ssl_ca_certs`, else
SHOAL_REDIS_CA_FILE, else the system's CAs; there is no option to turn verification off. In a
`sentinel://` URL the password is the primary's (and its replicas'); `sentinel_password` is the
Sentinels' own, when they have one. Any other query parameter is refused, so a misspelt option
never silently means "no TLS" or "no password".
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

SCHEMES = ("redis", "rediss", "sentinel")
OPTIONS: dict[str, set[str]] = {
    "redis": set(),
    "rediss": {"ssl_ca_certs"},
    "sentinel": {"master_name", "sentinel_password"},
}
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "sentinel": 26379}


class BadRedisURL(SystemExit):
    """SHOAL_REDIS_URL is malformed: the processes refuse to start and say why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"SHOAL_REDIS_URL: {message}")


@dataclass(frozen=True)
class RedisTarget:
    scheme: str
    hosts: tuple[tuple[str, int], ...]  # the Redis, or every Sentinel
    db: int = 0
    username: str | None = None
    password: str | None = None
    ca_file: str = ""
    master_name: str = ""
    sentinel_password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"

    def redis_kwargs(self) -> dict:
        """Keyword arguments of redis.Redis (or Sentinel.master_for) for the server itself."""
        kwargs: dict = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            kwargs.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True)
            if self.ca_file:
                kwargs["ssl_ca_certs"] = self.ca_file
        return kwargs

    def celery_broker(self) -> tuple[str, dict]:
        """Celery's broker URL and the configuration that goes with it: `broker_use_ssl` for
        TLS; for Sentinel, kombu's `sentinel://h:p;sentinel://h:p` list, with the primary's
        name and the Sentinels' password in `broker_transport_options`."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        urls = [f"{self.scheme}://{auth}{_netloc(h, p)}/{self.db}" for h, p in self.hosts]
        config: dict = {}
        if self.tls:
            use_ssl: dict = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
            if self.ca_file:
                use_ssl["ssl_ca_certs"] = self.ca_file
            config["broker_use_ssl"] = use_ssl
        transport: dict = {}
        if self.sentinel:
            transport["master_name"] = self.master_name
            transport["sentinel_kwargs"] = self.sentinel_kwargs()
        return ";".join(urls), {**config, "broker_transport_options": transport}

    def sentinel_kwargs(self) -> dict:
        """How to talk to the Sentinels themselves."""
        kwargs: dict = {"socket_timeout": 5, "socket_connect_timeout": 5}
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise BadRedisURL(f"a host is missing in {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise BadRedisURL(f"bad port in {text!r}") from None
    if not 0 < port < 65536:
        raise BadRedisURL(f"bad port in {text!r}")
    return host, port


def parse(url: str, ca_file: str = "") -> RedisTarget:
    """The Redis that `url` names; `ca_file` (SHOAL_REDIS_CA_FILE) applies to rediss://."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise BadRedisURL(f"the scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts = tuple(_host_port(h, DEFAULT_PORTS[scheme]) for h in hostlist.split(","))
    if scheme != "sentinel" and len(hosts) != 1:
        raise BadRedisURL("only a sentinel:// URL lists several hosts")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise BadRedisURL(f"the path must be a database number, not {path!r}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - OPTIONS[scheme]
    if unknown:
        raise BadRedisURL(f"{scheme}:// takes no option {', '.join(sorted(unknown))}")
    if scheme == "sentinel" and not query.get("master_name"):
        raise BadRedisURL("a sentinel:// URL needs ?master_name=NAME (the monitored primary)")
    return RedisTarget(
        scheme=scheme,
        hosts=hosts,
        db=db,
        username=username,
        password=password,
        ca_file=query.get("ssl_ca_certs") or ca_file,
        master_name=query.get("master_name", ""),
        sentinel_password=query.get("sentinel_password") or None,
    )
