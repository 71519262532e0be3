"""The versions lpcv-depth pins its tools to, read from its own installed metadata (pyproject.toml's
dependencies and extras), so that install hints and notes never drift from what pip installs."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import metadata

__all__ = ["pinned", "pinned_version"]

DISTRIBUTION = "lpcv-depth"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=None)
def _pins() -> dict[str, str]:
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # a source tree run without `pip install -e .`
        return {}
    pins = {}
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;,]+)", requirement)
        if match:
            pins[_normalized(match.group(1))] = match.group(2)
    return pins


def pinned_version(package: str) -> str | None:
    """The version lpcv-depth pins `package` to, or None when it pins none."""
    return _pins().get(_normalized(package))


def pinned(package: str) -> str:
    """`package==version` as lpcv-depth pins it (the bare name when it pins no version): for pip."""
    version = pinned_version(package)
    return f"{package}=={version}" if version else package
