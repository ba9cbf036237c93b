"""The status page `dumpwatch web` serves: one HTML document, no script at all, refreshed by
the browser itself. It shows what `status` and `report` know: health, recent studies and
their series, the quarantine by kind of reason, and the disks.

It names no more than the sorted tree's folders do: study and series folders, AE titles,
counts and times; never a patient ID, a study or series UID, a hook's output, or text a
reason quotes from a header. Quarantined files are listed by their names in the quarantine.
"""

from __future__ import annotations

import base64
import hashlib
import html
import socket
from datetime import datetime

from dumpwatch import __version__, completeness
from dumpwatch.disk import Filesystem, forecast, gigabytes
from dumpwatch.notify import unquoted
from dumpwatch.reasons import TITLES
from dumpwatch.report import hook_shown

QUARANTINE_LISTED = 20  # files listed under each kind of reason; the count says the rest

CSS = """
:root{color-scheme:light dark;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--line:#8884;--soft:#8881}
*{box-sizing:border-box}
body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{padding:.8rem 1rem;color:#fff}
header.is-ok{background:var(--ok)}header.is-warn{background:var(--warn)}header.is-bad{background:var(--bad)}
header h1{margin:0;font-size:1.1rem;font-weight:600}
header .verdict{margin:.2rem 0 0;font-size:1.6rem;font-weight:700}
header ul{margin:.3rem 0 0;padding-left:1.2rem}
header .small{opacity:.85}
main{padding:0 1rem 2rem;max-width:72rem}
h2{font-size:1.2rem;margin:1.4rem 0 .5rem;border-bottom:1px solid var(--line)}
h3{font-size:1.05rem;margin:0;word-break:break-all}
.small{font-size:.85rem}.dim{opacity:.7}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0}
dt{font-weight:600}dd{margin:0}
article{border:1px solid var(--line);border-radius:.5rem;padding:.6rem .7rem;margin:.6rem 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.tag{display:inline-block;padding:0 .4rem;border-radius:.6rem;font-size:.8rem;font-weight:600;background:var(--soft)}
.good{color:var(--ok)}.warned{color:var(--warn)}.bad{color:var(--bad)}
.tag.good{background:#1a7f3722}.tag.warned{background:#9a670022}.tag.bad{background:#cf222e22}
meter{width:8rem;vertical-align:middle}
details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
footer{padding:1rem;font-size:.8rem;opacity:.7}
@media (max-width:40rem){dl{grid-template-columns:1fr}dt{margin-top:.4rem}main{padding:0 .6rem 2rem}}
"""
CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
POLICY = (f"default-src 'none'; style-src '{CSS_HASH}'; img-src data:; base-uri 'none'; form-action 'none'; "
          "frame-ancestors 'none'")


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def when(seconds: float | None, now: float) -> str:
    """A local time: 14:03 today, else 'Mon 30 Nov 14:03'."""
    if not seconds:
        return "-"
    try:
        moment = datetime.fromtimestamp(seconds)
    except (ValueError, OverflowError, OSError):  # a file time no calendar holds (tmpfs, NFS allow them)
        return "-"
    if moment.date() == datetime.fromtimestamp(now).date():
        return moment.strftime("%H:%M")
    return moment.strftime("%a %d %b %H:%M")


def _day(seconds: float | None) -> object:
    try:
        return datetime.fromtimestamp(seconds).date() if seconds else None
    except (ValueError, OverflowError, OSError):
        return None


def _iso(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def study_date(text: str | None) -> str:
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "no study date"


def render(view: dict) -> str:
    """The page. view: status (status.report), studies (report.gather), quarantined
    (status.quarantine_files), refresh (seconds), days, watermarks (disk_warn, disk_alarm),
    made (time.time())."""
    status, now = view["status"], view["made"]
    level = "bad" if not status["healthy"] else "warn" if status.get("warnings") else "ok"
    verdict = {"bad": "UNHEALTHY", "warn": "Healthy, with a warning", "ok": "Healthy"}[level]
    items = [unquoted(p) for p in status["problems"]] + [unquoted(w) for w in status.get("warnings", [])]
    host = socket.gethostname()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{int(view["refresh"])}">',
        '<link rel="icon" href="data:,">',
        f"<title>{e(verdict)} · dumpwatch on {e(host)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<header class="is-{level}" id="health"><h1>dumpwatch on {e(host)}</h1>',
        f'<p class="verdict">{e(verdict)}</p>',
    ]
    if items:
        parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in items) + "</ul>")
    parts.append(f'<p class="small">As of {e(datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S"))}; '
                 f'this page refreshes itself every {int(view["refresh"])} s.</p></header><main>')
    parts += _receiver(status, now, view["watermarks"])
    parts += _studies(view["studies"], now, view["days"])
    parts += _quarantine(status, view["quarantined"], now)
    parts.append(f'</main><footer>dumpwatch {e(__version__)} · <a href="metrics">metrics</a> · the same as '
                 "<code>dumpwatch status</code> and <code>dumpwatch report</code> on the server</footer>"
                 "</body></html>")
    return "\n".join(parts)


