"""Metric names that PromQL expressions query: in the Grafana dashboard and in the
alerting rules (deploy/), for the tests that check each has a sample in a scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "meshdns.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                 "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not a function,
    keyword, label matcher, grouping label, range, number or string."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\(?))", text):
        word = match.group(0)
        if not match.group(1) and word.lower() not in _PROMQL_WORDS:
            names.add(word)
    return names


def dashboard_metrics() -> set[str]:
    """Metric names in the Grafana dashboard's ``expr`` fields."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return set().union(*map(promql_metric_names, exprs))


def rule_metrics() -> set[str]:
    """Metric names the alerting rules (deploy/prometheus/rules.yaml) query."""
    doc = yaml.safe_load(RULES.read_text())
    return set().union(*(promql_metric_names(rule["expr"]) for group in doc["groups"]
                         for rule in group["rules"]))
