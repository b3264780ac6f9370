"""Writes docs/config.md from the trainer's pydantic models (the one source of truth).

    python scripts/render_config_reference.py          # rewrite docs/config.md
    python scripts/render_config_reference.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydantic_core import PydanticUndefined  # noqa: E402

from scripts.reference_doc import cell, write_or_check  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402

TARGET = REPO / "docs" / "config.md"


def default_text(field) -> str:
    if field.default_factory is not None:
        if field.default_factory.__name__.startswith("_"):
            return "(computed)"
        return f"`{field.default_factory()!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`" if field.default is not None else "`null`"


def render() -> str:
    lines = [
        "# Trainer config reference",
        "",
        "Generated from `trainer/config.py` by `scripts/render_config_reference.py`; do not edit by hand.",
        "Every key can be overridden on the command line: `--set section.key=value` (value parsed as YAML).",
        "Unknown keys are errors.",
        "",
    ]
    for section_name, section_field in TrainerConfig.model_fields.items():
        section = section_field.annotation
        required = " (required section)" if section_field.is_required() else ""
        lines += [f"## `{section_name}`{required}", "", "| key | default | meaning |", "|---|---|---|"]
        for name, field in section.model_fields.items():
            lines.append(f"| `{section_name}.{name}` | {default_text(field)} | {cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(write_or_check(TARGET, render(), sys.argv))
