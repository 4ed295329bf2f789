"""A policy report as one self-contained HTML page (no scripts, no outside assets), for
people: the score, then every check, failed first, with what it saw and how to fix it."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

from cerulean.agent.policy import CheckResult, Policy, Report

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#1b2631;
padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}.sub{color:#566573;margin-top:0}
.score{font-size:2.4rem;font-weight:700}.bar{height:.6rem;background:#e5e8e8;border-radius:.3rem}
.bar>div{height:100%;background:#1f77b4;border-radius:.3rem}
table{border-collapse:collapse;width:100%;margin-top:1.2rem}
th,td{text-align:left;vertical-align:top;padding:.45rem .6rem;border-bottom:1px solid #d5d8dc}
th{background:#f4f6f7}.passed{color:#1e8449}.failed{color:#b03a2e}.error{color:#9a7d0a}.notapplicable{color:#7f8c8d}
.r{font-weight:600;text-transform:uppercase;font-size:.8rem}
code,pre{font:13px/1.35 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all}
details{margin-top:.3rem}summary{cursor:pointer;color:#566573}
ul{margin:.2rem 0;padding-left:1.1rem}
"""

ORDER = {"failed": 0, "error": 1, "passed": 2, "notapplicable": 3}


def _check_row(r: CheckResult, policy: Policy) -> str:
    spec = next((c for c in policy.checks if c.id == r.id), None)
    ids = "; ".join(f"{escape(k)} {escape(', '.join(v))}" for k, v in r.compliance.items())
    rules = "".join(
        f"<li><span class='{'passed' if x.held else 'failed'}'>{'✔' if x.held else '✘'}</span> "
        f"<code>{escape(x.rule)}</code><br><small>{escape(x.evidence)}</small></li>"
        for x in r.rules)
    more = []
    if r.message:
        more.append(f"<p class='error'>{escape(r.message)}</p>")
    if spec is not None and spec.rationale:
        more.append(f"<details><summary>Why</summary><p>{escape(spec.rationale)}</p></details>")
    if spec is not None and (spec.fix or spec.remediation):
        steps = "".join(f"<li><code>{escape(a.describe())}</code></li>" for a in spec.fix)
        text = f"<p>{escape(spec.remediation)}</p>" if spec.remediation else ""
        auto = "<p><code>cerulean policy fix</code> does:</p>" if steps else ""
        more.append(f"<details><summary>How to fix</summary>{text}{auto}<ul>{steps}</ul>"
                    "</details>")
    condition = spec.condition if spec is not None else "all"
    return (f"<tr id='{escape(r.id)}'><td class='{r.result}'><span class='r'>{r.result}</span>"
            f"</td><td><code>{escape(r.id)}</code><br><small>{ids}</small></td>"
            f"<td><strong>{escape(r.title)}</strong><br><small>{condition} of:</small>"
            f"<ul>{rules}</ul>{''.join(more)}</td></tr>")


def render(policy: Policy, report: Report, hostname: str, when: datetime | None = None,
           mode: str = "audit") -> str:
    when = when or datetime.now(UTC)
    results = sorted(report.results, key=lambda r: ORDER.get(r.result, 3))
    rows = "".join(_check_row(r, policy) for r in results)
    title = f"{policy.name} on {hostname}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f"<p class='sub'>Profile <code>{escape(policy.id)}</code> · mode {escape(mode)} · "
        f"checked {escape(when.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>"
        f"{'<p>' + escape(policy.description) + '</p>' if policy.description else ''}"
        f"<p><span class='score'>{report.score:g}%</span> of the checks pass: "
        f"<span class='passed'>{report.count('passed')} passed</span>, "
        f"<span class='failed'>{report.count('failed')} failed</span>, "
        f"<span class='error'>{report.count('error')} could not be checked</span>"
        f"{f', {na} not applicable' if (na := report.count('notapplicable')) else ''}.</p>"
        f"<div class='bar'><div style='width:{report.score:g}%'></div></div>"
        "<table><thead><tr><th>Result</th><th>Check</th><th>What it saw</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></body></html>\n")
