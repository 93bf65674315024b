"""Small helpers shared by every report writer (analyze, compare, circuits, sweep, bench): one None-safe
number format, one CSV renderer and one peak-memory reading, so the tables agree on how a missing
number looks and the reports on what "peak RSS" means."""
from __future__ import annotations

import csv
import io
import resource


def fmt(value, digits: int = 3, none: str = "–") -> str:
    """A table cell: `none` for a missing number, floats to `digits` decimals, anything else as str."""
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def csv_text(header: list[str], rows) -> str:
    """The CSV of a header and rows (Excel dialect, \\r\\n line ends as the csv module writes them)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def aligned_lines(header: list[str], lines: list[list], strip: bool = False) -> list[str]:
    """Fixed-width text table lines: the header, then each row, columns padded to their widest cell and
    joined by two spaces (`strip`: no trailing blanks)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]

    def join(cells) -> str:
        text = "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
        return text.rstrip() if strip else text

    return [join(header)] + [join(line) for line in lines]


# The one stylesheet of every HTML page we write (analysis, circuits, exports).
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.floor{color:#888;font-size:11px}
.ctx{font-family:ui-monospace,monospace;font-size:12px;white-space:pre;margin:2px 0;line-height:1.6}
.ctx span{border-radius:2px}.focus{outline:1px solid #000}.dash{border:1px solid #ddd;padding:8px 12px;margin:12px 0}
.muted{color:#777;font-size:12px}img{max-width:100%}code{font-size:90%}
"""


def html_page(title: str, body: str) -> str:
    """A complete self-contained HTML page (no external assets) with the shared stylesheet."""
    import html

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
