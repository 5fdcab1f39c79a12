"""Small helpers every section of the report's page uses: escaping, number formats, tables, figures."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable, Sequence


def e(v: Any) -> str:
    """``v`` as escaped HTML text."""
    return html.escape(str(v))


def f(v: Any, fmt: str = ".3f") -> str:
    """A number in ``fmt``; ``n/a`` for ``None`` and non-finite floats."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(float(v), fmt)


def ci(interval: Any, fmt: str = ".3f") -> str:
    """``[lo, hi]`` of an interval; ``n/a`` for none."""
    return f"[{f(interval[0], fmt)}, {f(interval[1], fmt)}]" if interval else "n/a"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """A table; the first ``left`` columns are left-aligned. Cells are HTML (escape text with :func:`e`)."""
    th = "".join(f'<th class="l">{e(h)}</th>' if i < left else f"<th>{e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def img(figs: dict[str, Path], key: str, alt: str) -> str:
    """The figure ``key`` (a PNG beside the page), or nothing when it was not written."""
    return f'<img src="{e(figs[key].name)}" alt="{e(alt)}">' if key in figs else ""
