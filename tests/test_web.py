"""The operators' view, for real: storescp, serve and `dumpwatch web` on loopback, a real
storescu send, and the page read in Debian's chromium (headless, through its chromedriver).
/metrics is parsed by Prometheus' own parser (and promtool, where Debian's prometheus package
is installed) and agrees with `dumpwatch status --json`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dcmtk import REPO, Serve, Storescp, free_port, storescu, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families
from test_hooks import volume

from dumpwatch.config import read_config
from dumpwatch.status import listening
from dumpwatch.webauth import set_password


class Web:
    """`dumpwatch web` as its own process, ready once it listens."""

    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.port = read_config(cfg).web_port
        self.log = open(cfg.parent / "web.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "dumpwatch", "--config", str(cfg), "web"],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=cfg.parent,
                                        env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_for(lambda: listening(self.port) or self.process.poll() is not None, 30, "dumpwatch web to listen")
        assert self.process.poll() is None, self.output()

    def output(self) -> str:
        self.log.flush()
        return (self.cfg.parent / "web.log").read_text(errors="replace")

    def get(self, path: str, login: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if login:
            token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as refused:
            return refused.code, dict(refused.headers), refused.read()

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,1500", "--no-first-run", "--password-store=basic"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, by Prometheus' own parser (which refuses a bad line)."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


@pytest.mark.dcmtk
@pytest.mark.browser
def test_the_page_after_a_real_send_shows_the_study_its_series_a_gap_and_the_quarantine(tmp_path, template_file):
    site = write_config(tmp_path / "site", series_idle=1, study_idle=2, allowed_senders="SCANNER",
                        web_refresh=5)
    study = "1.2.826.0.1.3680043.8.498.1"
    whole = volume(template_file, tmp_path / "whole", 6, StudyInstanceUID=study, SeriesNumber=3,
                   SeriesDescription="T1w", PatientName="Doe^Jane", StudyDate="20261203")
    gappy = volume(template_file, tmp_path / "gappy", 8, skip=(5,), StudyInstanceUID=study, SeriesNumber=4,
                   SeriesDescription="bold_rest", PatientName="Doe^Jane", StudyDate="20261203")
    stranger = volume(template_file, tmp_path / "stranger", 1, PatientName="Other^Person")
    scp, serve, web = Storescp(site), Serve(site), Web(site)
    driver = None
    try:
        storescu(scp.port, whole + gappy, tmp_path)
        storescu(scp.port, stranger, tmp_path, aet="UNKNOWN")  # not an allowed sender: quarantined
        out, quarantine = tmp_path / "site" / "sorted", tmp_path / "site" / "quarantine"
        wait_for(lambda: len(list(out.rglob("*.dcm"))) == 13 and len(list(quarantine.glob("*.reason.txt"))) == 1,
                 60, "13 files sorted, 1 quarantined")

        def complete() -> bool:
            status = json.loads(subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status",
                                                "--json"], capture_output=True, text=True).stdout)
            return (status["totals"]["completions"]["study"] == 1 and not status["dump"]["waiting"]
                    and status["healthy"])

        wait_for(complete, 60, "the study to be complete")
        time.sleep(6)  # the page's report is made at most every 5 s

        driver = browser()
        driver.get(f"http://127.0.0.1:{web.port}/")
        from selenium.webdriver.common.by import By

        header = driver.find_element(By.ID, "health").text
        assert "Healthy" in header and "UNHEALTHY" not in header, header
        studies = driver.find_element(By.ID, "studies")
        [card] = studies.find_elements(By.CSS_SELECTOR, "article.study")
        assert card.find_element(By.TAG_NAME, "h3").text == "20261203-Doe_Jane"
        assert "from SCANNER" in card.text and "2 series, 13 files" in card.text and "complete" in card.text
        rows = {row.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in row.find_elements(By.TAG_NAME, "td")]
                for row in card.find_elements(By.CSS_SELECTOR, "tr.series")}
        assert sorted(rows) == ["003-T1w", "004-bold_rest"], rows
        assert rows["003-T1w"][1:6] == ["6", "1–6", "none", "whole", "complete"], rows
        assert rows["004-bold_rest"][1:4] == ["7", "1–8", "5"], rows  # the gap: instance 5
        assert rows["004-bold_rest"][4].startswith("incomplete") and "missing 1 (5)" in rows["004-bold_rest"][4]
        quarantined = driver.find_element(By.ID, "quarantine")
        assert "Quarantine: 1 file" in quarantined.text
        assert "sender not allowed: 1 file" in quarantined.text, quarantined.text
        assert "sender UNKNOWN not allowed" in quarantined.text
        # No more patient data than the tree's folder names: the other person's name is nowhere.
        assert "Other" not in driver.page_source and study not in driver.page_source
        assert driver.execute_script("return document.scripts.length") == 0  # a page without any script
        shot = Path(os.environ.get("DUMPWATCH_SCREENSHOT") or tmp_path / "page.png")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1000, "height": height,
                                                                      "deviceScaleFactor": 1, "mobile": False})
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        # /metrics: Prometheus' parser takes it, and it says what status --json says.
        code, headers, body = web.get("/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        values = metric_values(body.decode())
        status = json.loads(subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status",
                                            "--json"], capture_output=True, text=True).stdout)
        assert values[("dumpwatch_files_total", (("outcome", "sorted"),))] == status["totals"]["files"]["sorted"] == 13
        assert values[("dumpwatch_quarantined_total", (("reason", "sender_not_allowed"),))] == 1
        assert values[("dumpwatch_quarantine_files", (("reason", "sender_not_allowed"),))] == 1
        assert values[("dumpwatch_backlog_files", ())] == status["dump"]["waiting"] == 0
        assert values[("dumpwatch_healthy", ())] == 1 and status["healthy"]
        assert values[("dumpwatch_paused", ())] == 0
        assert values[("dumpwatch_up", (("program", "storescp"),))] == 1
        assert values[("dumpwatch_series", (("state", "complete"),))] == status["totals"]["series"]["complete"] == 2
        assert values[("dumpwatch_completed_total", (("kind", "series"),))] == 2
        assert values[("dumpwatch_series_incomplete", ())] == len(status["completion"]["incomplete"]) == 1
        assert values[("dumpwatch_sorted_last_day_files", ())] == status["sorted"]["last_day"] == 13
        [fs] = status["disk"]
        assert values[("dumpwatch_disk_used_ratio", (("role", "tree"),))] == pytest.approx(fs["used_percent"] / 100,
                                                                                          abs=0.01)
        kept = sum(f.stat().st_size for f in out.rglob("*.dcm")) + sum(
            f.stat().st_size for f in quarantine.iterdir() if not f.name.endswith(".reason.txt"))
        assert values[("dumpwatch_disk_kept_bytes_per_day", (("role", "tree"),))] == kept
        promtool = shutil.which("promtool")
        if promtool:
            checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
            assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        if driver is not None:
            driver.quit()
        assert web.stop() == 0, web.output()
        serve.stop()
        scp.stop()


@pytest.mark.browser
def test_a_login_is_asked_and_a_wrong_password_refused(tmp_path):
    passwords = tmp_path / "site" / "web.passwords"
    site = write_config(tmp_path / "site", web_passwords=passwords)
    passwords.parent.mkdir(parents=True, exist_ok=True)
    set_password(passwords, "ra", "scanner-day-1")
    assert (passwords.stat().st_mode & 0o777) == 0o640 and "scanner-day-1" not in passwords.read_text()
    web = Web(site)
    driver = None
    try:
        for path in ("/", "/metrics"):
            code, headers, body = web.get(path)
            assert code == 401 and headers["WWW-Authenticate"] == 'Basic realm="dumpwatch", charset="UTF-8"'
            assert b"dumpwatch" not in body.replace(b"dumpwatch web", b"")
        started = time.monotonic()
        code, _, body = web.get("/", ("ra", "wrong-password"))
        assert code == 401 and time.monotonic() - started >= 1.0  # a wrong password waits for its answer
        assert web.get("/", ("nobody", "scanner-day-1"))[0] == 401
        code, headers, body = web.get("/", ("ra", "scanner-day-1"))
        assert code == 200 and b'id="health"' in body
        assert headers["Cache-Control"] == "no-store" and "script-src" not in headers["Content-Security-Policy"]
        assert web.get("/metrics", ("ra", "scanner-day-1"))[0] == 200

        # In the browser too: a wrong password shows no page; the right one does.
        from selenium.webdriver.common.by import By

        driver = browser()
        driver.execute_cdp_cmd("Network.enable", {})

        def log_in(user: str, password: str) -> None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
            driver.get(f"http://127.0.0.1:{web.port}/")

        log_in("ra", "wrong-password")
        # (Chromium asks for a login again rather than show the refusal; headless, nothing shows.)
        assert driver.find_elements(By.ID, "health") == [] and "Quarantine" not in driver.page_source
        log_in("ra", "scanner-day-1")
        assert "dumpwatch on" in driver.find_element(By.ID, "health").text

        # A changed file is read again: the old password stops working at once.
        set_password(passwords, "ra", "scanner-day-2")
        assert web.get("/", ("ra", "scanner-day-1"))[0] == 401
        assert web.get("/", ("ra", "scanner-day-2"))[0] == 200
        assert "wrong password for user 'ra'" in web.output() and "scanner-day" not in web.output()
    finally:
        if driver is not None:
            driver.quit()
        assert web.stop() == 0, web.output()


def test_web_refuses_to_listen_beyond_loopback_without_logins(tmp_path):
    port = free_port()
    site = write_config(tmp_path / "site", web_bind="0.0.0.0", web_port=port)
    done = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "web"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1 and "web_bind = 0.0.0.0 reaches beyond this machine: set web_passwords" in done.stderr
    assert not listening(port)
    # A password file that names nobody is no login either.
    empty = tmp_path / "site" / "empty.passwords"
    empty.write_text("# nobody yet\n")
    site = write_config(tmp_path / "site", web_bind="0.0.0.0", web_port=port, web_passwords=empty)
    done = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "web"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1 and "holds no user" in done.stderr, done.stderr
    assert not listening(port)


def test_the_tally_counts_each_row_once_across_reports(tmp_path):
    """The counts /metrics gives since the journal began, kept between reports: equal to a
    count made afresh, with a row still under way at one report and done at the next, and
    counted anew when the journal is another one."""
    import sqlite3

    from dumpwatch.journal import Entry, Journal
    from dumpwatch.status import Tally

    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    tally = Tally()

    def counts(kept: Tally) -> dict:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return kept.totals(db, path)
        finally:
            db.close()

    def files(outcome: str, count: int, reason: str | None = None) -> list[Entry]:
        return [Entry(outcome, f"/dump/{outcome}{n}", reason=reason, size=100) for n in range(count)]

    journal.record(files("sorted", 5) + files("quarantined", 2, "not a DICOM file (only 3 bytes)"))
    assert counts(tally)["files"] == {"sorted": 5, "duplicate": 0, "quarantined": 2}
    under_way = files("sorted", 1)
    journal.begin(under_way)  # a move under way: not counted, and the rows after it are counted each time
    journal.record(files("duplicate", 3) + files("quarantined", 1, "truncated: the file ends inside the header"))
    assert counts(tally)["files"] == {"sorted": 5, "duplicate": 3, "quarantined": 3}
    assert counts(tally)["quarantined_by_kind"] == {"not_dicom": 2, "truncated": 1}
    journal.finish(under_way)
    journal.record(files("sorted", 4))
    assert counts(tally) == counts(Tally())
    assert counts(tally)["files"] == {"sorted": 10, "duplicate": 3, "quarantined": 3}
    journal.close()

    path.rename(tmp_path / "old.sqlite3")  # moved aside: a new journal starts from nothing
    for leftover in tmp_path.glob("journal.sqlite3-*"):
        leftover.unlink()
    journal = Journal(path)
    journal.record(files("sorted", 1))
    assert counts(tally)["files"] == {"sorted": 1, "duplicate": 0, "quarantined": 0}
    journal.close()

    # A journal copied over this one (cp keeps the inode), with more rows than were counted.
    other = tmp_path / "other.sqlite3"
    journal = Journal(other)
    journal.record(files("duplicate", 2) + files("quarantined", 1, "a DICOMDIR (MediaStorageSOPClassUID x)"))
    journal.close()
    for name in (path, other):
        sqlite3.connect(name).execute("PRAGMA wal_checkpoint(TRUNCATE)").connection.close()
    inode = path.stat().st_ino
    shutil.copyfile(other, path)
    assert path.stat().st_ino == inode
    assert counts(tally)["files"] == {"sorted": 0, "duplicate": 2, "quarantined": 1} == counts(Tally())["files"]


def test_metrics_as_a_textfile_for_node_exporter(tmp_path):
    """`dumpwatch metrics --textfile` writes what /metrics serves, parsed by Prometheus' parser;
    with nothing running, it says so."""
    site = write_config(tmp_path / "site")
    (tmp_path / "site" / "dump").mkdir()
    (tmp_path / "site" / "dump" / "MR.waiting").write_bytes(b"x")
    target = tmp_path / "dumpwatch.prom"
    done = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "metrics", "--textfile",
                           str(target)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    values = metric_values(target.read_text())
    assert values[("dumpwatch_healthy", ())] == 0 and values[("dumpwatch_problems", ())] == 2
    assert values[("dumpwatch_up", (("program", "storescp"),))] == 0
    assert values[("dumpwatch_up", (("program", "serve"),))] == 0
    assert values[("dumpwatch_backlog_files", ())] == 1
    assert values[("dumpwatch_files_total", (("outcome", "sorted"),))] == 0
    assert values[("dumpwatch_disk_level", (("role", "tree"),))] == 0
    assert (target.stat().st_mode & 0o777) == 0o644 and not list(tmp_path.glob(".dumpwatch.prom.*"))


def test_every_query_of_a_report_reads_the_journal_by_an_index(tmp_path):
    """The page's report on a million rows stays fast (bench/web.py) only while each query
    reads by its own index: no query of the outcomes table scans it (but backwards for the
newest row), the ones by time use the
    time index, the last series' count the dest index, and the partial index that counts
    every row by outcome serves the Tally's queries alone."""
    import sqlite3

    from dumpwatch.journal import Entry, Journal
    from dumpwatch.status import read_journal

    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record([Entry("sorted", f"/dump/MR.{n}", dest=f"/out/2026-A/001-t1/{n:04}.dcm", size=10)
                    for n in range(20)] + [Entry("quarantined", "/dump/junk", dest="/q/junk", reason="truncated: x",
                                                 size=3)])
    journal.close()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    data = read_journal(db, path)
    db.set_trace_callback(None)
    assert data["sorted"]["last_day"] == 20 and data["totals"]["files"]["quarantined"] == 1
    plans = {}
    for statement in statements:
        if "FROM outcomes" in statement and statement.lstrip().upper().startswith("SELECT"):
            plans[statement] = " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}"))
    db.close()
    assert len(plans) >= 7, plans
    for statement, plan in plans.items():
        # (the newest sorted row: read backwards from the newest row, it stops at the first)
        assert "SCAN outcomes" not in plan or statement.endswith("ORDER BY id DESC LIMIT 1"), (statement, plan)
        if "time >=" in statement:
            assert "outcomes_time" in plan, (statement, plan)
        if "dest >" in statement:
            assert "outcomes_dest" in plan, (statement, plan)
        if "outcomes_counted" in plan:
            assert "outcome IN ('sorted', 'duplicate', 'quarantined') AND done = 1 AND" in statement, (statement, plan)


