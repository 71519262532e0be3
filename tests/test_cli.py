"""The CLI is generated from the stage configs: every flag round-trips to its config field."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import pytest

from lpcv_depth import cli
from lpcv_depth.errors import ExitCode
from lpcv_depth.options import cli_fields, config_from_args, config_to_argv, field_default, flag_name
from tests.conftest import REPO_ROOT


def _changed_value(config, field: dataclasses.Field, spec, tmp_path: Path):
    """A valid value for `field` that differs from the config's current one."""
    current = getattr(config, field.name)
    hint = typing.get_type_hints(type(config))[field.name]
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if spec.choices:
        if spec.repeatable:
            return tuple(spec.choices[:2])
        return next(c for c in spec.choices if c != current)
    if base is bool:
        return not current
    if base is int:
        return (current or 1) + 1
    if base is float:
        return (current or 0.5) * 1.5
    if base is Path:
        folder = tmp_path / field.name
        folder.mkdir(exist_ok=True)
        return folder
    if typing.get_origin(base) is tuple and spec.repeatable:
        return ("a@example.com", "b@example.com")
    if typing.get_origin(base) is tuple:
        return (28, 42)
    return None


# Values a stage validates against the real world (a registered model, an existing folder).
STAGE_VALUES = {
    "export": {"model": "fastdepth", "weights": "default", "input_size": (224, 224), "check_images": None,
               "out": None, "output": "disparity", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
               "input_name": "x", "output_name": "y", "onnx": REPO_ROOT / "my_net.onnx"},
    "run": {"model": "fastdepth", "weights": "default", "input_size": (224, 224), "calib": None, "eval_data": None,
            "out": None, "ptq_args": "--holdout 4 --no-cle", "export_args": "--opset 18",
            "htp_check_args": "--no-fp16-baseline", "hub_args": "--no-profile", "qat": True, "qat_args": "--epochs 2", "preset": "w8a16",
            "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_name": "x", "output_name": "y",
            "onnx": REPO_ROOT / "my_net.onnx"},
    "search": {"model": "fastdepth", "weights": "default", "input_size": ((224, 224), (192, 256)), "calib": None,
               "eval_data": None, "out": None, "preset": ("w8a8", "w8a16"), "calibration_scheme": ("min-max",),
               "output_tail_bits": (8, 16), "ray_address": "127.0.0.1:6379", "ptq_args": "--holdout 4 --no-cle",
               "export_args": "--opset 18", "htp_check_args": "--fp16-baseline", "hub_args": "--no-profile",
               "qat": True, "qat_args": "--epochs 2", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_name": "x", "output_name": "y",
               "onnx": REPO_ROOT / "my_net.onnx"},
    # INPUT is positional: a word that starts with "-" must still come back as an input.
    "predict": {"input": (Path("a.jpg"), Path("-odd name.mp4")), "model": "fastdepth", "weights": "my.pth",
                "output": "disparity", "onnx": (Path("a.onnx"), Path("b.onnx")), "ptq": (Path("p1"), Path("p2")),
                "htp": (Path("p1"),), "predictions": (Path("saved"),), "soc_model": "43", "htp_arch": "73",
                "name": "mine", "out": None},
}


@pytest.mark.parametrize("stage", sorted(STAGE_VALUES))
def test_every_flag_round_trips_to_its_config_field(stage, tmp_path, calibration_dir, rgbd_dir):
    definition = cli.stage_definition(stage)
    fixed = {k: v for k, v in STAGE_VALUES[stage].items() if v is not None}
    fixed.update({"calib": calibration_dir, "eval_data": rgbd_dir, "check_images": calibration_dir,
                  "out": tmp_path / "out"})
    fields = cli_fields(definition.config)
    defaults = {f.name: field_default(f) for f, _ in fields}
    base = definition.config(**{k: fixed[k] for k in defaults if k in fixed})
    changes = {}
    for field, spec in fields:
        value = fixed[field.name] if field.name in fixed else _changed_value(base, field, spec, tmp_path)
        assert value is not None and value != defaults[field.name], f"{stage}: no changed test value for --{field.name}"
        changes[field.name] = value
    config = dataclasses.replace(base, **changes)

    argv = config_to_argv(config)
    parser = cli.build_parser(stage)
    parsed = config_from_args(definition.config, parser.parse_args(argv))
    assert parsed == config, f"{stage}: {argv}"
    help_text = parser.format_help()
    for field, spec in fields:
        # The flag is the field name (a positional's metavar), and so is the manifest's config key.
        assert (spec.metavar or field.name.upper() if spec.positional else flag_name(field.name)) in help_text
        assert field.name in config.as_dict()


@pytest.mark.parametrize("stage", ["evaluate", "ptq", "qat", "htp-check", "hub", "compare"])
def test_every_flag_round_trips_without_touching_the_disk(stage, tmp_path):
    """The stages whose configs check their input folders at construction: every option is given a
    non-default value, written as a command line, parsed back, and must come back unchanged."""
    definition = cli.stage_definition(stage)
    fields = cli_fields(definition.config)
    values = {}
    for field, spec in fields:
        current = field_default(field)
        probe = object.__new__(definition.config)
        object.__setattr__(probe, field.name, current)
        value = _changed_value(probe, field, spec, tmp_path)
        if value is None and typing.get_type_hints(definition.config)[field.name] in (str, str | None):
            value = f"value-of-{field.name}"
        assert value is not None and value != current, f"{stage}: no changed test value for --{field.name}"
        values[field.name] = value
    config = object.__new__(definition.config)
    for name, value in values.items():
        object.__setattr__(config, name, value)
    argv = config_to_argv(config)
    parsed = vars(cli.build_parser(stage).parse_args(argv))
    assert {name: parsed[name] if not isinstance(values[name], tuple) else tuple(parsed[name])
            for name in values} == values, argv


