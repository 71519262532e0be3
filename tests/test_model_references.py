"""Bring your own torch network without editing the package: --model package.module:factory,
--model path/to/file.py:factory, and plugin packages' entry points (group lpcv_depth.models), through
every stage that takes --model; ptq refuses a model whose defining file changed since export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lpcv_depth.cli import main
from lpcv_depth.manifest import read_manifest, sha256_file
from lpcv_depth.models import get_spec, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]

# A depth network the project did not write: two convolutions, random weights, a 64x64 input.
TINY_NET = '''
import torch
from torch import nn

from lpcv_depth.models import ModelSpec

CALLS = []


class TinyDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(torch.relu(self.features(x))))


def {factory}():
    CALLS.append(1)
    return ModelSpec(name="{name}", build=TinyDepth, load_weights=lambda model, path: None,
                     native_input_size=(64, 64), patch_multiple=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     native_output="depth", license="MIT", weight_source="random only", default_weights=None,
                     description="a tiny test network")
'''


def write_net(path: Path, name: str = "tiny_user_net", factory: str = "tiny_spec", extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TINY_NET.format(name=name, factory=factory) + textwrap.dedent(extra))
    return path


def export_args(model: str, *more: str) -> list[str]:
    return ["export", "--model", model, "--weights", "None", "--num-check-images", "1", *more]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A current folder (and workspace) that is neither the repo nor the model file's folder."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("LPCV_DEPTH_WORKSPACE", raising=False)
    return folder


def test_a_file_reference_exports_from_another_folder(tmp_path, elsewhere):
    net = write_net(tmp_path / "team" / "net.py")
    assert main(export_args("../team/net.py:tiny_spec")) == 0
    out = elsewhere / "build" / "tiny_user_net" / "export"  # the spec's name, not the reference's path
    manifest = read_manifest(out)
    reference = f"{net.resolve()}:tiny_spec"
    assert manifest["config"]["model"] == reference, "recorded so that it rebuilds from any folder"
    assert manifest["inputs"]["model"] == {"reference": reference, "kind": "file", "name": "tiny_user_net",
                                           "files": {str(net.resolve()): sha256_file(net)}, "distribution": None}
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["lpcv.model"] == "tiny_user_net"
    assert manifest["results"]["model"]["model"] == "tiny_user_net"


def test_a_module_reference_exports(tmp_path, elsewhere, monkeypatch):
    package = tmp_path / "site" / "team_nets_pkg"
    write_net(package / "nets.py", name="tiny_module_net", factory="make")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "team_nets_pkg", raising=False)
    try:
        assert main(export_args("team_nets_pkg.nets:make", "--out", "out")) == 0
    finally:
        for name in ("team_nets_pkg", "team_nets_pkg.nets"):
            sys.modules.pop(name, None)
    record = read_manifest(elsewhere / "out")["inputs"]["model"]
    assert record["reference"] == "team_nets_pkg.nets:make" and record["kind"] == "module"
    assert record["files"] == {str(package / "nets.py"): sha256_file(package / "nets.py")}


def test_every_stage_takes_a_reference_and_names_folders_after_the_spec(tmp_path, elsewhere):
    from lpcv_depth.stages.evaluate import EvaluateConfig
    from lpcv_depth.stages.export import ExportConfig
    from lpcv_depth.stages.pipeline import RunConfig
    from lpcv_depth.stages.search import SearchConfig

    net = write_net(tmp_path / "team" / "net.py")
    relative, reference = "../team/net.py:tiny_spec", f"{net.resolve()}:tiny_spec"
    (elsewhere / "calib").mkdir()
    (elsewhere / "rgbd").mkdir()
    configs = {
        "export": ExportConfig(model=relative, weights=None),
        "evaluate": EvaluateConfig(model=relative, weights=None, data=Path("rgbd")),
        "run": RunConfig(model=relative, weights=None, calib=Path("calib")),
        "search": SearchConfig(model=relative, weights=None, calib=Path("calib"), eval_data=Path("rgbd")),
    }
    for stage, config in configs.items():
        assert config.model == reference, stage
    build = elsewhere / "build"
    assert configs["export"].destination == build / "tiny_user_net" / "export"
    assert configs["evaluate"].destination == build / "eval" / "tiny_user_net"
    assert configs["run"].destination == build / "tiny_user_net"
    assert configs["search"].destination == build / "tiny_user_net" / "search"
    assert configs["search"].sizes == ((64, 64),)


def test_a_reference_loads_once_and_again_when_its_file_changes(tmp_path):
    net = write_net(tmp_path / "net.py", name="tiny_cached_net")
    reference = f"{net}:tiny_spec"
    first = resolve_model(reference)
    assert resolve_model(reference) is first and get_spec(reference) is first.spec
    assert len(sys.modules[first.spec.build.__module__].CALLS) == 1, "the factory runs once per process"
    net.write_text(net.read_text() + "\n# edited\n")
    again = resolve_model(reference)
    assert again.spec is not first.spec and again.source.files[str(net)] == sha256_file(net)


def test_two_copies_of_one_file_are_two_models(tmp_path):
    first, second = write_net(tmp_path / "a" / "net.py"), write_net(tmp_path / "b" / "net.py")
    for net in (first, second):
        assert list(resolve_model(f"{net}:tiny_spec").source.files) == [str(net)], "each records its own file"


def test_run_redoes_the_export_when_the_file_changes(tmp_path):
    from lpcv_depth.cache import stage_fingerprint
    from lpcv_depth.stages.export import ExportConfig

    net = write_net(tmp_path / "net.py", name="tiny_fingerprint_net")
    config = ExportConfig(model=f"{net}:tiny_spec", weights=None, out=tmp_path / "out")
    before = stage_fingerprint("export", config, {})
    assert stage_fingerprint("export", config, {}) == before
    net.write_text(net.read_text() + "\n# edited\n")
    assert stage_fingerprint("export", config, {}) != before


# --- plugin packages ---------------------------------------------------------------------------------

def _install_plugin(site: Path, dist: str, package: str, entry_points: str, code: str) -> None:
    """What pip leaves in site-packages, enough for importlib.metadata: the package and its dist-info."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lpcv_depth.models]\n{entry_points}\n")