def _receiver(status: dict, now: float, watermarks: tuple[int, int]) -> list[str]:
    scp, watcher, dump = status["storescp"], status["watcher"], status["dump"]
    rows = []
    if not scp["listening"]:
        shown = f'<span class="bad">NOT running</span>: nothing listens on port {e(scp["port"])}'
    elif not scp["answers"]:
        shown = f'<span class="bad">NOT answering</span> a C-ECHO on port {e(scp["port"])}'
    else:
        shown = f'<span class="good">answering</span> on port {e(scp["port"])} as {e(scp["aetitle"])}'
    rows.append(("Receiver", shown))
    if watcher["running"]:
        shown = f'<span class="good">running</span> since {e(when(_iso(watcher.get("since")), now))}'
        if watcher.get("paused"):
            shown += f'; <span class="bad">sorting PAUSED</span>: {e(unquoted(watcher["paused"]))}'
    else:
        shown = '<span class="bad">NOT running</span>: files wait in the dump'
    rows.append(("Watcher", shown))
    if dump["waiting"]:
        shown = f'{dump["waiting"]:,} file{"s" if dump["waiting"] != 1 else ""} waiting'
        if dump["oldest_seconds"] is not None:
            shown += f", the oldest for {age(dump['oldest_seconds'])}"
    else:
        shown = "empty: every file is sorted"
    for item in dump.get("left", []):
        shown += f'<br><span class="warned">{item["files"]} left {item["tries"]}×: {e(unquoted(item["reason"]))}'\
                 "</span>"
    rows.append(("Backlog", shown))
    if status.get("sorted"):
        rows.append(("Sorted", f'{status["sorted"]["last_hour"]:,} files in the last hour, '
                               f'{status["sorted"]["last_day"]:,} in the last day'))
    completion = status.get("completion") or {}
    hooks = (completion.get("hooks") or {}).get("last_day") or {}
    if hooks:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(hooks.items()))
        bad = hooks.get("failed", 0) + hooks.get("interrupted", 0)
        rows.append(("Hooks", f'<span class="{"bad" if bad else "good"}">{e(counts)}</span> in the last day'))
    notices = completion.get("notices") or {}
    if notices.get("waiting") or notices.get("failed"):
        rows.append(("Notices", f'<span class="warned">{notices["waiting"]} waiting, {notices["failed"]} given up'
                                "</span>"))
    for fs in status.get("disk") or []:
        rows.append(("Disk", _disk(fs, *watermarks)))
    body = "".join(f"<dt>{e(name)}</dt><dd>{value}</dd>" for name, value in rows)
    return ['<section id="receiver"><h2>Health</h2>', f"<dl>{body}</dl></section>"]


def _disk(data: dict, warn: int, alarm: int) -> str:
    fs = Filesystem(**data)
    roles = e(", ".join(fs.roles))
    if fs.error:
        return f'{roles}: <span class="bad">cannot be measured ({e(fs.error)})</span>'
    mark = {"alarm": "bad", "warn": "warned"}.get(fs.level, "good")
    meter = (f'<meter min="0" max="100" low="{warn}" high="{alarm}" optimum="0" value="{fs.used_percent:.1f}">'
             "</meter>")
    return (f'{roles}: {meter} <span class="{mark}">{fs.used_percent:.0f}% used</span>, '
            f"{e(gigabytes(fs.free))} free; {e(forecast(fs))}")


def _studies(studies: list[dict], now: float, days: int) -> list[str]:
    today = _day(now)
    recent = [s for s in studies if _day(_iso(s["last"])) == today]
    earlier = [s for s in studies if s not in recent]
    parts = ['<section id="studies"><h2>Today</h2>']
    parts += [_study(s, now) for s in recent] or ['<p class="dim">No study has arrived today.</p>']
    parts.append(f"<h2>The {days} days before</h2>" if days > 1 else "<h2>Yesterday</h2>")
    parts += [_study(s, now) for s in earlier] or ['<p class="dim">None.</p>']
    parts.append("</section>")
    return parts


_STATE = {"complete": "good", "receiving": "warned", "reopened": "warned"}