def test_every_subcommand_is_generated_and_documented():
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(cli.STAGE_MODULES)
    docs = Path(__file__).resolve().parents[1] / "docs"
    for name, sub in subcommands.choices.items():
        definition = cli.stage_definition(name)
        page = (docs / f"{name}.md").read_text()
        for field, spec in cli_fields(definition.config):
            word = (spec.metavar or field.name.upper()) if spec.positional else flag_name(field.name)
            assert word in page, f"docs/{name}.md does not document {word}"


def test_bad_flag_value_exits_2_with_the_reason(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["export", "--opset", "seventeen"])
    assert excinfo.value.code == 2
    assert "--opset" in capsys.readouterr().err


def test_config_error_exits_2_with_a_fix_line(capsys):
    status = cli.main(["export", "--model", "nope"])
    assert status == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "fix:" in err


def test_process_entry_points_freeze_the_collector_and_main_does_not(monkeypatch):
    import tomllib

    frozen = []
    monkeypatch.setattr(cli.gc, "freeze", lambda: frozen.append("freeze"))
    monkeypatch.setattr(cli, "run_command", lambda command, args: ExitCode.GATE_FAILED)
    assert cli.main(["export"]) == ExitCode.GATE_FAILED and frozen == []  # in-process callers go on
    monkeypatch.setattr(cli.sys, "argv", ["lpcv-depth", "export"])
    assert cli.console_main() == ExitCode.GATE_FAILED and frozen == ["freeze"]
    monkeypatch.setattr(cli, "hint_with_scripts", lambda: None)  # a process-wide setting of the hints
    monkeypatch.setattr(cli.sys, "argv", ["export/to_onnx.py"])
    assert cli.script_main("export", str(REPO_ROOT / "export" / "to_onnx.py")) == ExitCode.GATE_FAILED
    assert frozen == ["freeze", "freeze"]
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["lpcv-depth"] == "lpcv_depth.cli:console_main"


def test_exit_codes_are_distinct():
    values = [code.value for code in ExitCode]
    assert len(values) == len(set(values))
    assert ExitCode.GATE_FAILED != ExitCode.HUB_JOB_FAILED != ExitCode.HUB_TIMEOUT


def test_results_doc_is_generated_from_the_dataclasses():
    from lpcv_depth.results import schema_markdown

    page = Path(__file__).resolve().parents[1] / "docs" / "results.md"
    assert page.read_text() == schema_markdown(), "regenerate: python -m lpcv_depth.results > docs/results.md"


def test_typed_results_round_trip_through_manifest_json(tmp_path):
    from lpcv_depth import results as r
    from lpcv_depth.manifest import Manifest, write_manifest
    from lpcv_depth.schema import SchemaError, from_json, to_json

    ptq = r.PtqResults(
        model="fastdepth", preset="w8a8", techniques={"bn_fold": {"folded_pairs": 3}}, fp32_contract={},
        calibration_analyzers={"tf-enhanced": 54, "min-max": 19}, preparation={"traced": True},
        qdq_vs_aimet_sim={"sqnr_db": 31.0},
        int8_vs_fp32=r.Fidelity(sqnr_db=21.5, sqnr_db_scale_aligned=30.25, max_abs_diff=0.1, fscore_vs_fp32=99.5,
                                fscore_vs_fp32_per_image=[99.0, 100.0], holdout_images=2),
        sizes_bytes=r.PtqSizes(fp32_onnx=10, qdq_onnx=5, aimet_onnx=9, aimet_encodings=1),
        host_latency_ms=r.HostLatency(fp32=40.0, int8_qdq=60.0, runs=2, note="host"),
        ground_truth=r.GroundTruthPair(fp32={"fscore@0.1": 70.0}, int8={"fscore@0.1": float("nan")}, frames=5,
                                       skipped=0, fscore_drop=1.5))
    (tmp_path / "a.bin").write_bytes(b"x")
    write_manifest(tmp_path, stage="ptq", config={}, inputs={}, outputs=[tmp_path / "a.bin"], timings={},
                   results=ptq)
    back = Manifest.read(tmp_path, stage="ptq").results_as(r.PtqResults)
    assert back.int8_vs_fp32 == ptq.int8_vs_fp32 and back.sizes_bytes == ptq.sizes_bytes
    assert back.host_latency_ms == ptq.host_latency_ms and back.calibration_analyzers == ptq.calibration_analyzers
    import json
    import math
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["results"]["ground_truth"]["int8"]["fscore@0.1"] is None  # NaN is written as null...
    assert math.isnan(back.ground_truth.int8["fscore@0.1"])  # ...and read back as a missing number
    assert to_json(back)["int8_vs_fp32"] == to_json(ptq)["int8_vs_fp32"]
    with pytest.raises(SchemaError, match="unknown field"):
        from_json(r.PtqSizes, {**to_json(ptq.sizes_bytes), "extra": 1})
    with pytest.raises(SchemaError, match="expected int"):
        from_json(r.PtqSizes, {**to_json(ptq.sizes_bytes), "qdq_onnx": "5"})
