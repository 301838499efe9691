"""pyproject.toml's metadata in the form current setuptools wants (issue 12)."""

from __future__ import annotations

import re
import tomllib

from tests.deploy_support import ROOT


def test_license_is_an_spdx_expression_built_by_a_setuptools_that_knows_it() -> None:
    """`license = { text = ... }` is deprecated (builds fail from 2027-02-18); the SPDX
    string needs setuptools 77 or later, and an upper bound keeps an untested major out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    lower = re.search(r">=\s*(\d+)", setuptools)
    upper = re.search(r"<\s*(\d+)", setuptools)
    assert lower is not None and int(lower.group(1)) >= 77, setuptools
    assert upper is not None and int(upper.group(1)) > int(lower.group(1)), setuptools


def test_the_chat_page_ships_in_the_package() -> None:
    """An installed gateway (not only a source checkout) serves the page: index.html is
    package data of gateway.web, beside the module that reads it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "index.html" in project["tool"]["setuptools"]["package-data"]["gateway.web"]
    assert (ROOT / "gateway" / "web" / "index.html").is_file()
