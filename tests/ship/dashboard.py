"""The shipped Grafana dashboard read as data: every PromQL expression of its panels and
template variables, with Grafana's variables substituted as Grafana would."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tests.ship.chart import DASHBOARD

# Grafana's rate interval is max(4 x scrape interval, step + scrape interval); the test
# scrapes every second and evaluates at one instant, so a window over the whole run.
RATE_INTERVAL = "1m"
LABEL_VALUES = re.compile(r"label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [PanelQuery(panel["title"], target["refId"], target["expr"])
            for panel in panels(dashboard) for target in panel.get("targets", [])]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable expansion for the ones the dashboard uses; any other `$` is an error."""
    values = {**variables, "__rate_interval": RATE_INTERVAL}
    result = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in result, f"unexpanded variable in {expr!r}"
    return result


def variable_queries(dashboard: dict[str, Any]) -> dict[str, tuple[str | None, str]]:
    """name -> (series selector or None, label) of each `label_values(...)` variable."""
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.fullmatch(variable["query"]["query"])
        assert match, f"variable {variable['name']}: only label_values(...) queries are supported"
        found[variable["name"]] = (match.group("match"), match.group("label"))
    return found
