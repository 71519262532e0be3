"""Where a stage reads its defaults and writes its outputs: the workspace, never the source tree.

The workspace is `--workspace DIR`, else `$LPCV_DEPTH_WORKSPACE`, else the current directory.
Outputs go under `<workspace>/build/`, and relative default paths (the shipped `calibration_data/`,
a model's declared default weights) are looked up in the workspace, so an installed copy of
lpcv-depth behaves the same from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from lpcv_depth.errors import ConfigError

__all__ = ["ENV_VAR", "workspace_root", "build_dir", "in_workspace", "use_workspace", "check_workspace",
           "where_to_write_hint"]

ENV_VAR = "LPCV_DEPTH_WORKSPACE"
BUILD = "build"
# Set when the CLI's --workspace chose the workspace (it passes it on through ENV_VAR): messages
# then name the flag, not the variable the user never set.
_from_flag = {"value": False}


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
    _from_flag["value"] = True
    return root


def _origin() -> str:
    configured = os.environ.get(ENV_VAR)
    if not configured:
        return "the current folder"
    return f"--workspace {configured}" if _from_flag["value"] else f"${ENV_VAR}={configured}"


def check_workspace() -> None:
    """A workspace that is not a folder fails here, naming where it came from."""
    root = workspace_root()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"the workspace {root} (from {_origin()}) is not a folder",
                          hint=f"point {'--workspace' if _from_flag['value'] else '$' + ENV_VAR} at a folder, "
                               f"or unset {ENV_VAR} to work in the current folder")


def where_to_write_hint() -> str:
    """The fix for an output location that cannot be written: what to change, naming the workspace's origin."""
    return (f"choose a writable location with --out, or a writable workspace (now {workspace_root()}, from "
            f"{_origin()}) with --workspace DIR or ${ENV_VAR}")
