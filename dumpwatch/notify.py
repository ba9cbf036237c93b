"""Notices: what dumpwatch tells the team (a study is complete, files went to the quarantine,
health changed), by e-mail (SMTP with STARTTLS and a login) and by webhook (a JSON POST).

A notice names no patient: the study's folder (often the patient's name) and anything that
could hold it are left out unless notify_identifiers = yes. Its text is built when it is
queued, in the journal (actions.py), and sent from there: a notice that cannot be delivered
is tried again later, and never holds up receiving or sorting.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import ssl
import urllib.request
from email.message import EmailMessage
from pathlib import Path

from dumpwatch import __version__, completeness, completion
from dumpwatch.config import Config, notify_from, smtp_port

TIMEOUT = 30  # seconds for a mail server or a webhook to answer
HIDDEN = "(not named: notify_identifiers = no)"
# Quoted text in a reason, but for 'DICM': repr() quotes with ' (escaping any ' inside as \')
# or, when the text holds a ' and no ", with ".
QUOTED = re.compile(r"'(?!DICM')(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def host() -> str:
    return socket.gethostname()


def study(db, study_id: int, again: bool, identifiers: bool) -> tuple[str, dict]:
    """A complete study's notice: (subject, body), with each series' verdict."""
    row = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
    series = []
    incomplete = 0
    for s in db.execute("SELECT * FROM series WHERE study_id = ? AND files > 0 ORDER BY first, id", (study_id,)):
        verdict = completion.verdict_of(s)
        incomplete += verdict.verdict == completeness.INCOMPLETE
        item = {"number": s["number"], "description": s["description"], "modality": s["modality"],
                "files": s["files"], "verdict": verdict.verdict, "summary": verdict.summary()}
        if identifiers:
            item["folder"] = s["folder"]
        series.append(item)
    files = sum(s["files"] for s in series)
    date = row["study_date"] or "no StudyDate"
    name = row["folder"] if identifiers else f"study #{study_id} of {date}"
    lacking = f", {incomplete} of them missing images" if incomplete else ", none missing images"
    subject = (f"dumpwatch: study complete{' again' if again else ''}: {name}: {len(series)} series, "
               f"{files} files{lacking}")
    body = {"event": "study_complete", "host": host(), "again": again,
            "study": {"id": study_id, "study_date": row["study_date"], "files": files, "series": len(series),
                      "incomplete": incomplete, "folder": row["folder"] if identifiers else HIDDEN},
            "series": series}
    return subject, body


def quarantine(rows: list, folder: Path | None, dir_out: Path | None, identifiers: bool) -> tuple[str, dict]:
    """Files quarantined since the last such notice, in one message: how many, and why."""
    reasons: dict[str, int] = {}
    for row in rows:
        reason = row["reason"] or "(no reason)"
        if not identifiers:
            reason = without_paths(reason, dir_out)
        reasons[reason] = reasons.get(reason, 0) + 1
    ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    subject = f"dumpwatch: {len(rows)} file{'s' if len(rows) != 1 else ''} quarantined on {host()}"
    body = {"event": "quarantine", "host": host(), "files": len(rows), "folder": str(folder) if folder else None,
            "reasons": [{"reason": r, "files": n} for r, n in ranked]}
    if identifiers:
        body["names"] = [row["name"] for row in rows[:100]]
    return subject, body


def unquoted(text: str) -> str:
    """text without what it quotes (header values: names, UIDs), but for 'DICM'."""
    return QUOTED.sub("'...'", text)


def without_paths(reason: str, dir_out: Path | None) -> str:
    """A reason without the tree's paths, nor any quoted text: the tree's folders can be
    patients' names, and reasons quote folder names ('20240101-DOE_JOHN' in the sorted tree is
    not a folder) and values read from headers. Only dumpwatch's own 'DICM' stays."""
    if dir_out is not None:
        reason = re.sub(re.escape(str(dir_out).rstrip("/")) + r"/[^)\s]*", "<dir_out>/...", reason)
    return unquoted(reason)


