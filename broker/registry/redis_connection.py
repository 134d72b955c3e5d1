"""How the broker reaches Redis: settings, credentials, TLS and clients.

Kept apart from the store so that everything touching secrets on disk
(the password file, client certificates) and the choice between one
server and Redis Cluster sits in one place, and tools and tests can wait
for a server without pulling in the store's threads.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RedisOptions:
    """How to reach Redis (the ``redis_*`` settings of ``[registry]``)."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    key_prefix: str = "ssp"
    username: str = ""
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    stream_length: int = 100_000
    #: seconds to connect, and to wait for a reply (more than the change
    #: stream reader's block, redis_follow.READ_BLOCK).
    timeout: float = 5.0

    @classmethod
    def of(cls, section, password_file: bool = True) -> "RedisOptions":
        """The options of a config's ``[registry]`` section (RegistrySettings);
        ``password_file`` False leaves the file out (nothing is read then)."""
        return cls(url=section.redis_url, cluster=section.redis_cluster,
                   key_prefix=section.redis_key_prefix, username=section.redis_username,
                   password_file=section.redis_password_file if password_file else "",
                   tls_ca_file=section.redis_tls_ca_file,
                   tls_cert_file=section.redis_tls_cert_file,
                   tls_key_file=section.redis_tls_key_file,
                   wait_replicas=section.redis_wait_replicas,
                   wait_timeout=section.redis_wait_timeout,
                   timeout=section.redis_timeout,
                   stream_length=section.redis_stream_length)


def _client_options(options):
    """redis-py keyword arguments for ``options``: timeouts, ACL user,
    password (read from its file, never from the settings) and TLS.

    Every reply has a deadline (``timeout``, plus ``WAIT``'s when replicas are
    awaited): without one, a Redis that stops answering without closing the
    connection (a hung host, a partition) would leave every write waiting
    forever instead of failing with StoreError."""
    deadline = options.timeout + (options.wait_timeout if options.wait_replicas else 0.0)
    kwargs = {"socket_timeout": deadline, "socket_connect_timeout": options.timeout,
              "health_check_interval": 30}
    if options.username:
        kwargs["username"] = options.username
    if options.password_file:
        with open(options.password_file, encoding="utf-8") as handle:
            kwargs["password"] = handle.read().strip()
    if options.tls_ca_file or options.tls_cert_file:
        kwargs["ssl_ca_certs"] = options.tls_ca_file or None
        kwargs["ssl_certfile"] = options.tls_cert_file or None
        kwargs["ssl_keyfile"] = options.tls_key_file or None
        if not options.url.startswith("rediss://"):
            kwargs["ssl"] = True
    return kwargs


def _single_server(url, kwargs):
    """kwargs for ``Redis.from_url``: TLS on a redis:// URL is its connection class
    (from_url hands ``ssl=True`` to the connection, which takes no such argument)."""
    import redis
    kwargs = dict(kwargs)
    if url.startswith("redis://") and kwargs.pop("ssl", False):
        kwargs["connection_class"] = redis.SSLConnection
    return kwargs


def client_problem(settings) -> str | None:
    """What redis-py refuses in ``[registry]`` settings (``settings``: the config's
    RegistrySettings), found without connecting: an option of redis_url it cannot
    parse (``?socket_timeout=abc``) or does not take (``?ssl_cert_reqs=x`` on
    redis://). One line that never repeats the URL (it may hold a password)."""
    import redis
    options = RedisOptions.of(settings, password_file=False)
    kwargs = _client_options(options)      # no password_file: nothing is read
    if options.url.startswith("unix://") and "ssl" in kwargs:
        return ("a unix:// socket takes no TLS: registry.redis_tls_ca_file and "
                "redis_tls_cert_file are for redis:// and rediss://")
    try:
        if options.cluster:
            # RedisCluster.from_url connects at once; its node clients are built so.
            from redis.cluster import cleanup_kwargs
            from redis.connection import parse_url
            kwargs.update(parse_url(options.url))
            pool = redis.Redis(**cleanup_kwargs(**kwargs)).connection_pool
        else:
            pool = redis.ConnectionPool.from_url(options.url,
                                                 **_single_server(options.url, kwargs))
        # Built, never connected: the connection checks its own arguments.
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError, redis.RedisError) as problem:
        message = " ".join(str(problem).split()) or type(problem).__name__
        unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
        if unknown:
            name = unknown.group(1)
            message = f"it takes no option ?{name}= with this URL" + (
                " (a TLS option: TLS is rediss:// or the redis_tls_* settings)"
                if name.startswith("ssl") else "")
        if redacted(options.url) != options.url:
            message = message.replace(options.url, redacted(options.url))
        return f"redis-py cannot use it: {message}"
    return None


