"""Reading a gateway's ``GET /metrics`` as Prometheus does: over HTTP, parsed by
prometheus_client's own parser, and the Grafana dashboard's queries."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import T

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chat.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"

#: Bytes of an HTTP answer read at most (an exposition is a few KiB).
MAX_RESPONSE = 1 << 20


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, body) of ``GET path`` on loopback ``port``."""
    async with asyncio.timeout(T):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read(MAX_RESPONSE)
            while chunk := await reader.read(MAX_RESPONSE):
                raw += chunk
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body.decode()


class Scrape:
    """One exposition, parsed: families by name, and each sample's value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self._samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The value of sample ``name`` with exactly ``labels``."""
        key = (name, tuple(sorted(labels.items())))
        assert key in self._samples, f"no sample {name}{labels or ''} in:\n{self.text}"
        return self._samples[key]

    def sample_names(self) -> set[str]:
        return {name for name, _ in self._samples}

    def refused(self) -> dict[str, float]:
        """chat_lines_refused_total by reason."""
        return {
            s.labels["reason"]: s.value
            for s in self.families["chat_lines_refused"].samples
            if s.name == "chat_lines_refused_total"
        }


async def scrape(port: int) -> Scrape:
    """``GET /metrics`` on a health port, checked as Prometheus would take it."""
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    return Scrape(body)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _values(node: Any, key: str) -> Iterator[Any]:
    """Every value under ``key`` anywhere in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _values(item, key)


def dashboard_exprs() -> list[str]:
    """The PromQL of every query of the dashboard (panels, rows, variables)."""
    return [expr for expr in _values(dashboard(), "expr") if isinstance(expr, str)]


# A metric name in PromQL: an identifier that is not followed by "(" (a function), not a
# label name inside {...} or by(...), and not a keyword. The dashboard's names all start
# with chat_ or process_, which is what this looks for.
_METRIC = re.compile(r"\b((?:chat|process)_[A-Za-z0-9_]*)\b(?!\s*[=!~(])")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    return set(_METRIC.findall(expr))
