"""What every part of the DreamboothJob spec's models shares: the strict base model, the
error a spec that cannot run raises, and how a validator names the field it refuses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

FIELD_ERROR = "field_error"


class InvalidSpecError(Exception):
    """The spec cannot run; the message names the field, the value and the fix."""


class SpecModel(BaseModel):
    # Unknown fields are typos: reject them (a real API server prunes them silently).
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


def field_error(field: str, value: Any, message: str) -> PydanticCustomError:
    """A problem with one field below the model that finds it, named in the message
    (format_spec_error prints `spec.<model path>.<field> = <value>: <message>`)."""
    return PydanticCustomError(FIELD_ERROR, message.replace("{", "{{").replace("}", "}}"),
                               {"field": field, "value": value})