@pytest.fixture
def plugin_site(tmp_path) -> Path:
    site = tmp_path / "site"
    _install_plugin(site, "team-depth-plugin", "team_depth_plugin", "plugin_net = team_depth_plugin:plugin_net_spec",
                    TINY_NET.format(name="plugin_net", factory="plugin_net_spec"))
    _install_plugin(site, "broken-depth-plugin", "broken_depth_plugin", "broken_net = broken_depth_plugin:spec",
                    "import a_module_nobody_installed\n")
    _install_plugin(site, "shadow-depth-plugin", "shadow_depth_plugin", "fastdepth = shadow_depth_plugin:spec",
                    "raise AssertionError('a plugin hidden by a built-in model is never imported')\n")
    return site


def _cli(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("LPCV_DEPTH_WORKSPACE", None)
    return subprocess.run([sys.executable, "-m", "lpcv_depth.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_plugin_package_is_listed_and_exports(plugin_site, tmp_path):
    listed = _cli(plugin_site, tmp_path, "export", "--list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "entry point of team-depth-plugin 0.1" in rows["plugin_net"]
    assert "built-in" in rows["fastdepth"], "a broken plugin does not hide the built-in models"
    assert "broken-depth-plugin" in listed.stderr and "a_module_nobody_installed" in listed.stderr
    assert "fix:" in listed.stderr and "pip uninstall broken-depth-plugin" in listed.stderr
    assert "shadow-depth-plugin 0.1's model 'fastdepth' is hidden by another model of that name (built-in)" \
        in listed.stderr

    exported = _cli(plugin_site, tmp_path, *export_args("plugin_net"))
    assert exported.returncode == 0, exported.stderr
    manifest = read_manifest(tmp_path / "build" / "plugin_net" / "export")
    record = manifest["inputs"]["model"]
    assert manifest["config"]["model"] == "plugin_net"
    assert record["kind"] == "entry point" and record["distribution"] == "team-depth-plugin 0.1"
    assert list(record["files"]) == [str(plugin_site / "team_depth_plugin" / "__init__.py")]

    broken = _cli(plugin_site, tmp_path, *export_args("broken_net"))
    assert broken.returncode == 2
    assert "plugin broken-depth-plugin 0.1" in broken.stderr and "fix:" in broken.stderr


def test_built_in_models_never_load_plugins(monkeypatch):
    from lpcv_depth.models import sources

    def no_plugins(name=None):
        raise AssertionError("entry points read for a built-in model")

    monkeypatch.setattr(sources, "_entry_points", no_plugins)
    assert get_spec("fastdepth").name == "fastdepth"


# --- ptq rebuilds the exported network, or refuses -------------------------------------------------------

@pytest.fixture
def file_export(tmp_path):
    from lpcv_depth.stages.export import ExportConfig, run_export

    net = write_net(tmp_path / "team" / "net.py", name="tiny_ptq_net")
    out = tmp_path / "export"
    run_export(ExportConfig(model=f"{net}:tiny_spec", weights=None, num_check_images=1, out=out))
    return net, out


def test_ptq_rebuilds_the_exported_network(file_export):
    from lpcv_depth.results import ExportResults
    from lpcv_depth.manifest import Manifest
    from lpcv_depth.stages.ptq import rebuild_fp32_model

    net, export = file_export
    manifest = Manifest.read(export, stage="export")
    model = rebuild_fp32_model(manifest, manifest.results_as(ExportResults))
    assert model.spec.name == "tiny_ptq_net" and tuple(model.input_size) == (64, 64)


@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_ptq_refuses_when_the_defining_file_changed(file_export, change, tmp_path, capsys):
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    from tests.conftest import shared_path

    net, export = file_export
    if change == "edited":
        net.write_text(net.read_text().replace("padding=1", "padding=2"))
    else:
        net.unlink()
    calib = shared_path("data", "calibration_indoor")
    code = main(["ptq", "--fp32", str(export), "--calib", str(calib), "--num-calib", "8", "--holdout", "2",
                 "--min-calib", "8", "--out", str(tmp_path / "ptq")])
    err = capsys.readouterr().err
    assert code == 2 and "fix:" in err and not (tmp_path / "ptq").exists()
    assert f"{net}, which defines model 'tiny_ptq_net', " in err
    assert ("changed since export" if change == "edited" else "is gone since export") in err
    assert "compute-encodings" not in err, "refused before calibration"
    assert "re-export the model" in err and ("restore the file" in err)


def test_hub_finds_the_reference_behind_a_ptq_or_htp_check_folder(file_export, tmp_path):
    from lpcv_depth.stages.hub_artifacts import exported_model

    net, export = file_export
    ptq, htp = tmp_path / "ptq", tmp_path / "htp"
    for folder, manifest in ((ptq, {"stage": "ptq", "inputs": {"export_manifest": {"path": str(export / "manifest.json")}}}),
                             (htp, {"stage": "htp-check", "config": {"ptq": str(ptq / "model_qdq.onnx")}})):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    for folder in (export, ptq, htp):
        assert exported_model(folder) == f"{net}:tiny_spec"
    assert get_spec(exported_model(htp)).name == "tiny_ptq_net"
    assert exported_model(tmp_path) is None


# --- what a bad reference says ----------------------------------------------------------------------

BAD_FILES = {
    "boom.py": "def boom():\n    raise RuntimeError('kaboom')\n",
    "wrong.py": "def wrong():\n    return {'name': 'not a spec'}\n",
    "broken.py": "import a_module_nobody_installed\n",
    "typo.py": "def spec(:\n",
    "constant.py": "SPEC = 3\n",
}


@pytest.mark.parametrize("model,expected", [
    ("no/such/net.py:make", "file {tmp}/elsewhere/no/such/net.py not found"),
    ("no_such_team_pkg.nets:make", "no module named 'no_such_team_pkg'"),
    ("team/net.py:no_factory", "has no 'no_factory'"),
    ("team/net.py:bad name", "'bad name' is not the name of a function"),
    ("team/net.py", "names a file but not the factory in it"),
    ("team/boom.py:boom", "boom() raised RuntimeError: kaboom"),
    ("team/wrong.py:wrong", "wrong() returned a dict, not a ModelSpec"),
    ("team/broken.py:spec", "failed: ModuleNotFoundError: No module named 'a_module_nobody_installed'"),
    ("team/typo.py:spec", "failed: SyntaxError"),
    ("team/constant.py:SPEC", "SPEC in {tmp}/elsewhere/team/constant.py is a int, not a function"),
    ("team/taken.py:tiny_spec", "makes a model named 'fastdepth', which is already the name of the built-in model"),
])
def test_bad_references_exit_2_with_a_fix(model, expected, tmp_path, elsewhere, capsys):
    team = elsewhere / "team"
    write_net(team / "net.py")
    write_net(team / "taken.py", name="fastdepth")
    for name, code in BAD_FILES.items():
        (team / name).write_text(code)
    assert main(export_args(model, "--out", "out")) == 2
    err = capsys.readouterr().err
    assert expected.format(tmp=tmp_path) in err and "\n  fix: " in err
    assert not (elsewhere / "out").exists()
