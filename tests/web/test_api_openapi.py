"""docs/openapi.yaml matches the running API: its routes, and schemathesis against a real broker."""

import dataclasses
import os
import re
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from broker.web.api import inputs
from broker.web.api.resource import ROUTES
from tests.helpers import start_broker
from tests.web.test_api_rest import broker_config

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
#: schemathesis examples per operation and phase: bounded, the machine is shared.
MAX_EXAMPLES = 10


def _yaml():
    try:
        import yaml
    except ImportError:
        if os.environ.get("CI"):
            raise
        raise SkipTest("PyYAML (installed with schemathesis) is missing")
    return yaml


class OpenAPIDocumentTests(TestCase):

    def test_documented_operations_are_the_routes(self):
        """Every route of the resource is documented, with its methods (HEAD where GET), and nothing else is."""
        document = _yaml().safe_load(OPENAPI.read_text())
        documented = {(path, method.upper()) for path, item in document["paths"].items()
                      for method in item if method != "parameters"}
        routed = {("/" + "/".join("{name}" if part == "*" else part for part in route),
                   method.decode()) for route, methods in ROUTES.items()
                  for method in (*methods, *([b"HEAD"] if b"GET" in methods else []))}
        self.assertEqual(documented, routed)
        self.assertEqual(document["servers"], [{"url": "/api/v1"}])

    def test_query_token_is_documented_for_reads_only(self):
        """Only GET and HEAD operations list ?token= among their credentials (others answer 401 token_in_query)."""
        document = _yaml().safe_load(OPENAPI.read_text())
        offered = {}
        for path, item in document["paths"].items():
            for method, operation in item.items():
                if method != "parameters":
                    schemes = operation.get("security", document["security"])
                    offered[(method, path)] = {name for entry in schemes for name in entry}
        self.assertEqual({key for key, names in offered.items() if "queryToken" in names},
                         {key for key in offered if key[0] in ("get", "head")})

    def test_feed_parameters_are_documented(self):
        """/changes and /events document their history parameter with exactly the spellings
        the broker accepts, default true, next to the other feed parameters."""
        document = _yaml().safe_load(OPENAPI.read_text())
        components = document["components"]["parameters"]

        def parameters(path):
            item = document["paths"][path]       # the path's, shared by get and head
            listed = item.get("parameters", []) + item["get"].get("parameters", [])
            return {p["name"]: p for p in (components[entry["$ref"].rsplit("/", 1)[1]]
                                           if "$ref" in entry else entry for entry in listed)}
        changes, events = parameters("/changes"), parameters("/events")
        self.assertEqual(set(changes), {"since", "wait", "limit", "name", "history"})
        self.assertEqual(set(events), {"since", "name", "history", "Last-Event-ID"})
        history = changes["history"]
        self.assertEqual(history, events["history"])
        self.assertEqual(history["in"], "query")
        self.assertEqual({value.encode() for value in history["schema"]["enum"]},
                         set(inputs._BOOLEANS))
        self.assertEqual(history["schema"]["default"], "true")


class SchemathesisTests(TestCase):
    """Runs the schemathesis CLI (a subprocess) against a broker on loopback."""

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        try:
            import schemathesis  # noqa: F401 - only to know it is installed
        except ImportError:
            if os.environ.get("CI"):
                raise
            raise SkipTest("schemathesis is not installed")
        self.broker = yield start_broker(self, broker_config(
            self, polling={"max_wait": 0.2}, http={"max_request_bytes": 65536},
            registry={"max_state_bytes": 8192}))
        api = self.broker.service.api                # fuzzing is fast on purpose: no rate limit
        api.apply(dataclasses.replace(api.settings, max_requests_per_second=0))
        registry = self.broker.service.registry
        self.node = yield registry.add_device("node-1")
        yield registry.add_device("node-2")
        _, self.token = yield registry.add_token("write")

    def write_config(self, directory: Path) -> Path:
        config = directory / "schemathesis.toml"
        config.write_text(f'''
base-url = "{self.broker.http_url}/api/v1"
workers = 1
color = false

[generation]
max-examples = {MAX_EXAMPLES}
database = "none"

[auth.openapi.bearer]
bearer = "{self.token}"
[auth.openapi.queryToken]
api_key = "{self.token}"
[auth.openapi.deviceKey]
api_key = "Device {self.node.key}"

[parameters]
"path.name" = "node-1"

# 412 (a stale If-Match) and 413 (a generated body over max_request_bytes)
# answer valid requests too; 413 and 412 also reject invalid ones. 304: an
# If-None-Match naming the device's version.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "304", "401", "403", "404", "409", "412", "413", "429", "503"]
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "409", "412", "413", "415", "429"]

# The event stream stays open: read one event, or give up after a second.
[[operations]]
include-path = "/events"
max-stream-events = 1
request-timeout = 1.0
''')
        return config

    @defer.inlineCallbacks
    def schemathesis(self, *selection):
        """The output of schemathesis (all checks, fixed seed) on the selected operations; fails if it found a mismatch."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = self.write_config(directory)
        args = ["-m", "schemathesis.cli", "--config-file", str(config), "run", str(OPENAPI),
                "--checks", "all", "--no-shrink", "--seed", "1",
                "--phases", "examples,coverage,fuzzing,stateful", *selection]
        env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_TELEMETRY="false")
        out, err, code = yield getProcessOutputAndValue(sys.executable, args, env=env,
                                                        path=str(directory), reactor=reactor)
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, text[-6000:])
        self.assertIsNone(re.search(r"\d+ failures?", text), text[-3000:])
        return text

    @defer.inlineCallbacks
    def test_schemathesis_finds_no_mismatch(self):
        """Generated valid and invalid requests get answers that match docs/openapi.yaml (all checks)."""
        # HEAD apart: its operations would change the data generated for the others.
        text = yield self.schemathesis("--exclude-method", "HEAD")
        self.assertRegex(text, r"Tested: 8\b")

    @defer.inlineCallbacks
    def test_schemathesis_finds_no_mismatch_in_head(self):
        """HEAD operations answer the statuses and headers docs/openapi.yaml gives them (all checks)."""
        text = yield self.schemathesis("--include-method", "HEAD")
        self.assertRegex(text, r"Tested: 4\b")
