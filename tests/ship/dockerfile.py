"""The Dockerfile read as data: its stages, their base images and instructions; and the
pinned requirement files under docker/ that its stages install."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from tests.ship.chart import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKER_DIR = REPO / "docker"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def logical_lines(text: str) -> list[str]:
    """Instructions with their backslash continuations joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def parse_stages(text: str) -> dict[str, Stage]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and stage is None and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every FROM names its stage: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stage = stages[match.group(2)] = Stage(match.group(2), base)
        elif stage is not None:
            stage.instructions.append((keyword, rest))
    return stages


def pins(path: Path) -> dict[str, str]:
    """name -> pinned version of a requirements file; every line must be `name==version`."""
    pinned = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{path.name}: {line!r} is not pinned with =="
        pinned[canonical(requirement.name)] = specifiers[0].version
    return pinned


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
