"""Write an ``evaluate`` result as ``<stem>.json`` and a human-readable ``<stem>.md`` side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_report(result: dict[str, Any]) -> str:
    """Markdown table of the metrics (value, spread, sample counts, what each number is), then notes."""
    lines = ["# difflab evaluation", "", f"Images evaluated: {result.get('num_images')}", "",
             "| metric | value | ± | n | n ref | what it is |", "| --- | --- | --- | --- | --- | --- |"]
    for name, m in result.get("metrics", {}).items():
        spread = _fmt(m["std"]) if "std" in m else ""
        lines.append(f"| {name} | {_fmt(m['value'])} | {spread} | {m.get('num_images', '')} | "
                     f"{m.get('num_reference', '')} | {m.get('label', '')} |")
    proto = result.get("protocol", {})
    lines += ["", "## Protocol", ""] + [f"- {k}: {v}" for k, v in proto.items() if v is not None]
    inputs = result.get("inputs", {})
    if inputs:
        lines += [f"- input sizes: {inputs.get('sizes')}", f"- input channels: {inputs.get('channels')}"]
    if result.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], directory: str | os.PathLike, stem: str = "metrics") -> tuple[Path, Path]:
    """Write ``<directory>/<stem>.json`` and ``<directory>/<stem>.md``; return both paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown_report(result))
    return json_path, md_path
