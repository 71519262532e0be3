"""Where a stage reads its defaults and writes its outputs: the workspace, never the source tree.

The workspace is `--workspace DIR`, else `$LPCV_DEPTH_WORKSPACE`, else the current directory.
Outputs go under `<workspace>/build/`, and relative default paths (the shipped `calibration_data/`,
a model's declared default weights) are looked up in the workspace, so an installed copy of
lpcv-depth behaves the same from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "workspace_root", "build_dir", "in_workspace", "use_workspace"]

ENV_VAR = "LPCV_DEPTH_WORKSPACE"
BUILD = "build"


def workspace_root() -> Path:
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser() if configured else Path.cwd()


def build_dir(*parts: str) -> Path:
    """`<workspace>/build/<parts>`: the default home of every stage output."""
    return workspace_root().joinpath(BUILD, *parts)


def in_workspace(path: str | os.PathLike) -> Path:
    """A relative path taken from the workspace; an absolute one as it is."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else workspace_root() / path


def use_workspace(path: str | os.PathLike) -> Path:
    """Make `path` the workspace of this process (the CLI's --workspace)."""
    root = Path(path).expanduser().resolve()
    os.environ[ENV_VAR] = os.fspath(root)
    return root
