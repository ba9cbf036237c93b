"""`dumpwatch web`: the operators' view, read-only. The status page at / and Prometheus
metrics at /metrics, from the journal, the folders and the system, as `status` sees them.

Python's own http.server: two read-only pages for a handful of people at the scanner and one
scraper need no framework, and the standard library adds nothing to install or to keep safe.
Threads (one per connection, a bounded number) keep a slow client from holding the others; a
report is made at most every CACHE seconds, however many ask. TLS is a reverse proxy's job
(docs/security.md).

It listens on 127.0.0.1 unless web_bind says otherwise, and refuses to listen beyond loopback
without web_passwords. With web_passwords, every path asks for a login (HTTP basic auth).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dumpwatch import metrics, page
from dumpwatch.config import Config
from dumpwatch.errors import ConfigError
from dumpwatch.report import ReportError, gather, open_journal
from dumpwatch.status import Tally, quarantine_files, report
from dumpwatch.webauth import WRONG_WAIT, Logins, PasswordFileError

log = logging.getLogger(__name__)

CACHE = 5.0  # seconds a report serves every request (the page, /metrics)
STUDIES = 100  # studies the page lists at most
CONNECTIONS = 32  # at once; more are closed at once
PER_CLIENT = 8  # at once from one address
TIMEOUT = 20  # seconds a connection may last, request and answer (one request each)
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def check_web(cfg: Config) -> Logins | None:
    """The logins web_passwords asks for (None: no login); ConfigError when it must not start."""
    if cfg.web_passwords is None:
        if not loopback(cfg.web_bind):
            raise ConfigError(f"web_bind = {cfg.web_bind} reaches beyond this machine: set web_passwords (users "
                              "made with dumpwatch web-password) or bind 127.0.0.1 behind a reverse proxy that asks "
                              "for a login", cfg.path, key="web_bind")
        return None
    try:
        return Logins(cfg.web_passwords)
    except PasswordFileError as exc:
        raise ConfigError(f"web_passwords: {exc}", cfg.path, key="web_passwords") from None


class View:
    """What the page and /metrics show, made at most every CACHE seconds (a report that
    failed too: while a fault lasts, requests do not each start another C-ECHO)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.made = 0.0
        self.data: dict | None = None
        self.error: Exception | None = None
        self.tally = Tally()  # counts kept from one report to the next

    def get(self) -> dict:
        with self.lock:
            if (self.data is None and self.error is None) or time.monotonic() - self.made > CACHE:
                self.made = time.monotonic()
                try:
                    self.data, self.error = make_view(self.cfg, self.tally), None
                except Exception as exc:
                    self.data, self.error = None, exc
            if self.error is not None:
                raise self.error
            assert self.data is not None
            return self.data