def health(healthy: bool, problems: list[str], dir_out: Path | None, identifiers: bool) -> tuple[str, dict]:
    """Health changed: the problems as status words them, without the tree's paths (a file
    left in the dump or a paused move can name one) unless identifiers."""
    if not identifiers:
        problems = [without_paths(p, dir_out) for p in problems]
    subject = f"dumpwatch on {host()}: " + ("healthy again" if healthy else "UNHEALTHY: " + "; ".join(problems))
    return subject[:300], {"event": "healthy" if healthy else "unhealthy", "host": host(), "healthy": healthy,
                           "problems": problems}


def warning(warnings: list[str], dir_out: Path | None, identifiers: bool) -> tuple[str, dict]:
    """A warning began (a disk past disk_warn, or filling within a day), worded as status does."""
    if not identifiers:
        warnings = [without_paths(w, dir_out) for w in warnings]
    subject = f"dumpwatch on {host()}: WARNING: " + "; ".join(warnings)
    return subject[:300], {"event": "warning", "host": host(), "healthy": True, "problems": warnings}


def text(subject: str, body: dict) -> str:
    """The message for a person: the subject, then what the body says, line by line."""
    lines = [subject, ""]
    if body["event"] == "study_complete":
        for s in body["series"]:
            name = s.get("folder") or f"{s['number']} {s['description'] or ''}".strip()
            lines.append(f"  {name}: {s['files']} files, {s['summary']}")
        lines += ["", "dumpwatch report --since 1d shows each series."]
    elif body["event"] == "quarantine":
        for item in body["reasons"]:
            lines.append(f"  {item['files']:>5}  {item['reason']}")
        lines += ["", f"The files are in {body['folder']}, each with its reason beside it."]
    else:
        lines += [f"  {p}" for p in body["problems"]] or ["  all well"]
        lines += ["", "dumpwatch status tells more."]
    lines.append(f"-- dumpwatch {__version__} on {body['host']}")
    return "\n".join(lines) + "\n"


def send_email(cfg: Config, password: str | None, subject: str, body: dict) -> None:
    """Raises OSError or smtplib.SMTPException if the mail server does not take it."""
    message = EmailMessage()
    message["From"] = notify_from(cfg)
    message["To"] = ", ".join(cfg.notify_email)
    message["Subject"] = subject.replace("\n", " ")
    message.set_content(text(subject, body))
    context = ssl.create_default_context(cafile=str(cfg.smtp_ca_file) if cfg.smtp_ca_file else None)
    port = smtp_port(cfg)
    smtp: smtplib.SMTP
    if cfg.smtp_security == "tls":
        smtp = smtplib.SMTP_SSL(cfg.smtp_host, port, timeout=TIMEOUT, context=context)
    else:
        smtp = smtplib.SMTP(cfg.smtp_host, port, timeout=TIMEOUT)
    with smtp:
        smtp.ehlo()
        if cfg.smtp_security == "starttls":
            smtp.starttls(context=context)  # fails, and sends nothing, where the server offers no TLS
            smtp.ehlo()
        if cfg.smtp_user:
            smtp.login(cfg.smtp_user, password or "")
        smtp.send_message(message)


def post_webhook(url: str, subject: str, body: dict) -> None:
    """POST the body as JSON, with `text` for chat services that show that field (Slack,
    Mattermost). Raises OSError (urllib's errors are OSErrors) unless the answer is 2xx."""
    data = json.dumps({**body, "text": text(subject, body), "subject": subject}).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"dumpwatch/{__version__}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310  (http or https, as configured)
        if not 200 <= answer.status < 300:
            raise OSError(f"the webhook answered {answer.status}")


def read_password(path: Path | None) -> str | None:
    """smtp_password_file's first line; OSError if it cannot be read."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        return file.readline().rstrip("\r\n")
