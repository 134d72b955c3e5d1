"""The dashboard's HTTP resources: the page, its files, the session answer, headers and errors.

Requests are real HTTP bytes parsed by twisted.web's HTTPChannel over a
memory transport, answered by a Site holding only the dashboard resources.
"""

from __future__ import annotations

import io
import json
from http.client import HTTPResponse
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from broker.config import load_config, replace
from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.web.dashboard import PAGE, dashboard_resources
from broker.web.dashboard.files import load_files, static_file
from broker.web.dashboard.resource import CONTENT_SECURITY_POLICY, RootResource

EXPECTED_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


class _Socket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode):
        return io.BytesIO(self._data)


class Dashboard:
    """The dashboard resources on a Site over memory transports, with a registry on a Clock."""

    def __init__(self, testcase, files=None, **config_changes) -> None:
        self.testcase = testcase
        self.clock = Clock()
        self.registry = DeviceRegistry(MemoryStore(), clock=self.clock,
                                       settings=RegistrySettings(reload_interval=0))
        self.config = load_config(None)
        for section, changes in config_changes.items():
            self.config = replace(self.config, section, **changes)
        page, assets = dashboard_resources(self.registry, lambda: self.config, files)
        root = RootResource()
        root.putChild(b"", page)
        root.putChild(b"dashboard", assets)
        self.site = Site(root, timeout=None, reactor=self.clock)

    def token(self, role: str) -> str:
        return self.testcase.successResultOf(self.registry.add_token(role))[1]

    def request(self, method: str, path: str, headers=None):
        """(status, headers, body bytes) of one request answered at once."""
        transport = StringTransport()
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: broker.test"]
        lines += [f"{key}: {value}".encode() for key, value in (headers or {}).items()]
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
        response = HTTPResponse(_Socket(transport.value()), method=method)
        response.begin()
        return response.status, response.headers, response.read()


class PageTests(SynchronousTestCase):
    """The page at / and its files under /dashboard/."""

    def setUp(self):
        self.dashboard = Dashboard(self)
        self.files = load_files()

    def test_page_at_root(self):
        """GET / answers the page as UTF-8 HTML with the strict policy and security headers."""
        status, headers, body = self.dashboard.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(body, self.files[PAGE].body)
        self.assertEqual(headers["content-security-policy"], CONTENT_SECURITY_POLICY.decode())
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["x-frame-options"], "DENY")
        self.assertEqual(headers["referrer-policy"], "no-referrer")

    def test_unknown_paths_are_a_short_404_with_the_security_headers(self):
        """A path the broker does not serve is a text 404 with the security headers,
        not Twisted's HTML page, at any depth and for any method."""
        for method, path in (("GET", "/nope"), ("GET", "/nope/deeper"), ("POST", "/nope")):
            status, headers, body = self.dashboard.request(method, path)
            self.assertEqual((status, body), (404, b"no such resource\n"), path)
            self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
            self.assertEqual(headers["x-content-type-options"], "nosniff")
            self.assertEqual(headers["content-security-policy"], CONTENT_SECURITY_POLICY.decode())

    def test_page_ignores_query_and_fragment_routes(self):
        """/?transport=polling is the same page (the page reads the flag itself)."""
        status, _, body = self.dashboard.request("GET", "/?transport=polling")
        self.assertEqual((status, body), (200, self.files[PAGE].body))

    def test_policy_is_strict(self):
        """The policy allows nothing inline or from elsewhere, no framing, and needs Trusted Types."""
        directives = dict(item.strip().split(" ", 1)
                          for item in CONTENT_SECURITY_POLICY.decode().split(";"))
        self.assertEqual(directives["default-src"], "'none'")
        for directive in ("script-src", "style-src", "connect-src"):
            self.assertEqual(directives[directive], "'self'")
        self.assertEqual(directives["frame-ancestors"], "'none'")
        self.assertEqual(directives["base-uri"], "'none'")
        self.assertEqual(directives["require-trusted-types-for"], "'script'")
        self.assertNotIn("unsafe", CONTENT_SECURITY_POLICY.decode())

    def test_content_types(self):
        """Every shipped file is served with its extension's content type (modules as JavaScript)."""
        served = [name for name in self.files if name != PAGE]
        self.assertIn("app.js", served)
        self.assertIn("style.css", served)
        for name in served:
            status, headers, body = self.dashboard.request("GET", f"/dashboard/{name}")
            self.assertEqual(status, 200, name)
            self.assertEqual(headers["content-type"], EXPECTED_TYPES[Path(name).suffix], name)
            self.assertEqual(body, self.files[name].body, name)
            self.assertEqual(headers["content-security-policy"], CONTENT_SECURITY_POLICY.decode())
            self.assertEqual(headers["cache-control"], "no-cache")

    def test_unknown_file_is_404(self):
        """A name that is not a shipped file answers 404 as plain text, with the policy."""
        for path in ("/dashboard/nope.js", "/dashboard/APP.JS", "/dashboard/app.js/more",
                     "/dashboard/index.html"):
            status, headers, body = self.dashboard.request("GET", path)
            self.assertEqual(status, 404, path)
            self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
            self.assertEqual(headers["content-security-policy"], CONTENT_SECURITY_POLICY.decode())

    def test_no_directory_listing(self):
        """The folder itself answers 404 and names no file."""
        for path in ("/dashboard", "/dashboard/"):
            status, _, body = self.dashboard.request("GET", path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"app.js", body)

    def test_no_way_out_of_the_folder(self):
        """Dot segments and encoded slashes never reach a file outside the static folder."""
        for path in ("/dashboard/../dashboard/__init__.py", "/dashboard/..%2f__init__.py",
                     "/dashboard/%2e%2e/files.py", "/dashboard/.%2e/.%2e/setup.cfg"):
            status, _, body = self.dashboard.request("GET", path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"import", body)

    def test_head(self):
        """HEAD answers the headers of GET (length included) and no body."""
        status, headers, body = self.dashboard.request("HEAD", "/dashboard/app.js")
        self.assertEqual(status, 200)
        self.assertEqual(int(headers["content-length"]), len(self.files["app.js"].body))
        self.assertEqual(body, b"")

    def test_other_methods_are_405(self):
        """POST, PUT and DELETE answer 405 naming GET and HEAD."""
        for method, path in (("POST", "/"), ("PUT", "/dashboard/app.js"), ("DELETE", "/")):
            status, headers, _ = self.dashboard.request(method, path)
            self.assertEqual(status, 405, (method, path))
            self.assertEqual(headers["allow"], "GET, HEAD")

    def test_conditional_get(self):
        """A request naming the current ETag answers 304 without a body; a stale one gets the file."""
        _, headers, _ = self.dashboard.request("GET", "/dashboard/style.css")
        etag = headers["etag"]
        status, headers, body = self.dashboard.request("GET", "/dashboard/style.css",
                                                       {"If-None-Match": etag})
        self.assertEqual((status, body, headers["etag"]), (304, b"", etag))
        status, _, body = self.dashboard.request("GET", "/dashboard/style.css",
                                                 {"If-None-Match": '"stale", W/' + etag})
        self.assertEqual(status, 304)
        status, _, body = self.dashboard.request("GET", "/dashboard/style.css",
                                                 {"If-None-Match": '"stale"'})
        self.assertEqual((status, body), (200, self.files["style.css"].body))


