"""HTML building blocks of the reports: escaping, tables, inline images and the page shell. Standard library only.

Every piece of text goes through `esc` unless it is already `Html` (a fragment these helpers built): class names,
gate reasons, camera ids and operator notes come from users, and a report must never run what they typed.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime


class Html(str):
    """A fragment of markup that is safe to insert as is (built by these helpers from escaped text)."""

    __slots__ = ()


Cell = object  # a table cell: Html is inserted as is, anything else is formatted with str() and escaped


def esc(value: object) -> Html:
    """`value` as text that cannot be read as markup (quotes included, so it is safe in attributes too)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def join(parts: Iterable[Html | str], separator: str = "") -> Html:
    """Fragments in a row; plain strings among them are escaped."""
    return Html(separator.join(esc(part) for part in parts))


def tag(name: str, content: Html | str = "", **attributes: str) -> Html:
    """`<name attr="...">content</name>`; attribute values and plain-string content are escaped."""
    attrs = "".join(f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"' for key, value in attributes.items())
    return Html(f"<{name}{attrs}>{esc(content)}</{name}>")


def note(text: Html | str) -> Html:
    """A visible remark where data is missing or needs a caveat (never a blank)."""
    return tag("p", text, class_="note")


def when(value: datetime | None) -> str:
    """A timestamp as UTC text ("" for none); naive values (SQLite drops the zone) are UTC."""
    if value is None:
        return ""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(png: bytes, alt: str, *, css_class: str = "figure") -> Html:
    """An inline PNG image (base64 data URI: the page needs no other file)."""
    return Html(f'<img class="{esc(css_class)}" src="{png_data_uri(png)}" alt="{esc(alt)}">')


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, numeric: Iterable[int] = (), css_class: str = ""
) -> Html:
    """A table; columns whose index is in `numeric` are right-aligned (numbers line up)."""
    right = set(numeric)

    def cell(name: str, index: int, value: Cell) -> str:
        align = ' class="num"' if index in right else ""
        return f"<{name}{align}>{esc(value)}</{name}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    attrs = f' class="{esc(css_class)}"' if css_class else ""
    return Html(f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def definitions(items: Iterable[tuple[str, Cell]]) -> Html:
    """A two-column list of facts (term: value)."""
    body = "".join(f"<dt>{esc(term)}</dt><dd>{esc(value)}</dd>" for term, value in items)
    return Html(f'<dl class="facts">{body}</dl>')


def section(anchor: str, title: str, *content: Html) -> Html:
    return Html(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(content)}</section>')


def page(title: str, header: Html, sections: Sequence[tuple[str, str, Html]], footer: Html | str = "") -> Html:
    """The whole document: inline CSS, a table of contents, the sections; no script, no external resource."""
    contents = "".join(f'<li><a href="#{esc(anchor)}">{esc(name)}</a></li>' for anchor, name, _ in sections)
    body = "".join(section(anchor, name, content) for anchor, name, content in sections)
    return Html(
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body><main>{header}<nav><ol class="toc">{contents}</ol></nav>{body}'
        f"<footer>{esc(footer)}</footer></main></body></html>\n"
    )


CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --band: #f5f7fa; --accent: #2f6fb0; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef1f5; color: var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header.report, section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 18px 22px; margin: 0 0 18px; }
h1 { font-size: 24px; margin: 0 0 6px; }
h2 { font-size: 19px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; }
nav ol.toc { display: flex; flex-wrap: wrap; gap: 6px 18px; list-style: none; padding: 0; margin: 0 0 18px; }
nav a { color: var(--accent); text-decoration: none; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 11px; font-size: 13px; font-weight: 600;
  color: #fff; background: var(--muted); vertical-align: middle; margin-left: 6px; }
.badge.live { background: #2e8540; } .badge.accepted { background: var(--accent); }
.badge.rejected { background: #c0392b; } .badge.pruned { background: #7b8794; }
.badge.open { background: #d9822b; } .badge.acknowledged { background: #7b8794; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 8px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th { background: var(--band); font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.matrix td.diag { font-weight: 700; background: #e3f0e6; }
img.figure { display: block; max-width: 100%; height: auto; margin: 6px 0 10px; }
.note { color: var(--muted); background: var(--band); border-left: 3px solid #9aa5b1; padding: 6px 10px;
  margin: 8px 0; font-style: italic; }
.good { color: #2e8540; } .bad { color: #c0392b; }
ul.reasons { margin: 4px 0 8px 0; padding-left: 20px; }
.alert { border-top: 1px solid var(--line); padding-top: 10px; margin-top: 10px; }
.examples { display: flex; flex-wrap: wrap; gap: 14px; }
figure.example { margin: 0; text-align: center; font-size: 12px; color: var(--muted); }
figure.example .pair { display: flex; gap: 4px; }
figure.example img { width: 180px; max-width: 200px; height: auto;
  border: 1px solid var(--line); }
details pre { background: var(--band); padding: 10px; overflow-x: auto; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"""
