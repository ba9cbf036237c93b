"""Notices, end to end: the real storescp receives, `dumpwatch serve` sorts and completes, and
tells a local mail server (aiosmtpd on 127.0.0.1, with STARTTLS and a login) and a local HTTP
server recording webhooks: once per study, quarantined files in batches, health when it changes;
never a patient's name or ID unless notify_identifiers = yes."""

from __future__ import annotations

import email.policy
import json
import shlex
import subprocess
import sys
import threading
import time
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dcmtk import Serve, Storescp, free_port, storescu, wait_for, write_config
from pydicom.uid import generate_uid
from test_completion import port_of, report
from test_hooks import volume

from dumpwatch import notify

pytest.importorskip("aiosmtpd")
from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import AuthResult, LoginPassword  # noqa: E402

TLS = Path(__file__).parent / "tls"
IDLE = {"series_idle": 1, "study_idle": 2}
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID12345", "StudyDate": "20261201"}
IDENTIFIERS = ("doe", "jane", "pid12345")


class Mailbox:
    """aiosmtpd on 127.0.0.1: STARTTLS with the test certificate, a login required after it."""

    def __init__(self, user: str, password: str):
        self.messages: list[Message] = []
        self.raw: list[bytes] = []
        self.logins: list[tuple[bytes, bool]] = []
        self.lock = threading.Lock()
        context = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
        context.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")

        def authenticate(server, session, envelope, mechanism, data):
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (user.encode(), password.encode())
            with self.lock:
                self.logins.append((data.login, session.ssl is not None))
            return AuthResult(success=ok)

        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, tls_context=context,
                                     require_starttls=True, authenticator=authenticate, auth_require_tls=True)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802  (aiosmtpd's name)
        with self.lock:
            self.raw.append(envelope.content)
            self.messages.append(message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def stop(self) -> None:
        self.controller.stop()


class Webhooks:
    """A local HTTP server that records each POST; the first `failures` get a 500."""

    def __init__(self, failures: int = 0):
        self.posts: list[dict] = []  # the ones answered 200
        self.refused = 0
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hooks.refused < failures:
                    hooks.refused += 1
                    self.send_response(500)
                else:
                    hooks.posts.append({"path": self.path, "type": self.headers["Content-Type"],
                                        "body": json.loads(body), "raw": body})
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dumpwatch"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event: str) -> list[dict]:
        return [p["body"] for p in self.posts if p["body"]["event"] == event]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def status(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status"],
                          capture_output=True, text=True)


def no_identifiers(*texts: bytes | str) -> None:
    for text in texts:
        lowered = (text.decode(errors="replace") if isinstance(text, bytes) else text).lower()
        for word in IDENTIFIERS:
            assert word not in lowered, f"{word!r} in a notice: {lowered[:2000]}"


@pytest.mark.dcmtk
def test_a_complete_study_is_told_once_by_email_and_webhook_with_each_series_verdict(tmp_path, template_file):
    mailbox, webhooks = Mailbox("dumpwatch", "s3cret pass"), Webhooks(failures=1)
    (tmp_path / "smtp-password").write_text("s3cret pass\n")
    site = write_config(tmp_path / "site", **IDLE, notify_interval=1, notify_email="team@example.org",
                        notify_from="scanner-room@example.org", smtp_host="127.0.0.1", smtp_port=mailbox.port,
                        smtp_security="starttls", smtp_user="dumpwatch",
                        smtp_password_file=tmp_path / "smtp-password", smtp_ca_file=TLS / "cert.pem",
                        notify_webhook=webhooks.url)
    scp, serve = Storescp(site), Serve(site)
    try:
        study = generate_uid()
        whole = volume(template_file, tmp_path / "whole", 4, StudyInstanceUID=study, SeriesNumber=3,
                       SeriesDescription="t1 axial", **PATIENT)
        lacking = volume(template_file, tmp_path / "lacking", 4, skip=(2,), StudyInstanceUID=study, SeriesNumber=4,
                         SeriesDescription="t2 axial", **PATIENT)
        storescu(port_of(site), whole + lacking, tmp_path)
        wait_for(lambda: mailbox.messages and webhooks.of("study_complete"), 60, "the study's notices")
        time.sleep(3)  # a second notice of the same study would come within this
        assert len(mailbox.messages) == 1 and len(webhooks.of("study_complete")) == 1
        assert webhooks.refused == 1  # the first POST was answered 500, and it was tried again

        mail = mailbox.messages[0]
        assert mail["To"] == "team@example.org" and mail["From"] == "scanner-room@example.org"
        assert mail["Subject"] == ("dumpwatch: study complete: study #1 of 20261201: 2 series, 7 files, "
                                   "1 of them missing images")
        assert mailbox.logins == [(b"dumpwatch", True)]  # one login, over TLS
        text = mail.get_content()
        assert "3 t1 axial: 4 files, whole" in text and "4 t2 axial: 3 files, missing 1 (2)" in text, text

        post = webhooks.posts[-1]
        assert post["type"] == "application/json" and post["path"] == "/dumpwatch"
        body = post["body"]
        assert body["subject"] == mail["Subject"] and body["text"].startswith(mail["Subject"])
        assert {s["number"]: s["verdict"] for s in body["series"]} == {"3": "whole", "4": "incomplete"}
        assert body["study"]["incomplete"] == 1 and body["study"]["files"] == 7
        assert body["study"]["folder"] == notify.HIDDEN

        folder = report(site)["studies"][0]["folder"]
        assert "Doe" in folder  # the tree names the patient: the notices must not
        no_identifiers(*mailbox.raw, *(p["raw"] for p in webhooks.posts))
        shown = status(site).stdout
        assert "notices      2 sent in the last day" in shown, shown
    finally:
        assert serve.stop() == 0
        scp.stop()
        mailbox.stop()
        webhooks.stop()


def junk(dump: Path, name: str) -> None:
    (dump / name).write_bytes(b"not an image at all, " * 20)


@pytest.mark.dcmtk
def test_quarantined_files_come_in_batches_health_changes_are_told_and_a_dead_mail_server_blocks_nothing(
        tmp_path, template_file):
    webhooks = Webhooks()
    site = write_config(tmp_path / "site", **IDLE, notify_interval=2, health_interval=1,
                        notify_webhook=webhooks.url, notify_email="team@example.org", smtp_host="127.0.0.1",
                        smtp_port=free_port(), smtp_security="none")  # nothing listens there
    scp, serve = Storescp(site), Serve(site)
    dump = tmp_path / "site" / "dump"
    try:
        junk(dump, "MR.junk1")
        first = wait_for(lambda: webhooks.of("quarantine"), 30, "the first quarantine notice")
        junk(dump, "MR.junk2")
        junk(dump, "MR.junk3")
        wait_for(lambda: len(webhooks.of("quarantine")) == 2, 30, "the second quarantine notice")
        time.sleep(3)
        told = webhooks.of("quarantine")
        assert [q["files"] for q in told] == [1, 2], told  # the two files in the interval in one notice
        assert first[0]["reasons"] == [{"reason": "not a DICOM file (no 'DICM' marker at byte 128)", "files": 1}]
        assert told[1]["reasons"] == [{"reason": "not a DICOM file (no 'DICM' marker at byte 128)", "files": 2}]
        assert "names" not in told[1]

        # Sorting goes on while e-mail cannot be delivered.
        files = volume(template_file, tmp_path / "a", 3, SeriesNumber=5, SeriesDescription="fmap", **PATIENT)
        storescu(port_of(site), files, tmp_path)
        wait_for(lambda: report(site)["studies"], 30, "the series sorted")

        scp.kill()
        down = wait_for(lambda: webhooks.of("unhealthy"), 30, "the unhealthy notice")
        assert any("storescp is not running" in p for p in down[0]["problems"]), down
        scp = Storescp(site)
        wait_for(lambda: webhooks.of("healthy"), 30, "the healthy-again notice")
        assert len(webhooks.of("unhealthy")) == 1

        no_identifiers(*(p["raw"] for p in webhooks.posts))
        shown = status(site).stdout
        assert "waiting" in shown and "last error: ConnectionRefusedError" in shown, shown
        assert "could not be sent (ConnectionRefusedError" in serve.output()
    finally:
        assert serve.stop() == 0
        scp.stop()
        webhooks.stop()


def test_with_identifiers_the_notice_names_the_study_folder(tmp_path):
    """notify_identifiers = yes is the one way a folder's name reaches a notice."""
    import sqlite3

    from dumpwatch import schema
    db = sqlite3.connect(tmp_path / "j.sqlite3")
    db.row_factory = sqlite3.Row
    schema.migrate(db, tmp_path / "j.sqlite3")
    db.execute("INSERT INTO studies (id, study_uid, folder, study_date)"
               " VALUES (1, '1.2', '20261201-Doe-Jane', '20261201')")
    hidden, body = notify.study(db, 1, again=False, identifiers=False)
    named, named_body = notify.study(db, 1, again=False, identifiers=True)
    assert "Doe" not in hidden + json.dumps(body)
    assert "20261201-Doe-Jane" in named and named_body["study"]["folder"] == "20261201-Doe-Jane"


def test_quarantine_reasons_lose_the_trees_paths(tmp_path):
    rows = [{"reason": f"differs from {tmp_path}/sorted/20261201-Doe-Jane/003-t1/0001.dcm (kept there)",
             "name": "MR.1"}]
    subject, body = notify.quarantine(rows, tmp_path / "q", tmp_path / "sorted", identifiers=False)
    assert "Doe" not in shlex.join([subject, json.dumps(body)])
    assert body["reasons"][0]["reason"] == "differs from <dir_out>/... (kept there)"
    rows = [{"reason": "'20261201-Doe-Jane' in the sorted tree is not a folder", "name": "MR.2"},
            {"reason": "not a DICOM file (no 'DICM' marker at byte 128)", "name": "MR.3"}]
    _, body = notify.quarantine(rows, tmp_path / "q", tmp_path / "sorted", identifiers=False)
    assert [r["reason"] for r in body["reasons"]] == ["'...' in the sorted tree is not a folder",
                                                      "not a DICOM file (no 'DICM' marker at byte 128)"]
    subject, body = notify.health(False, [f"1 file in the dump cannot be sorted (tried 3 times): cannot write "
                                          f"{tmp_path}/sorted/20261201-Doe-Jane/003-t1/0001.dcm: Permission denied"],
                                  tmp_path / "sorted", identifiers=False)
    assert "Doe" not in subject + json.dumps(body) and "<dir_out>/... Permission denied" in subject


@pytest.mark.dcmtk
def test_a_disk_past_disk_warn_is_told_once(tmp_path):
    """disk_warn = 1%: any disk warns, from the start; one warning notice, not one per check."""
    webhooks = Webhooks()
    site = write_config(tmp_path / "site", **IDLE, health_interval=1, notify_webhook=webhooks.url, disk_warn="1%")
    scp, serve = Storescp(site), Serve(site)
    try:
        [told] = wait_for(lambda: webhooks.of("warning"), 30, "the warning notice")
        assert told["healthy"] and "full (warning at 1%)" in told["problems"][0], told
        time.sleep(3)  # three checks more, the warning still there: told once
        assert len(webhooks.of("warning")) == 1 and not webhooks.of("unhealthy")
        assert status(site).returncode == 3
    finally:
        assert serve.stop() == 0
        scp.stop()
        webhooks.stop()
