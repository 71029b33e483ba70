"""The one renderer of fedrad's report pages (the clinical report, the model card and the privacy
audit): a strict, autoescaped Jinja template per page with one stylesheet for all of them
(``report.css``: screen and print), PNG figures embedded as data URIs, and the page's content
written next to it as JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape
from markupsafe import Markup

STYLESHEET = Path(__file__).with_name("report.css")


def number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def page_template(folder: Path, name: str, **filters: Callable[..., Any]) -> Template:
    """A report page's Jinja template from ``folder``: autoescaped, strict about undefined
    names, with ``number`` and the given ``filters``, and the shared stylesheet as ``style``."""
    env = Environment(
        loader=FileSystemLoader(folder),
        autoescape=select_autoescape(default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(number=number, **filters)
    env.globals["style"] = Markup(STYLESHEET.read_text())
    return env.get_template(name)


def write_report_files(
    output_dir: Path,
    content: dict[str, Any],
    figures: dict[str, bytes],
    render: Callable[[dict[str, Any], dict[str, str]], str],
    json_name: str,
    html_name: str,
) -> Path:
    """Write the figures (PNG), ``content`` as JSON and the self-contained HTML page (figures
    embedded as data URIs, rendered by ``render``) into ``output_dir``; return the HTML path."""
    for name, png in figures.items():
        (output_dir / name).write_bytes(png)
    content = content | {"figures": sorted(figures)}
    (output_dir / json_name).write_text(json.dumps(content, indent=2) + "\n")
    embedded = {
        name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in figures.items()
    }
    path = output_dir / html_name
    path.write_text(render(content, embedded), encoding="utf-8")
    return path
