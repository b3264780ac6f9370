"""Reading a trainer config: the YAML file and its `--set section.key=value` overrides,
validated into config.py's models, with one paragraph per problem naming the key.

Imported by the operator as well (it validates the config it renders), so only
pydantic and PyYAML, never torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config import ConfigError, TrainerConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set training.max_steps=100")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _section_keys(loc: tuple, required_only: bool = False) -> list[str]:
    """The keys of the config section at `loc` (the top level for ()), [] where it is no section."""
    model: Any = TrainerConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [name for name, field in model.model_fields.items() if not required_only or field.is_required()]


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid trainer config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not key or item["type"] == "value_error":
            # Our own cross-field checks already name the keys and values involved.
            lines.append(f"  {message}")
        elif item["type"] == "missing":
            required = [f"{key}.{name}" for name in _section_keys(item["loc"], required_only=True)]
            example = required[0] if required else key
            lines.append(f"  {key}: required {'section' if required else 'key'} is missing"
                         f"{' (it needs ' + ', '.join(required) + ')' if required else ''}; "
                         f"add it to the file or pass --set {example}=VALUE")
        elif item["type"] == "extra_forbidden":
            section = ".".join(str(part) for part in item["loc"][:-1])
            close = difflib.get_close_matches(str(item["loc"][-1]), _section_keys(item["loc"][:-1]), n=1)
            hint = f"did you mean {section + '.' if section else ''}{close[0]}? " if close else ""
            lines.append(f"  {key}: unknown key; {hint}remove it or check its spelling against docs/config.md")
        else:
            quoted = (" (--set reads its value as YAML: quote text, e.g. --set 'data.instance_prompt=\"#1 sks dog\"')"
                      if item["type"] == "string_type" else "")
            lines.append(f"  {key} = {item.get('input')!r}: {message}{quoted}")
    lines.append("Fix the file or override a key with --set section.key=value.")
    return "\n".join(lines)


def validate_config(raw: Any, source: str = "<config>") -> TrainerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid trainer config {source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    config = validate_config(apply_overrides(raw, overrides or []), str(path))
    return _absolute_paths(config)


def _absolute_paths(config: TrainerConfig) -> TrainerConfig:
    """Relative paths in a config file are relative to the working directory, as with
    torchrun's own arguments; they are made absolute once so that every rank agrees."""
    for section, key in _PATH_KEYS:
        node = getattr(config, section)
        value = getattr(node, key)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(node, key, value.absolute())
    return config


_PATH_KEYS = [
    ("model", "cache_dir"),
    ("data", "instance_dir"),
    ("data", "class_dir"),
    ("checkpoint", "dir"),
    ("output", "dir"),
    ("validation", "dir"),
    ("tensorboard", "dir"),
]
