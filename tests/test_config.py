"""Tests for broker.config: defaults, the example file, and every kind of bad input."""

import dataclasses
import os
import re
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from broker.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "broker.toml"


class DefaultsTests(SynchronousTestCase):
    def test_no_file_gives_embedded_defaults(self):
        """Without a file every setting has its default: HTTP and UDP on loopback."""
        config = load_config(None)
        self.assertEqual(config.http.endpoint, "tcp:8080:interface=127.0.0.1")
        self.assertEqual((config.ssp.host, config.ssp.port), ("127.0.0.1", 60001))
        self.assertEqual(config.broker.data_dir, "broker-data")

    def test_example_file_names_every_setting_with_its_default(self):
        """etc/broker.toml sets every known setting, each to its default value."""
        with open(EXAMPLE, "rb") as handle:
            document = tomllib.load(handle)
        defaults = Config()
        for section in dataclasses.fields(Config):
            if section.name == "source":
                continue
            settings = getattr(defaults, section.name)
            for spec in dataclasses.fields(settings):
                self.assertIn(spec.name, document.get(section.name, {}),
                              f"{section.name}.{spec.name} missing from etc/broker.toml")
        self.assertEqual(dataclasses.replace(load_config(str(EXAMPLE)), source="x"),
                         dataclasses.replace(defaults, source="x"))

    def test_partial_file_keeps_other_defaults(self):
        """A file that sets one key changes that key only."""
        config = parse_config({"ssp": {"port": 7000}})
        self.assertEqual(config.ssp.port, 7000)
        self.assertEqual(config.ssp.host, "127.0.0.1")
        self.assertEqual(config.http, Config().http)

    def test_integer_accepted_for_float(self):
        """TOML integers are accepted where a number of seconds is expected."""
        self.assertEqual(parse_config({"polling": {"max_wait": 5}}).polling.max_wait, 5.0)


