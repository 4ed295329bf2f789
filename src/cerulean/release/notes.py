"""Release notes (NOTES.md) from the package changes of a release."""

from __future__ import annotations

from cerulean.protocol.update import PackageChange


def notes_markdown(image: str, version: str, previous: str | None,
                   changes: dict[str, list[PackageChange]]) -> str:
    lines = [f"# {image} {version}", ""]
    if previous is None:
        lines += ["The first release of this image.", ""]
    else:
        lines += [f"Changes since {previous}.", ""]
    for arch, chs in sorted(changes.items()):
        cves = sorted({c for ch in chs for c in ch.cves})
        lines += [f"## {arch}: {len(chs)} package changes, {len(cves)} CVEs fixed", ""]
        if cves:
            lines += ["Fixes: " + ", ".join(cves), ""]
        if chs:
            lines += ["| package | from | to | CVEs |", "|---|---|---|---|"]
            lines += [f"| {c.name} | {c.old or '(new)'} | {c.new or '(removed)'} | "
                      f"{', '.join(c.cves)} |" for c in chs]
            lines.append("")
    return "\n".join(lines)
