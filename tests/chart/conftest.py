"""pytest fixtures of the Helm chart tests: the chart loaded once through Helm's Go SDK
(helm-python-sdk, offline) and its renders with default and non-default values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python
import pytest
from chart_helpers import CHART_DIR, RELEASE_NAME, RELEASE_NAMESPACE, Rendered, nondefault_values


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm_python.Chart):
    """Render the chart with the given values (None: defaults)."""

    def _render(
        values: dict[str, Any] | None = None,
        *,
        name: str = RELEASE_NAME,
        namespace: str = RELEASE_NAMESPACE,
    ) -> Rendered:
        return Rendered(chart.render(values, name=name, namespace=namespace, is_install=True))

    return _render


@pytest.fixture(scope="session")
def default_render(render) -> Rendered:
    return render(None)


@pytest.fixture(scope="session")
def nondefault_render(render) -> Rendered:
    return render(nondefault_values())


@pytest.fixture(scope="session", params=["default", "nondefault"])
def any_render(request, default_render: Rendered, nondefault_render: Rendered) -> Rendered:
    """Each test using this runs once on the default and once on the non-default render."""
    return default_render if request.param == "default" else nondefault_render
