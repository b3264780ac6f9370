"""Label selectors (`?labelSelector=`) read as a Kubernetes API server reads them, for
the emulated API's lists and watches.

The grammar of k8s.io/apimachinery's labels.Parse: requirements joined by commas, all
of which must hold. `key` and `!key` (has the label, lacks it), `key=value` (or `==`),
`key!=value`, `key in (a,b)`, `key notin (a,b)`. `!=` and `notin` also match an object
without the label, as on a real API server. (`key>n`/`key<n` are not read: nothing here uses them.)
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

# A label key: an optional DNS-subdomain prefix and `/`, then a name; a value may be empty.
_KEY = r"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"(?P<absent>!)\s*(?P<absent_key>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:(?P<operator>==|=|!=)\s*(?P<value>{_VALUE})"
    rf"|\s(?P<set_operator>in|notin)\s*\((?P<values>[^()]*)\))?")
# Commas between requirements, not those inside an `in (a,b)` list.
_REQUIREMENT_COMMA = re.compile(r",(?![^()]*\))")


class Requirement(NamedTuple):
    key: str
    operator: str  # "exists", "!", "in" or "notin" (`=` is `in` one value, `!=` is `notin`)
    values: frozenset[str] = frozenset()


def parse_selector(selector: str) -> list[Requirement]:
    """The selector's requirements; ValueError, worded as an API server's 400 reply, for
    one that is not a selector. An empty selector selects everything."""
    if not selector.strip():
        return []
    requirements = []
    for term in _REQUIREMENT_COMMA.split(selector):
        match = _REQUIREMENT.fullmatch(term.strip())
        if match is None:
            raise ValueError(f"unable to parse requirement {term.strip()!r} of labelSelector {selector!r}: "
                             "expected key, !key, key=value, key!=value, key in (a,b) or key notin (a,b)")
        requirements.append(_requirement(match))
    return requirements


def _requirement(match: re.Match[str]) -> Requirement:
    if match["absent"]:
        return Requirement(match["absent_key"], "!")
    if match["operator"]:
        return Requirement(match["key"], "notin" if match["operator"] == "!=" else "in", frozenset([match["value"]]))
    if match["set_operator"]:
        values = frozenset(value.strip() for value in match["values"].split(","))
        if not all(re.fullmatch(_VALUE, value) for value in values):
            raise ValueError(f"unable to parse values {match['values']!r} of label {match['key']!r}: "
                             "each must be a label value (alphanumerics, '-', '_', '.')")
        return Requirement(match["key"], match["set_operator"], values)
    return Requirement(match["key"], "exists")


def matches(requirements: list[Requirement], labels: dict[str, str]) -> bool:
    for key, operator, values in requirements:
        present = key in labels
        if operator == "exists" and not present:
            return False
        if operator == "!" and present:
            return False
        if operator == "in" and (not present or labels[key] not in values):
            return False
        if operator == "notin" and present and labels[key] in values:
            return False
    return True


def labels_of(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def selected_event(requirements: list[Requirement], event: dict[str, Any],
                   visible: dict[tuple[str | None, str], dict[str, Any]]) -> dict[str, Any] | None:
    """What a watch with this selector streams for one change of an object, or None.

    `visible` holds the objects this stream last showed as matching, by (namespace, name);
    it is updated. As in the API server's watch cache, an object whose labels come to
    match is ADDED, and one whose labels stop matching is DELETED, shown as it was last
    seen but with the new resourceVersion, so that a client's cache forgets it.
    """
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace"), meta.get("name"))
    now_matches = matches(requirements, labels_of(obj))
    before = visible.pop(key, None)
    if event["type"] == "DELETED":
        return event if before is not None or now_matches else None
    if now_matches:
        visible[key] = obj
        return event if before is not None else {**event, "type": "ADDED"}
    if before is None:
        return None
    gone = {**before, "metadata": {**before["metadata"], "resourceVersion": meta.get("resourceVersion")}}
    return {"type": "DELETED", "object": gone}