def make_view(cfg: Config, tally: Tally | None = None) -> dict:
    """Everything the page shows: status's report, the recent studies, the quarantine."""
    moment = time.time()
    quarantined = quarantine_files(cfg.quarantine_dir)
    status = report(cfg, quarantined=quarantined, tally=tally)
    studies: list[dict] = []
    try:
        db = open_journal(cfg.journal_path)
    except ReportError:
        pass  # no journal yet, or an old one: status says what matters
    else:
        try:
            studies = gather(db, since=moment - cfg.web_days * 86400, limit=STUDIES)
        finally:
            db.close()
    return {"status": status, "studies": studies, "quarantined": quarantined, "made": moment,
            "refresh": cfg.web_refresh, "days": cfg.web_days, "watermarks": (cfg.disk_warn, cfg.disk_alarm)}


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = TIMEOUT
    server_version = "dumpwatch"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self.answer(body=False)

    def answer(self, body: bool) -> None:
        self.close_connection = True  # one request a connection: its deadline covers all of it
        logins = self.server.logins
        if logins is None and not self.known_host():
            # A name that is not this machine's, without logins: a web page elsewhere may have
            # pointed its own name at 127.0.0.1 (DNS rebinding) to read this one.
            self.send(HTTPStatus.MISDIRECTED_REQUEST, b"unknown host name: add it to web_hosts\n",
                      "text/plain; charset=utf-8", body)
            return
        if logins is not None:
            checked = logins.check(self.headers.get("Authorization"))
            if checked.user is None:
                if self.headers.get("Authorization"):
                    log.warning("web: login refused from %s: %s", self.client_address[0], checked.why[:200])
                    time.sleep(WRONG_WAIT)
                self.send(HTTPStatus.UNAUTHORIZED, b"a login is needed\n", "text/plain; charset=utf-8", body,
                          {"WWW-Authenticate": 'Basic realm="dumpwatch", charset="UTF-8"'})
                return
        path = self.path.split("?", 1)[0]
        try:
            if path == "/":
                view = self.server.view.get()
                self.send(HTTPStatus.OK, page.render(view).encode(), "text/html; charset=utf-8", body)
            elif path == "/metrics":
                self.send(HTTPStatus.OK, metrics.exposition(self.server.view.get()["status"]),
                          "text/plain; version=0.0.4; charset=utf-8", body)
            else:
                self.send(HTTPStatus.NOT_FOUND, b"not found: the page is at /, the metrics at /metrics\n",
                          "text/plain; charset=utf-8", body)
        except Exception:
            log.exception("web: cannot answer %s", path)
            self.send(HTTPStatus.INTERNAL_SERVER_ERROR, b"dumpwatch web cannot make this page now: its log says "
                      b"why\n", "text/plain; charset=utf-8", body)

    def known_host(self) -> bool:
        """The Host header names this machine: an address, localhost, or a name in web_hosts."""
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
            else host
        if not name:
            return True  # HTTP/1.0 without Host: no browser sends that
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in LOOPBACK_NAMES or name in self.server.hosts

    def setup(self) -> None:
        super().setup()
        # A deadline for the whole connection (the socket's timeout is per read): a client that
        # sends a byte now and then, or reads the answer as slowly, is cut off after TIMEOUT s.
        self.deadline = threading.Timer(TIMEOUT, self._cut)
        self.deadline.daemon = True
        self.deadline.start()

    def _cut(self) -> None:
        try:
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        self.deadline.cancel()
        try:
            super().finish()
        except OSError:
            pass

    def send(self, code: HTTPStatus, data: bytes, kind: str, body: bool, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.send_header("Cache-Control", "no-store")  # folder names: not for shared caches or the back button
        self.send_header("Content-Security-Policy", page.POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        log.debug("web: %s %s", self.client_address[0], format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, cfg: Config, logins: Logins | None):
        self.view = View(cfg)
        self.logins = logins
        self.hosts = {name.lower() for name in cfg.web_hosts}
        self.slots = threading.BoundedSemaphore(CONNECTIONS)
        self.clients: dict[str, int] = {}  # connections open, by address
        self.clients_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in cfg.web_bind else socket.AF_INET
        super().__init__((cfg.web_bind, cfg.web_port), Handler)

    def process_request(self, request, client_address) -> None:
        address = client_address[0]
        with self.clients_lock:
            mine = self.clients.get(address, 0)
            if mine >= PER_CLIENT or not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # too many at once: this one is closed, the others go on
                return
            self.clients[address] = mine + 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(address)
            raise

    def _release(self, address: str) -> None:
        with self.clients_lock:
            left = self.clients.get(address, 1) - 1
            if left:
                self.clients[address] = left
            else:
                self.clients.pop(address, None)
            self.slots.release()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])


def serve_web(cfg: Config, ready: threading.Event | None = None) -> Server:
    """Make the server (OSError if the port is taken); the caller runs serve_forever()."""
    logins = check_web(cfg)
    server = Server(cfg, logins)
    host, port = str(server.server_address[0]), server.server_address[1]
    log.info("web: the status page is at http://%s:%d/ (metrics at /metrics)%s",
             f"[{host}]" if ":" in host else host, port, ", with a login" if logins else "")
    if ready is not None:
        ready.set()
    return server