class FolderTests(SynchronousTestCase):
    """Which files of a folder are served."""

    def test_only_plain_files_with_known_types(self):
        """Hidden files, unknown extensions and subfolders are not served."""
        folder = Path(self.mktemp())
        (folder / "sub").mkdir(parents=True)
        (folder / "index.html").write_text("<!doctype html>")
        (folder / "app.js").write_text("export {};")
        (folder / ".secret.js").write_text("x")
        (folder / "notes.txt").write_text("x")
        (folder / "backup.js~").write_text("x")
        (folder / "sub" / "deep.js").write_text("x")
        self.assertEqual(sorted(load_files(folder)), ["app.js", "index.html"])

    def test_etag_follows_content(self):
        """Two different contents get two different strong ETags; the same content the same one."""
        first, second = static_file("a.js", b"1"), static_file("a.js", b"2")
        self.assertNotEqual(first.etag, second.etag)
        self.assertEqual(first.etag, static_file("b.js", b"1").etag)
        self.assertTrue(first.etag.startswith(b'"'))
        self.assertRaises(ValueError, static_file, "a.exe", b"")


class SessionTests(SynchronousTestCase):
    """GET /dashboard/session: a token's role and the transports on offer."""

    def setUp(self):
        self.dashboard = Dashboard(self, websocket={"enabled": False}, polling={"max_wait": 20.0})

    def session(self, token=None, method="GET"):
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        status, headers, body = self.dashboard.request(method, "/dashboard/session", headers)
        return status, headers, json.loads(body) if body.startswith(b"{") else body

    def test_roles(self):
        """A read token and a write token are answered with their role and token id."""
        for role in ("read", "write"):
            token = self.dashboard.token(role)
            status, headers, body = self.session(token)
            self.assertEqual(status, 200)
            self.assertEqual(body["role"], role)
            self.assertEqual(body["token_id"], token.partition(".")[0])
            self.assertEqual(headers["cache-control"], "no-store")
            self.assertEqual(headers["content-security-policy"], CONTENT_SECURITY_POLICY.decode())

    def test_transports_follow_the_config(self):
        """The answer says WebSocket off and polling on, as configured, with polling.max_wait."""
        _, _, body = self.session(self.dashboard.token("read"))
        self.assertEqual(body["transports"], {"websocket": False, "polling": True})
        self.assertEqual(body["max_wait"], 20.0)
        self.dashboard.config = replace(self.dashboard.config, "websocket", enabled=True)
        _, _, body = self.session(self.dashboard.token("read"))
        self.assertEqual(body["transports"]["websocket"], True)

    def test_missing_token(self):
        """No Authorization header (or another scheme) answers 401 missing_credentials."""
        status, headers, body = self.session()
        self.assertEqual((status, body["error"]["code"]), (401, "missing_credentials"))
        self.assertIn("Bearer", headers["www-authenticate"])
        status, _, body = self.dashboard.request("GET", "/dashboard/session",
                                                 {"Authorization": "Basic eDp5"})
        self.assertEqual(status, 401)

    def test_wrong_and_revoked_tokens(self):
        """A mistyped token and a revoked one both answer 401 invalid_token."""
        token = self.dashboard.token("write")
        status, _, body = self.session(token + "x")
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_token"))
        self.successResultOf(self.dashboard.registry.revoke_token(token.partition(".")[0]))
        status, _, body = self.session(token)
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_token"))

    def test_nothing_below(self):
        """A path below the session answers 404."""
        status, _, _ = self.dashboard.request("GET", "/dashboard/session/more")
        self.assertEqual(status, 404)

    def test_only_get(self):
        """Other methods answer 405 naming GET."""
        status, headers, _ = self.session(self.dashboard.token("read"), method="POST")
        self.assertEqual((status, headers["allow"]), (405, "GET"))
