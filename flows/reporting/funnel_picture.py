"""A connector's funnel in the ledger as a picture for a Prefect markdown artifact: a bar chart
(SVG), linked → delivered → opened → started → connected → activated, then the tenants
broken, disconnected, declined and failed now; and the same as a markdown table whose bars are
Unicode blocks.

How each renders in Prefect 3.9's UI (read from the UI bundles it ships, prefect/server/ui and
ui-v2, and seen in Chromium; docs/sync.md): the React UI (the default) renders markdown with
react-markdown, rehype-raw then rehype-sanitize (GitHub's schema), which drops a raw <svg>,
and renders a Mermaid block; its URL filter keeps `data:image/...` in an image's src, on
purpose. The Vue UI (still served) sanitizes raw HTML with DOMPurify and makes an <img> of a
markdown image as it is, but shows a Mermaid block as code. So: the SVG as a `data:` image,
which both draw; and the table, which every markdown renders (the API, a terminal, a UI whose
filter drops the image)."""

from __future__ import annotations

import base64
from html import escape

from onboarding.ledger import Funnel, funnel_lines

STAGE_COLOURS = {
    "linked": "#c7d2fe",
    "delivered": "#a5b4fc",
    "opened": "#818cf8",
    "started": "#6366f1",
    "connected": "#4338ca",
    "activated": "#15803d",
}
# The tenants in each of these statuses now (not stages a tenant went through).
NOW_COLOURS = {
    "broken": "#dc2626",
    "disconnected": "#ea580c",
    "declined": "#78716c",
    "failed": "#7f1d1d",
}
WIDTH, ROW, LABEL_W, BAR_W, TOP = 640, 26, 116, 360, 58
BAR_CELLS = 24  # the table's bar at 100 %, in full blocks
_EIGHTHS = " ▏▎▍▌▋▊▉"


def funnel_svg(title: str, funnel: Funnel) -> str:
    """The funnel as an SVG bar chart: each bar's length its share of the tenants linked; a
    status row of 0 has no bar; one above 0 at least a sliver."""
    rows = [(s, getattr(funnel, s), STAGE_COLOURS[s]) for s in Funnel.STAGES]
    now = [(s, getattr(funnel, s), c) for s, c in NOW_COLOURS.items()]
    height = TOP + ROW * (len(rows) + len(now)) + 40
    base = max(funnel.linked, 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="system-ui, -apple-system, Segoe UI, '
        'Roboto, Helvetica, Arial, sans-serif" font-size="13">',
        f'<rect x="0.5" y="0.5" width="{WIDTH - 1}" height="{height - 1}" rx="8" '
        'fill="#ffffff" stroke="#e2e8f0"/>',
        f'<text x="16" y="26" font-size="16" font-weight="600" fill="#0f172a">'
        f"{escape(title)}</text>",
        f'<text x="16" y="44" fill="#64748b">{funnel.linked:,} tenant(s) linked; each bar '
        "is its share of them</text>",
    ]
    y = TOP

    def bar(label: str, count: int, colour: str, bold: bool = False) -> None:
        nonlocal y
        width = 0.0 if count == 0 else max(2.0, BAR_W * count / base)
        weight = ' font-weight="600"' if bold else ""
        parts.extend(
            [
                f'<text x="16" y="{y + 17}" fill="#334155"{weight}>{label}</text>',
                f'<rect x="{LABEL_W}" y="{y + 5}" width="{BAR_W}" height="16" rx="3" '
                'fill="#f1f5f9"/>',
                f'<rect x="{LABEL_W}" y="{y + 5}" width="{width:.1f}" height="16" rx="3" '
                f'fill="{colour}"/>',
                f'<text x="{LABEL_W + BAR_W + 10}" y="{y + 17}" fill="#0f172a"{weight}>'
                f"{count:,} · {count / base:.0%}</text>",
            ]
        )
        y += ROW

    for stage, count, colour in rows:
        bar(stage, count, colour, bold=stage == "activated")
    y += 8
    parts.append(
        f'<line x1="16" y1="{y - 4}" x2="{WIDTH - 16}" y2="{y - 4}" stroke="#e2e8f0"/>'
        f'<text x="16" y="{y + 10}" font-size="11" fill="#64748b">NOW</text>'
    )
    y += 14
    for status, count, colour in now:
        bar(status, count, colour)
    parts.append("</svg>")
    return "".join(parts)


def funnel_image(title: str, funnel: Funnel) -> str:
    """The chart as a markdown image (a `data:` URI): its alt text the funnel in one line."""
    svg = base64.b64encode(funnel_svg(title, funnel).encode()).decode("ascii")
    alt = f"{title}: {funnel_lines(funnel)}".replace("[", "(").replace("]", ")")
    return f"![{alt}](data:image/svg+xml;base64,{svg})"


def funnel_table(funnel: Funnel) -> list[str]:
    """The funnel as markdown table lines, a bar of Unicode blocks in each row."""
    base = max(funnel.linked, 1)
    lines = ["| stage | tenants | of linked | |", "| --- | ---: | ---: | --- |"]
    for stage in Funnel.STAGES:
        count = getattr(funnel, stage)
        lines.append(f"| {stage} | {count:,} | {count / base:.0%} | {blocks(count / base)} |")
    for status in NOW_COLOURS:
        count = getattr(funnel, status)
        lines.append(
            f"| *{status} now* | {count:,} | {count / base:.0%} | {blocks(count / base)} |"
        )
    return lines


def blocks(share: float, cells: int = BAR_CELLS) -> str:
    """A bar `share` (0..1) of `cells` full blocks long, to an eighth of a block; a share
    above 0 shows at least an eighth."""
    eighths = round(max(0.0, min(share, 1.0)) * cells * 8)
    if share > 0 and eighths == 0:
        eighths = 1
    full, part = divmod(eighths, 8)
    return ("█" * full + _EIGHTHS[part].strip()) or "·"
