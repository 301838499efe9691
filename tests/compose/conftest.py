"""tests/compose/ needs a Docker engine, Compose v2 and the stack's images, which
.ci/compose/run provides before it runs ``pytest -m compose tests/compose``. Any other run
(the default ``python -m pytest`` included) deselects these tests rather than fail them."""

from __future__ import annotations

import pytest

MARKER = "compose"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: brings the real docker compose stack up (.ci/compose/run)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if MARKER in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker(MARKER)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker(MARKER)]
