"""Reusing stage outputs: a stage is redone only when its config, or the content of what it reads, changed.

A stage's *fingerprint* is its config plus the content of its inputs: upstream stages by the sha256 of
their manifests (which pin their inputs' hashes in turn), the weights file or ONNX file, the files that
define a model given by factory reference and the photos by content, RGB-D data by file names, sizes and
modification times. A *record* keeps the fingerprint an output
was made from, and the sha256 of the manifest it got; the output is up to date while both still hold
and the manifest still verifies its files. `lpcv-depth run` and `lpcv-depth search` both reuse work
this way, so a file renamed or copied elsewhere is still recognised, and a file edited in place is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from lpcv_depth.errors import LpcvError
from lpcv_depth.files import write_text_atomically
from lpcv_depth.manifest import MANIFEST_NAME, Manifest, config_as_dict, sha256_file, sha256_of_files
from lpcv_depth.schema import to_json

__all__ = ["stage_fingerprint", "stage_record", "is_up_to_date", "read_records", "write_records"]


def stage_fingerprint(stage: str, stage_config: Any, upstream: Mapping[str, str]) -> str:
    """`upstream` maps each stage this one reads to the sha256 of that stage's manifest."""
    material: dict[str, Any] = {"stage": stage, "config": config_as_dict(stage_config), "upstream": dict(upstream)}
    weights = getattr(stage_config, "weights_file", None)
    if weights is not None and Path(weights).is_file():
        material["weights_sha256"] = sha256_file(weights)
    onnx = getattr(stage_config, "onnx", None)
    if onnx is not None and Path(onnx).is_file():  # export --onnx: the file (and its external data) by content
        from lpcv_depth.stages.export_onnx import source_hashes

        material["onnx_sha256"] = source_hashes(Path(onnx))
    model = getattr(stage_config, "model", None)
    if isinstance(model, str) and ":" in model:  # a factory reference: an edit to its file rebuilds the model
        from lpcv_depth.models import resolve_model

        material["model_files"] = resolve_model(model).source.files
    for name in ("calib", "check_images"):
        folder = getattr(stage_config, name, None)
        if folder is not None and Path(folder).is_dir():
            # export reads only the first few photos: other changes to the folder do not concern it.
            limit = getattr(stage_config, "num_check_images", None) if name == "check_images" else None
            material[f"{name}_sha256"] = _images_hash(Path(folder), limit)
    for name in ("eval_data", "data"):
        data = getattr(stage_config, name, None)
        if data is not None and Path(data).is_dir():
            material[name] = _tree_stamp(Path(data))
    return hashlib.sha256(json.dumps(to_json(material), sort_keys=True).encode()).hexdigest()


def stage_record(folder: Path, fingerprint: str) -> dict:
    return {"folder": os.fspath(folder), "fingerprint": fingerprint,
            "manifest_sha256": sha256_file(Path(folder) / MANIFEST_NAME)}


def is_up_to_date(record: Mapping | None, folder: Path, stage: str, fingerprint: str) -> bool:
    folder = Path(folder)
    if not record or record.get("fingerprint") != fingerprint or not (folder / MANIFEST_NAME).is_file():
        return False
    if sha256_file(folder / MANIFEST_NAME) != record.get("manifest_sha256"):
        return False  # rerun by hand since: its inputs are not the ones recorded here
    try:
        Manifest.read(folder, stage=stage)
    except LpcvError:
        return False
    return True


def read_records(path: Path, key: str = "stages") -> dict:
    """The records kept in a JSON state file; an unreadable file counts as none (everything is redone)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get(key, {})
    except (OSError, ValueError, AttributeError):
        return {}


def write_records(path: Path, records: Mapping, key: str = "stages") -> None:
    """The records under `key`, keeping whatever else the file holds (e.g. which command made it)."""
    try:
        content = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        content = {}
    if not isinstance(content, dict):
        content = {}
    write_text_atomically(path, json.dumps({**content, key: to_json(dict(records))}, indent=2) + "\n")


def _images_hash(folder: Path, limit: int | None = None) -> str:
    from lpcv_depth.images import list_images

    return sha256_of_files(list_images(folder)[:limit], folder)


def _tree_stamp(folder: Path) -> str:
    entries = sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