def test_slow_crowding_and_foreign_clients_get_nowhere(tmp_path, monkeypatch):
    """A client that trickles its request is cut off at the deadline; one address holds at
    most PER_CLIENT connections; without logins, a Host that is not this machine's (DNS
    rebinding) is refused; a long user name is cut in the log."""
    import socket
    import threading

    from dumpwatch import web
    from dumpwatch.webauth import Logins

    monkeypatch.setattr(web, "TIMEOUT", 2)
    cfg = read_config(write_config(tmp_path / "site", web_hosts="mri-sort.example.org"))
    server = web.serve_web(cfg)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()

    def ask(host: str) -> bytes:
        with socket.create_connection(("127.0.0.1", cfg.web_port), timeout=10) as client:
            client.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return client.recv(100)

    try:
        assert ask(f"127.0.0.1:{cfg.web_port}").startswith(b"HTTP/1.1 200 ")
        assert b" 200 " in ask("localhost") and b" 200 " in ask("[::1]:80") and b" 200 " in ask("mri-sort.example.org")
        assert b" 421 " in ask(f"rebound.example.com:{cfg.web_port}")

        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", cfg.web_port), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\n")
            try:
                for _ in range(20):  # a header byte every 0.5 s: each read is in time, the whole is not
                    time.sleep(0.5)
                    slow.sendall(b"X")
                cut = False
            except OSError:
                cut = True
            if not cut:
                cut = slow.recv(100) == b""
        assert cut and time.monotonic() - started < 6

        crowd = [socket.create_connection(("127.0.0.1", cfg.web_port), timeout=10) for _ in range(web.PER_CLIENT)]
        time.sleep(0.3)
        try:
            with socket.create_connection(("127.0.0.1", cfg.web_port), timeout=10) as one_more:
                one_more.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert one_more.recv(100) == b""  # closed at once
        finally:
            for client in crowd:
                client.close()
        wait_for(lambda: b" 200 " in ask("localhost"), 10, "connections again once the crowd left")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    passwords = tmp_path / "passwords"
    set_password(passwords, "ra", "scanner-day-1")
    header = "Basic " + base64.b64encode(("x" * 50_000 + ":pw").encode()).decode()
    why = Logins(passwords).check(header).why
    assert why.startswith("unknown user 'xxx") and len(why) < 100
    assert Logins(passwords).check("basic " + base64.b64encode(b"ra:scanner-day-1").decode()).user == "ra"


def test_a_new_password_keeps_the_files_group(tmp_path):
    """The README says to chgrp the password file to the web program's group: a user added
    later must not take that away (the web program could no longer read it)."""
    passwords = tmp_path / "passwords"
    set_password(passwords, "ra", "scanner-day-1")
    if os.geteuid() != 0:
        pytest.skip("chgrp to another group needs root")
    os.chown(passwords, -1, 1)  # daemon's group, on Debian
    set_password(passwords, "physicist", "scanner-day-2")
    assert passwords.stat().st_gid == 1 and (passwords.stat().st_mode & 0o777) == 0o640
    assert "physicist:scrypt$" in passwords.read_text() and "ra:scrypt$" in passwords.read_text()