def redacted(url: str) -> str:
    """``url`` with any password in it replaced by ``***``, for messages and logs
    (the docs say to use redis_password_file, but a URL may still carry one)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = userinfo.partition(":")[0] + ":***@" + host
        query = parts.query
        if "password" in query:
            query = urlencode([(key, "***" if key == "password" else value)
                               for key, value in parse_qsl(query, keep_blank_values=True)])
        if netloc == parts.netloc and query == parts.query:
            return url
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "(a URL that cannot be parsed)"


def _cluster_errors():
    """redis-py's Cluster set-up errors, which are not RedisError."""
    from redis.exceptions import RedisClusterException
    return RedisClusterException


class Connector:
    """Gives a plain redis-py client talking to the primary that holds our slot.

    On one server that is the server. On Cluster, every key has our hash
    tag, so one node holds them all; after a failover or a moved slot
    (MOVED, connection refused) ``refresh()`` asks the cluster again.
    """

    def __init__(self, options):
        import redis
        self.options = options
        self.tag = "{" + options.key_prefix + "}"
        kwargs = _client_options(options)
        if options.cluster:
            # Its node clients never re-send a command (redis-py sets that).
            from redis.cluster import RedisCluster
            try:
                self._cluster = RedisCluster.from_url(options.url, **kwargs)
            except _cluster_errors() as e:
                # "Cannot be connected": a RedisError for every caller.
                raise redis.ConnectionError(str(e)) from None
        else:
            # Never re-send a command whose connection dropped: Redis may have
            # run it (a change script would run twice). The caller fails instead.
            from redis.backoff import NoBackoff
            from redis.retry import Retry
            kwargs = _single_server(options.url, kwargs)
            kwargs["retry"] = Retry(NoBackoff(), 0)
            self._cluster = None
            self._kwargs = kwargs
            self._redis = redis
        self._clients = []

    def client(self):
        """A new connection (each thread keeps its own)."""
        if self._cluster is None:
            client = self._redis.Redis.from_url(self.options.url, **self._kwargs)
        else:
            import redis
            try:
                node = self._cluster.get_node_from_key(self.tag)
            except _cluster_errors() as e:
                raise redis.ConnectionError(str(e)) from None
            pool = self._cluster.get_redis_connection(node).connection_pool
            client = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **pool.connection_kwargs))
        self._clients.append(client)
        return client

    def discard(self, client):
        """Close a client given by ``client()`` that its thread replaces."""
        if client in self._clients:
            self._clients.remove(client)
        client.close()

    def refresh(self):
        """Ask the cluster again where our slot is (redis.RedisError if it cannot
        tell: the writer and stream threads catch only that, and must not die)."""
        if self._cluster is not None:
            try:
                self._cluster.nodes_manager.initialize()
            except _cluster_errors() as e:
                import redis
                raise redis.ConnectionError(str(e)) from None

    def close(self):
        for client in self._clients:
            client.close()
        if self._cluster is not None:
            self._cluster.close()


def wait_for_redis(url, timeout=10.0, check=None):
    """Block until a Redis server answers PING (tools and tests).

    ``check()``, if given, runs before each attempt and raises to give up
    early (a test's server process that exited)."""
    import redis
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    end = time.monotonic() + timeout
    try:
        while True:
            if check is not None:
                check()
            try:
                if client.ping():
                    return
            except (redis.RedisError, OSError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    finally:
        client.close()