class BadInputTests(SynchronousTestCase):
    def assertRefused(self, document, *fragments):
        with self.assertRaises(ConfigError) as caught:
            parse_config(document, source="broker.toml")
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("broker.toml: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_unknown_section(self):
        """An unknown section is named, with the known ones listed."""
        self.assertRefused({"sssp": {}}, "[sssp]", "unknown section", "ssp")

    def test_unknown_key(self):
        """An unknown key is named with its section."""
        self.assertRefused({"ssp": {"prot": 1}}, "ssp.prot", "unknown setting", "port")

    def test_wrong_type(self):
        """A string where an integer belongs names the key and both types."""
        self.assertRefused({"ssp": {"port": "60001"}}, "ssp.port", "must be an integer",
                           "not a string")

    def test_boolean_is_not_an_integer(self):
        """true is refused where a number is expected, though Python counts bool as int."""
        self.assertRefused({"ssp": {"port": True}}, "ssp.port", "not a boolean")

    def test_out_of_range(self):
        """A port above 65535 is refused with the bound."""
        self.assertRefused({"ssp": {"port": 70000}}, "ssp.port", "at most 65535")

    def test_below_range(self):
        """A negative wait is refused with the bound."""
        self.assertRefused({"polling": {"max_wait": -1}}, "polling.max_wait", "at least 0")

    def test_not_a_choice(self):
        """A log level outside the list names the allowed values."""
        self.assertRefused({"log": {"level": "loud"}}, "log.level", "'debug'", "'loud'")

    def test_section_not_a_table(self):
        """A section given as a plain value is refused."""
        self.assertRefused({"ssp": 3}, "ssp", "must be a table")

    def test_array_items_checked(self):
        """Every item of an array setting is type checked."""
        self.assertRefused({"http": {"allowed_origins": ["https://a", 3]}},
                           "http.allowed_origins", "every item must be a string")

    def test_allowed_origins_must_be_origins(self):
        """An allowed_origins entry that is no scheme://host[:port] is refused with the key when the file is read (start and reload alike)."""
        self.assertRefused({"http": {"allowed_origins": ["https://ok.example", "dash.example.com"]}},
                           "http.allowed_origins", "'dash.example.com'", "http://")
        self.assertRefused({"http": {"allowed_origins": ["https://dash.example.com/app"]}},
                           "http.allowed_origins", "scheme://host:port only")
        origins = ("*", "https://dash.example.com", "http://[::1]:8080")
        self.assertEqual(parse_config({"http": {"allowed_origins": list(origins)}})
                         .http.allowed_origins, origins)

    def test_subsecond_ping_refused(self):
        """A ping interval between 0 and 1 s is refused: Autobahn would drop live clients."""
        self.assertRefused({"websocket": {"ping_timeout": 0.5}}, "websocket.ping_timeout",
                           "at least 1.0")

    def test_related_settings_checked(self):
        """offline_after shorter than the heartbeat is refused."""
        self.assertRefused({"ssp": {"offline_after": 5.0, "device_heartbeat": 25.0}},
                           "ssp.offline_after", "device_heartbeat")

    def test_lease_check_interval_at_most_half_the_ttl(self):
        """A Redis lease checked less often than twice per TTL is refused; half is accepted."""
        self.assertRefused({"registry": {"redis_lease_ttl": 10.0,
                                         "redis_lease_check_interval": 6.0}},
                           "registry.redis_lease_check_interval", "half")
        config = parse_config({"registry": {"redis_lease_ttl": 10.0,
                                            "redis_lease_check_interval": 5.0}})
        self.assertEqual(config.registry.redis_lease_check_interval, 5.0)

    def test_host_name_refused_for_udp(self):
        """ssp.host must be an IP literal: the UDP listener binds an address, never a host name."""
        message = self.assertRefused({"ssp": {"host": "not an address"}}, "ssp.host",
                                     "must be an IP address", "not a host name",
                                     "'not an address'")
        self.assertNotIn("Traceback", message)

    def test_malformed_ipv6_host_refused(self):
        """A malformed IPv6 literal such as "::1x" is refused with the key."""
        self.assertRefused({"ssp": {"host": "::1x"}}, "ssp.host", "'::1x'")

    def test_ip_literals_accepted_as_host(self):
        """IPv4 and IPv6 literals, including the wildcards, are valid hosts."""
        for host in ("127.0.0.1", "0.0.0.0", "::1", "::"):
            self.assertEqual(parse_config({"ssp": {"host": host}}).ssp.host, host)

    def test_public_url_not_a_url(self):
        """A public_url that is no http(s) URL is blamed on http.public_url, not allowed_origins."""
        message = self.assertRefused({"http": {"public_url": "nope"}}, "http.public_url",
                                     "http://", "'nope'")
        self.assertNotIn("allowed_origins", message)

    def test_public_url_without_host_or_with_bad_port(self):
        """A public_url without a host, or with a port out of range, is refused with the key."""
        self.assertRefused({"http": {"public_url": "https:///iot"}}, "http.public_url",
                           "no host")
        self.assertRefused({"http": {"public_url": "https://iot.example.com:99999/"}},
                           "http.public_url", "invalid port")

    def test_public_url_with_credentials_is_refused_without_repeating_them(self):
        """A public_url carrying user:password@ is refused, and the message never
        shows the password (it goes to logs and the journal)."""
        for url in ("https://ops:hunter2@iot.example.com/", "ftp://ops:hunter2@iot/",
                    "https://ops:hunter2@iot.example.com:99999/"):
            message = self.assertRefused({"http": {"public_url": url}}, "http.public_url",
                                         "user name or password")
            self.assertNotIn("hunter2", message)

    def test_nan_refused(self):
        """A TOML nan is refused for a number of seconds: it would pass every range check."""
        self.assertRefused({"broker": {"stop_timeout": float("nan")}}, "broker.stop_timeout",
                           "not nan")
        self.assertRefused({"ssp": {"device_heartbeat": float("nan")}}, "ssp.device_heartbeat",
                           "not nan")

    def test_integer_too_large_for_a_float_setting(self):
        """An integer beyond a float's range (400 digits) for a number of seconds is one
        ConfigError naming the key and the bound, not an OverflowError."""
        message = self.assertRefused({"broker": {"stop_timeout": 10 ** 400}},
                                     "broker.stop_timeout: must be at most 300.0",
                                     "an integer of 401 digits")
        self.assertLess(len(message), 200)
        self.assertRefused({"ssp": {"park_after": -10 ** 400}}, "ssp.park_after: must be at least")

    def test_huge_integer_is_shown_by_its_size(self):
        """An integer setting given 400 digits is refused naming its size, not printing them."""
        message = self.assertRefused({"broker": {"workers": 10 ** 400}},
                                     "broker.workers: must be at most 64, not an integer of 401 digits")
        self.assertNotIn("0" * 40, message)

    def test_redis_backend_without_the_redis_package(self):
        """Without the redis extra installed, backend = "redis" is one line saying how to
        install it (before: a traceback from the URL check's import)."""
        import importlib.util
        real = importlib.util.find_spec
        self.patch(importlib.util, "find_spec",
                   lambda name, *a: None if name == "redis" else real(name, *a))
        self.assertRefused({"registry": {"backend": "redis"}},
                           "registry.backend:", "pip install '.[redis]'")

    def test_long_string_is_shown_by_its_start(self):
        """A 100 KB string refused is shown by its first characters and its length,
        so the refusal stays a line to read."""
        message = self.assertRefused({"log": {"format": "x" * 100_000}}, "log.format:",
                                     "(100000 characters)")
        self.assertLess(len(message), 400)

    def test_redis_url_with_an_unclosed_ipv6_bracket(self):
        """A redis_url whose IPv6 bracket is not closed (or not opened) is a ConfigError
        naming registry.redis_url, never urlsplit's ValueError."""
        for url in ("redis://[::1:6379/0", "redis://::1]:6379/0", "rediss://u:pw@[::1/0"):
            message = self.assertRefused({"registry": {"backend": "redis", "redis_url": url}},
                                         "registry.redis_url: is not a valid URL",
                                         "redis://[::1]:6379/0")
            self.assertNotIn("pw@", message)

    def test_a_cross_check_that_raises_names_its_key(self):
        """A rule that raises ValueError or OverflowError on a value nobody foresaw is a
        ConfigError naming its key (the backstop), never a traceback."""
        from broker import config as module

        def raising(url, cluster):
            raise OverflowError("unforeseen")
        self.patch(module, "_redis_url_problem", raising)
        self.assertRefused({"registry": {"backend": "redis"}},
                           "registry.redis_url: cannot be used: unforeseen")

    def test_empty_data_dir_refused(self):
        """An empty data_dir is refused rather than taken as the working directory (made 0700)."""
        self.assertRefused({"broker": {"data_dir": ""}}, "broker.data_dir", "must not be empty")

    def test_empty_http_endpoint_named(self):
        """An empty http.endpoint is blamed on itself, not on metrics.endpoint."""
        message = self.assertRefused({"http": {"endpoint": ""}}, "http.endpoint",
                                     "must not be empty")
        self.assertNotIn("metrics.endpoint", message)

    def test_endpoint_port_out_of_range(self):
        """A tcp:, tcp6: or ssl: port outside 0-65535, positional or port=, is refused with the key before any bind."""
        self.assertRefused({"http": {"endpoint": "tcp:70000:interface=127.0.0.1"}},
                           "http.endpoint", "0 to 65535", "not 70000")
        self.assertRefused({"metrics": {"endpoint": "tcp6:port=-1"}},
                           "metrics.endpoint", "0 to 65535", "not -1")
        self.assertRefused({"http": {"endpoint": "ssl:65536:privateKey=k.pem"}},
                           "http.endpoint", "not 65536")
        for endpoint in ("tcp:0", "tcp:65535:interface=\\:\\:1", "unix:/run/b.sock",
                         "systemd:domain=INET:index=0", "ssl:port=8443:privateKey=k.pem"):
            self.assertEqual(parse_config({"http": {"endpoint": endpoint}}).http.endpoint,
                             endpoint)

    def test_endpoint_without_a_numeric_port(self):
        """A tcp:, tcp6: or ssl: endpoint with no port, or a port that is no number, is
        refused naming the key and the problem, not a Python argument or int() error."""
        message = self.assertRefused({"http": {"endpoint": "tcp:interface=127.0.0.1"}},
                                     "http.endpoint: has no port", "tcp:PORT")
        self.assertNotIn("positional", message)
        message = self.assertRefused({"http": {"endpoint": "tcp:http:interface=127.0.0.1"}},
                                     "http.endpoint: port must be a number", "not 'http'")
        self.assertNotIn("int()", message)
        self.assertRefused({"metrics": {"endpoint": "ssl:privateKey=k.pem"}},
                           "metrics.endpoint: has no port")
        self.assertRefused({"http": {"endpoint": "tcp:0:backlog=many"}},
                           "http.endpoint: backlog must be a whole number", "not 'many'")

    def test_malformed_redis_url_refused(self):
        """A redis_url whose port is out of range or no number, or whose database is no
        number, is refused naming registry.redis_url (redis-py would raise a traceback,
        or silently take database 0), without repeating a password."""
        def refused(url, *words, cluster=False):
            return self.assertRefused({"registry": {"backend": "redis", "redis_url": url,
                                                    "redis_cluster": cluster}},
                                      "registry.redis_url: ", *words)
        refused("redis://127.0.0.1:99999/0", "port must be a number of 1 to 65535", "'99999'")
        message = refused("redis://u:s3cret@127.0.0.1:63x9/0", "not '63x9'")
        self.assertNotIn("s3cret", message)
        refused("redis://127.0.0.1:0/0", "not '0'")
        refused("redis://127.0.0.1:6379/abc", "database must be a number", "not '/abc'")
        refused("redis://127.0.0.1:6379/1O", "not '/1O'")
        refused("unix:///run/redis.sock?db=one", "not '?db=one'")
        refused("unix://", "names no socket file")
        refused("redis://127.0.0.1:6379/2", "database 0 only", cluster=True)
        for url in ("redis://127.0.0.1:6379/0", "redis://127.0.0.1/3", "rediss://[::1]:6380",
                    "redis://h:6379/", "unix:///run/redis.sock?db=2"):
            config = parse_config({"registry": {"backend": "redis", "redis_url": url}})
            self.assertEqual(config.registry.redis_url, url)

    def test_redis_url_options_redis_py_refuses(self):
        """A redis_url option redis-py cannot parse or does not take (?socket_timeout=abc,
        ?max_connections=-1, ?ssl_cert_reqs= on redis://) is refused naming
        registry.redis_url, without repeating the URL or its password; what it takes passes."""
        def refused(query, *words, cluster=False):
            message = self.assertRefused(
                {"registry": {"backend": "redis", "redis_cluster": cluster,
                              "redis_url": f"redis://u:s3cret@127.0.0.1:6379/0?{query}"}},
                "registry.redis_url: redis-py cannot use it: ", *words)
            self.assertNotIn("s3cret", message)
            self.assertNotIn("127.0.0.1", message)
        refused("socket_timeout=abc", "'socket_timeout'")
        refused("health_check_interval=x", "'health_check_interval'")
        refused("max_connections=-1", "max_connections")
        refused("protocol=7", "protocol must be either 2 or 3")
        refused("ssl_cert_reqs=bogus", "no option ?ssl_cert_reqs=", "rediss://")
        refused("socket_timeout=abc", "'socket_timeout'", cluster=True)
        for url in ("redis://127.0.0.1:6379/0?socket_timeout=2&health_check_interval=10",
                    "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none",
                    "unix:///run/redis.sock?db=2&socket_timeout=1.5"):
            config = parse_config({"registry": {"backend": "redis", "redis_url": url}})
            self.assertEqual(config.registry.redis_url, url)

    def test_tls_settings_on_a_redis_url_make_tls_connections(self):
        """redis_tls_ca_file with a redis:// URL gives TLS connections (redis-py's from_url
        takes no ssl=True: the connection class says it), and the config accepts it;
        with a unix:// socket it is refused."""
        import redis

        from broker.backend import redis_options
        from broker.registry.redis_connection import Connector
        ca = self.mktemp()
        Path(ca).write_text("not read before a connection\n")
        config = parse_config({"registry": {"backend": "redis", "redis_tls_ca_file": ca,
                                            "redis_url": "redis://127.0.0.1:6379/0"}})
        connector = Connector(redis_options(config))
        self.addCleanup(connector.close)
        pool = connector.client().connection_pool
        self.assertIs(pool.connection_class, redis.SSLConnection)
        connection = pool.connection_class(**pool.connection_kwargs)
        self.assertEqual(connection.ca_certs, ca)
        self.assertRefused({"registry": {"backend": "redis", "redis_tls_ca_file": ca,
                                         "redis_url": "unix:///run/redis.sock"}},
                           "registry.redis_url: a unix:// socket takes no TLS")

    def test_nul_in_a_string_setting_is_refused(self):
        """A NUL in a path, endpoint or any other string (data_dir, the Redis files, a
        unix: endpoint, an origin) is refused in one line naming the key: the system
        calls would raise ValueError (a traceback) when the broker starts."""
        for section, key, value in (("broker", "data_dir", "a\0b"),
                                    ("registry", "redis_password_file", "/p\0w"),
                                    ("registry", "redis_tls_ca_file", "/c\0a"),
                                    ("registry", "redis_url", "redis://h\0:6379/0"),
                                    ("http", "endpoint", "unix:broker.sock\0y"),
                                    ("metrics", "endpoint", "unix:metrics.sock\0"),
                                    ("http", "allowed_origins", ["http://a\0b"])):
            message = self.assertRefused({section: {key: value}}, f"{section}.{key}: ",
                                         "must not contain a NUL character")
            self.assertNotIn("\0", message)

    def test_rate_and_keepalive_are_off_or_sensible(self):
        """http.max_requests_per_second and polling.sse_keepalive are 0 (off) or at least
        0.01 and 1.0: 1e-320 requests a second waited inf seconds (a 500 per request),
        a keepalive of 1e-300 s flooded every event stream."""
        self.assertRefused({"http": {"max_requests_per_second": 1e-320}},
                           "http.max_requests_per_second: must be 0 (no limit) or at least 0.01")
        self.assertRefused({"polling": {"sse_keepalive": 1e-300}},
                           "polling.sse_keepalive: must be 0 (none) or at least 1.0")
        self.assertRefused({"polling": {"sse_keepalive": 0.5}}, "polling.sse_keepalive")
        config = parse_config({"http": {"max_requests_per_second": 0.01},
                               "polling": {"sse_keepalive": 1.0}})
        self.assertEqual((config.http.max_requests_per_second, config.polling.sse_keepalive),
                         (0.01, 1.0))
        config = parse_config({"http": {"max_requests_per_second": 0},
                               "polling": {"sse_keepalive": 0}})
        self.assertEqual((config.http.max_requests_per_second, config.polling.sse_keepalive),
                         (0.0, 0.0))

    def test_setting_outside_any_section(self):
        """A key written above every [section] header is called a setting, not an unknown section."""
        message = self.assertRefused({"port": 60001}, "port: ", "outside any [section]",
                                     "below [ssp]")
        self.assertNotIn("unknown section", message)

    def test_typo_suggests_the_setting(self):
        """A misspelt key or section names the closest known one."""
        self.assertRefused({"ssp": {"prot": 1}}, "ssp.prot", "did you mean 'port'?")
        self.assertRefused({"sssp": {}}, "[sssp]", "did you mean [ssp]?")

    def test_redis_key_prefix_must_make_a_hash_tag(self):
        """An empty redis_key_prefix, or one with braces, is refused: every key must share one Cluster slot."""
        self.assertRefused({"registry": {"redis_key_prefix": ""}}, "registry.redis_key_prefix",
                           "must not be empty")
        self.assertRefused({"registry": {"redis_key_prefix": "a}b"}},
                           "registry.redis_key_prefix", "braces")
        config = parse_config({"registry": {"redis_key_prefix": "site-2"}})
        self.assertEqual(config.registry.redis_key_prefix, "site-2")

    def test_redis_timeout_reaches_the_client_options(self):
        """registry.redis_timeout is the Redis reply deadline; below half a second is refused."""
        from broker.backend import redis_options
        config = parse_config({"registry": {"backend": "redis", "redis_timeout": 2.5}})
        self.assertEqual(redis_options(config).timeout, 2.5)
        self.assertEqual(redis_options(parse_config({})).timeout, 5.0)
        self.assertRefused({"registry": {"redis_timeout": 0.1}}, "registry.redis_timeout",
                           "at least 0.5")

    def test_redis_sequence_check_interval_reaches_the_registry(self):
        """registry.redis_sequence_check_interval is how often a quiet process checks
        that Redis did not lose its data; the config passes it on to the registry."""
        from unittest import mock

        from broker import backend
        config = parse_config({"registry": {"backend": "redis",
                                            "redis_sequence_check_interval": 0.75}})
        with mock.patch("broker.registry.shared.open_shared_registry") as opened:
            backend.open_configured_registry(config, Path(self.mktemp()), reactor=None)
        self.assertEqual(opened.call_args.kwargs["sequence_check_interval"], 0.75)
        self.assertRefused({"registry": {"redis_sequence_check_interval": 0.1}},
                           "registry.redis_sequence_check_interval", "at least 0.5")

    def test_worker_failure_limit_and_window(self):
        """broker.worker_failure_limit (default 5, 0: never give up) and
        worker_failure_window (default 300 s) are checked, each refusal naming its key."""
        defaults = parse_config({}).broker
        self.assertEqual((defaults.worker_failure_limit, defaults.worker_failure_window),
                         (5, 300.0))
        config = parse_config({"broker": {"worker_failure_limit": 0,
                                          "worker_failure_window": 60}}).broker
        self.assertEqual((config.worker_failure_limit, config.worker_failure_window), (0, 60.0))
        self.assertRefused({"broker": {"worker_failure_limit": -1}},
                           "broker.worker_failure_limit", "at least 0")
        self.assertRefused({"broker": {"worker_failure_limit": 2.5}},
                           "broker.worker_failure_limit", "must be an integer")
        self.assertRefused({"broker": {"worker_failure_window": 0.5}},
                           "broker.worker_failure_window", "at least 1.0")

    def test_public_url_with_path_accepted(self):
        """A public_url with a path (behind a reverse proxy) is accepted as given."""
        url = "https://broker.example.com/iot/"
        self.assertEqual(parse_config({"http": {"public_url": url}}).http.public_url, url)


class FileTests(SynchronousTestCase):
    def test_unreadable_file(self):
        """A missing file is one line naming the file and the reason."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(str(caught.exception), f"{path}: cannot read: No such file or directory")

    def test_permission_denied(self):
        """A file the broker may not read is refused, not ignored."""
        if os.getuid() == 0:
            path = self.mktemp()
            os.mkdir(path)  # root reads any file; a directory is unreadable as a file for all
        else:
            path = self.mktemp()
            Path(path).write_text("")
            os.chmod(path, 0)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("cannot read", str(caught.exception))

    def test_invalid_toml(self):
        """A syntax error names the file and the position."""
        path = self.mktemp()
        Path(path).write_text("[ssp]\nport = \n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(f"{path}: not valid TOML", str(caught.exception))
        self.assertIn("line 2", str(caught.exception))

    def test_duplicate_key_is_named(self):
        """A key set twice is named with its section and both lines (tomllib says only
        "Cannot overwrite a value"); elements of an array of tables are told apart."""
        path = self.mktemp()
        for text, expected in (
                ("[ssp]\nport = 1\n\n# again\nport = 2\n", "ssp.port is set twice (lines 2 and 5)"),
                ("[ssp]\nport = 1\n'port' = 2", "ssp.port is set twice (lines 2 and 3)"),
                ("[[x]]\na = 1\n[[x]]\na = 2\nb = 1\nb = 2\n", "x.b is set twice (lines 5 and 6)")):
            Path(path).write_text(text)
            with self.assertRaises(ConfigError) as caught:
                load_config(path)
            self.assertEqual(str(caught.exception), f"{path}: not valid TOML: {expected}")

    def test_integer_of_more_than_4300_digits(self):
        """An integer too long for int() (tomllib's ValueError) is one line, not a traceback."""
        path = self.mktemp()
        Path(path).write_text("[broker]\nstop_timeout = 1" + "0" * 5000 + "\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}: not valid TOML: "))
        self.assertLess(len(str(caught.exception)), 300)

    def test_not_utf8(self):
        """A file that is not UTF-8 (a Latin-1 editor) is one line naming the line, no traceback."""
        path = self.mktemp()
        Path(path).write_bytes(b"[log]\nlevel = 'info'\n# caf\xe9\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(str(caught.exception),
                         f"{path}: not valid TOML: not UTF-8 text (at line 3)")

    def test_byte_order_mark_accepted(self):
        """A UTF-8 file that starts with a byte order mark (Windows editors) is read as UTF-8."""
        path = self.mktemp()
        Path(path).write_bytes(b"\xef\xbb\xbf[ssp]\nport = 6000\n")
        self.assertEqual(load_config(path).ssp.port, 6000)

    def test_bad_value_in_file_names_file_and_key(self):
        """load_config reports a bad ssp.host or http.public_url as one line: file, key, problem."""
        path = self.mktemp()
        for text, key in (("[ssp]\nhost = 'not an address'\n", "ssp.host"),
                          ("[http]\npublic_url = 'nope'\n", "http.public_url")):
            Path(path).write_text(text)
            with self.assertRaises(ConfigError) as caught:
                load_config(path)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"{path}: {key}: "), message)
            self.assertNotIn("\n", message)

    def test_file_source_recorded(self):
        """A loaded config remembers its file, for messages and reloads."""
        path = self.mktemp()
        Path(path).write_text("[http]\nendpoint = 'tcp:0'\n")
        config = load_config(path)
        self.assertEqual((config.source, config.http.endpoint), (path, "tcp:0"))


