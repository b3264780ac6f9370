"""What the reference generators share: write the page, or (--check) only say whether the
written one is current."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(target: Path, text: str, argv: list[str]) -> int:
    """Exit status: with --check, 1 when `target` differs from `text`; else write it."""
    if "--check" in argv:
        return 0 if target.exists() and target.read_text() == text else 1
    target.parent.mkdir(exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}")
    return 0


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    sys.exit("a helper of render_config_reference.py and render_crd_reference.py")