def _study(study: dict, now: float) -> str:
    series = study["series"]
    senders = ", ".join(study["senders"]) or "sender not recorded"
    hook = hook_shown(study.get("hook"))
    head = (f'<h3>{e(study["folder"] or "(no folder)")}</h3><p class="small">{e(study_date(study["study_date"]))}'
            f' · from {e(senders)} · {len(series)} series, {study["files"]:,} files · '
            f'{e(when(_iso(study["first"]), now))} to {e(when(_iso(study["last"]), now))} · '
            f'<span class="tag {_STATE.get(study["state"], "")}">{e(study["state"])}</span>'
            + (f" · {e(unquoted(hook))}" if hook else "") + "</p>")
    rows = "".join(_series(s) for s in series)
    table = ('<div class="scroll"><table><thead><tr><th>Series</th><th>Files</th><th>Instances</th><th>Missing</th>'
             f"<th>Verdict</th><th>State</th><th>Hook</th></tr></thead><tbody>{rows}</tbody></table></div>")
    return f'<article class="study">{head}{table}</article>'


def _series(s: dict) -> str:
    name = (s["folder"] or "").rsplit("/", 1)[-1] or f'{s["number"] or ""} {s["description"] or ""}'.strip()
    numbers = s["instances"]
    if numbers["first"] is None:
        span = "unnumbered"
    else:
        span = f'{numbers["first"]}–{numbers["last"]}' if numbers["first"] != numbers["last"] else str(numbers["first"])
        if numbers["per_echo"] and len(numbers["echoes"]) > 1:
            span += f' ×{len(numbers["echoes"])} echoes'
    gaps = []
    for echo, ranges in sorted(s["missing"].items(), key=lambda item: int(item[0])):
        listed = completeness.shown(tuple(r) for r in ranges[:completeness.GAPS_SHOWN])
        gaps.append((f"echo {echo}: " if echo != "0" else "") + listed)
    named = sum(b - a + 1 for ranges in s["missing"].values() for a, b in ranges)
    if s["missing_count"] > named:
        gaps.append(f'{s["missing_count"] - named} more, unnumbered')
    verdict = s["verdict"]
    shown = {"whole": '<span class="tag good">whole</span>',
             "incomplete": f'<span class="tag bad">incomplete</span> <span class="small">{e(s["summary"])}</span>'}
    extra = []
    if s["late"]:
        extra.append(f'{s["late"]} late')
    if s["resent"]:
        extra.append(f'{s["resent"]} re-sent')
    hook = hook_shown(s.get("hook"))
    state = f'<span class="tag {_STATE.get(s["state"], "")}">{e(s["state"])}</span>'
    return (f'<tr class="series"><td>{e(name)}' + (f'<br><span class="small dim">{e(", ".join(extra))}</span>'
                                                   if extra else "") + "</td>"
            f'<td class="n">{s["files"]:,}</td><td>{e(span)}</td>'
            f'<td class="{"bad" if gaps else "dim"}">{e("; ".join(gaps)) if gaps else "none"}</td>'
            f'<td>{shown.get(verdict, e(verdict))}</td><td>{state}</td>'
            f'<td class="small{" bad" if s.get("hook") and s["hook"]["state"] in ("failed", "interrupted") else ""}">'
            f"{e(unquoted(hook)) if hook else '-'}</td></tr>")


def _quarantine(status: dict, files: list[dict], now: float) -> list[str]:
    count = len(files)
    parts = [f'<section id="quarantine"><h2>Quarantine: {count:,} file{"s" if count != 1 else ""}</h2>']
    if not files:
        parts.append('<p class="dim">Empty.</p></section>')
        return parts
    groups: dict[str, list[dict]] = {}
    for item in files:  # newest first: so is each group, and the groups by their newest
        groups.setdefault(item["kind"], []).append(item)
    for kind, items in groups.items():
        rows = "".join(f'<tr><td>{e(i["file"])}</td><td>{e(when(i["time"], now))}</td>'
                       f'<td class="small">{e(unquoted(i["reason"]))}</td></tr>' for i in items[:QUARANTINE_LISTED])
        more = (f'<p class="small dim">and {len(items) - QUARANTINE_LISTED:,} more in {e(status["quarantine"]["path"])}'
                "</p>" if len(items) > QUARANTINE_LISTED else "")
        parts.append(f'<details open class="reason"><summary>{e(TITLES.get(kind, kind))}: {len(items):,} '
                     f'file{"s" if len(items) != 1 else ""}, the last at {e(when(items[0]["time"], now))}</summary>'
                     '<div class="scroll"><table><thead><tr><th>File</th><th>Time</th><th>Reason</th></tr></thead>'
                     f"<tbody>{rows}</tbody></table></div>{more}</details>")
    parts.append(f'<p class="small">Each file is in {e(status["quarantine"]["path"])} with its reason beside it; '
                 "<code>dumpwatch sort-once</code> on that folder tries them again.</p></section>")
    return parts