ROOT = EXAMPLE.parent.parent
DOCUMENTS = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]


def _settings():
    """{(section, key): default} of every setting the code knows."""
    defaults = Config()
    return {(section.name, spec.name): getattr(getattr(defaults, section.name), spec.name)
            for section in dataclasses.fields(Config) if section.name != "source"
            for spec in dataclasses.fields(getattr(defaults, section.name))}


def _resolve(section, key, settings):
    """(section, key) of a setting named with or without its section; None if it is none."""
    if section is not None:
        return (section, key)
    homes = [found for found in settings if found[1] == key]
    return homes[0] if len(homes) == 1 else None


class DocumentationTests(SynchronousTestCase):
    """The docs and the README name real settings and state their defaults as the code has them."""

    def test_sectioned_names_are_settings(self):
        """Every `[section] key` the docs mention is a setting of that section."""
        settings = _settings()
        checked = 0
        for document in DOCUMENTS:
            for section, key in re.findall(r"`\[(\w+)\] (\w+)", document.read_text()):
                self.assertIn((section, key), settings,
                              f"{document.name}: [{section}] {key} is no setting")
                checked += 1
        self.assertGreaterEqual(checked, 10)   # the pattern still finds the docs' names

    def test_stated_defaults_match(self):
        """A default the prose states, "`key` seconds (default 10)" or "`key` (8)", is the code's default."""
        settings = _settings()
        pattern = re.compile(r"`(?:\[(\w+)\] )?(\w+)`[^`()|]{0,30}\((?:default )?(-?\d[\d.]*)\)")
        checked = 0
        for document in DOCUMENTS:
            text = " ".join(document.read_text().split())
            for section, key, stated in pattern.findall(text):
                found = _resolve(section or None, key, settings)
                if found is None:
                    continue  # not a setting (a query parameter, an option of the node)
                self.assertEqual(float(stated), settings[found],
                                 f"{document.name}: {found[0]}.{key} stated as {stated}")
                checked += 1
        self.assertGreaterEqual(checked, 5)

    def test_settings_tables_match(self):
        """Rows "| `[section] key` | default | ..." of a settings table give the code's default."""
        settings = _settings()
        checked = 0
        for document in DOCUMENTS:
            for line in document.read_text().splitlines():
                row = re.match(r"\| *`\[(\w+)\] (\w+)` *\| *([^|]+?) *\|", line)
                if row is None:
                    continue
                section, key, stated = row.groups()
                value = tomllib.loads(f"v = {stated.strip('`')}")["v"]
                default = settings[(section, key)]
                self.assertEqual(tuple(value) if isinstance(value, list) else value, default,
                                 f"{document.name}: {section}.{key} stated as {stated}")
                checked += 1
        self.assertGreaterEqual(checked, 10)

    def test_toml_examples_load(self):
        """Every ```toml block of the docs is a configuration the broker accepts."""
        blocks = 0
        for document in DOCUMENTS:
            for block in re.findall(r"```toml\n(.*?)```", document.read_text(), re.S):
                try:
                    parse_config(tomllib.loads(block), source=document.name)
                except ConfigError as problem:
                    self.fail(str(problem))
                blocks += 1
        self.assertGreaterEqual(blocks, 2)
