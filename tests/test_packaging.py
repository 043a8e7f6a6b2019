"""Packaging facts users rely on: one version source, and PEP 561's marker shipped with the package."""

from __future__ import annotations

import re
from pathlib import Path

import ssl_lightning

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def test_the_version_comes_from_pyproject() -> None:
    declared = re.search(r'^version = "([^"]+)"', PYPROJECT, re.MULTILINE)
    assert declared is not None and ssl_lightning.__version__ == declared.group(1)
    init = (ROOT / "ssl_lightning" / "__init__.py").read_text()
    assert re.search(r'__version__ = "\d+\.\d+', init) is None  # no second, hand-kept release number


def test_the_package_is_typed_for_its_users() -> None:
    assert (Path(ssl_lightning.__file__).parent / "py.typed").is_file()
    assert re.search(r'^ssl_lightning = \["py.typed"\]', PYPROJECT, re.MULTILINE)
