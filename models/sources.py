"""Where a model comes from: built into the package, a plugin package's entry point, or a factory
reference given to --model (`package.module:factory`, `path/to/file.py:factory`).

Every stage turns its --model value into a ModelSpec through `resolve_model` (`get_spec` calls it),
so a model from any of these places works on every stage without the stage knowing. A factory is
called with no arguments and returns a ModelSpec. A plugin package declares one entry point per
model in the group `lpcv_depth.models`, named after the model, whose value is such a factory:

    [project.entry-points."lpcv_depth.models"]
    my_net = "my_package.models:my_net_spec"

Entry points are read only when a name is not registered already (and for `export --list`), so a
broken plugin never stands in the way of the built-in models.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from lpcv_depth.errors import ConfigError, UnknownModelError
from lpcv_depth.manifest import sha256_file
from lpcv_depth.models.registry import _REGISTRY, ModelSpec

__all__ = ["ENTRY_POINT_GROUP", "ModelSource", "ResolvedModel", "resolve_model", "model_sources",
           "is_reference", "check_model_files"]

ENTRY_POINT_GROUP = "lpcv_depth.models"
BUILT_IN_PACKAGE = "lpcv_depth.models"
# Kinds whose defining files must be unchanged when a later stage rebuilds the model: the package's
# own models change only with lpcv-depth itself, whose version and commit every manifest records.
CHECKED_KINDS = ("file", "module", "entry point")
DOCS = "docs/models.md, 'Bring your own model'"
FACTORY_HINT = (f"the factory is called with no arguments and must return lpcv_depth.models.ModelSpec(...) "
                f"({DOCS})")


@dataclass(frozen=True)
class ModelSource:
    """Where a model was found, recorded in the export manifest so that later stages rebuild the same one.

    reference: the --model value that finds it again from any folder: a registered name, or a factory
               reference with the file path made absolute.
    files:     each file that defines the model (the factory's, then the backbone's) -> its sha256.
    """

    reference: str
    kind: str  # "built-in", "registered", "entry point", "module" or "file"
    name: str
    files: dict[str, str] = field(default_factory=dict)
    distribution: str | None = None

    def describe(self) -> str:
        if self.kind == "entry point":
            return f"entry point of {self.distribution}"
        if self.kind in ("module", "file"):
            return f"{self.kind} {self.reference}"
        return self.kind

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    source: ModelSource


# Registered models (built-in, or a plugin's once loaded) -> where they came from.
_ORIGINS: dict[str, ModelSource] = {}
# (reference, sha256 of its file) -> the model it made: a reference loads once per process.
_LOADED: dict[tuple[str, str], ResolvedModel] = {}
# A module reference's module -> the sha256 of its file when it was imported (a change is re-imported).
_IMPORTED: dict[str, str] = {}


def is_reference(value: str) -> bool:
    """Whether a --model value names a factory (`module:factory`, `file.py:factory`) rather than a model."""
    return ":" in value


def resolve_model(value: str) -> ResolvedModel:
    """The model a --model value names: a registered name, a factory reference, or an entry point."""
    if value in _REGISTRY:
        spec = _REGISTRY[value]
        return ResolvedModel(spec, _ORIGINS.get(value) or _registered_source(spec))
    if is_reference(value):
        return _resolve_reference(value)
    if value.endswith(".py") or "/" in value or os.sep in value:
        raise ConfigError(f"--model {value} names a file but not the factory in it",
                          hint=f"add the function's name: --model {value}:FACTORY; {FACTORY_HINT}")
    plugin = _entry_points(value)
    if plugin:
        return _load_entry_point(value, plugin)
    known = sorted({*_REGISTRY, *(ep.name for ep in _entry_points())})
    raise UnknownModelError(
        f"unknown model {value!r}; registered models: {', '.join(known)}",
        hint="pick one of the registered names, pass your own network as --model package.module:factory or "
             f"--model path/to/file.py:factory, or install a plugin package that provides it ({DOCS})")


def model_sources() -> tuple[list[tuple[ModelSpec, ModelSource]], list[str]]:
    """Every registered model and every plugin's, loaded, with where each comes from; and one message
    (with its fix) per plugin that cannot be loaded, which does not stop the others."""
    problems = []
    for entry_point in _entry_points():
        if entry_point.name in _REGISTRY:
            owner = resolve_model(entry_point.name).source
            if owner.kind != "entry point" or owner.distribution != _distribution(entry_point):
                problems.append(f"plugin {_distribution(entry_point)}'s model {entry_point.name!r} is hidden by "
                                f"another model of that name ({owner.describe()})\n  fix: rename the entry point "
                                f"and the name of the ModelSpec its factory returns")
            continue
        try:
            _load_entry_point(entry_point.name, [entry_point])
        except ConfigError as err:
            problems.append(str(err))
    listed = [(spec, resolve_model(name).source) for name, spec in sorted(_REGISTRY.items())]
    return listed, problems


def check_model_files(record: dict | None, redo: str) -> None:
    """A model's defining files, as the export manifest recorded them, still the same: otherwise a
    later stage would rebuild another network than the exported one."""
    if not record or record.get("kind") not in CHECKED_KINDS:
        return
    for path, sha256 in record.get("files", {}).items():
        if not Path(path).is_file():
            raise ConfigError(f"{path}, which defines model {record.get('name')!r}, is gone since export",
                              hint=f"restore the file, or re-export the model with the options used before "
                                   f"({redo} ...)")
        if sha256_file(path) != sha256:
            raise ConfigError(f"{path}, which defines model {record.get('name')!r}, changed since export "
                              "(sha256 differs)",
                              hint=f"restore the file as it was exported, or re-export the model from it with the "
                                   f"options used before ({redo} ...), so that every stage uses the same network")


# --- factory references --------------------------------------------------------------------------

def _resolve_reference(value: str) -> ResolvedModel:
    target, _, attribute = value.rpartition(":")
    if not attribute or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(f"--model {value}: {attribute!r} is not the name of a function",
                          hint="write --model package.module:factory or --model path/to/file.py:factory")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return _from_file(Path(target).expanduser(), attribute, value)
    if not target or not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"--model {value}: {target!r} is neither a module name nor a .py file",
                          hint="write --model package.module:factory or --model path/to/file.py:factory")
    return _from_module(target, attribute, value)


def _from_file(path: Path, attribute: str, value: str) -> ResolvedModel:
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise ConfigError(f"--model {value}: file {path} not found",
                          hint=f"pass an existing .py file, absolute or relative to the current folder ({Path.cwd()})")
    reference = f"{os.fspath(path)}:{attribute}"
    sha256 = sha256_file(path)
    if (reference, sha256) in _LOADED:
        return _LOADED[(reference, sha256)]
    # One module per file and content: an edited file loads anew, an unchanged one is never run twice.
    module_name = "_lpcv_depth_user_model_" + hashlib.sha256(f"{path}\0{sha256}".encode()).hexdigest()[:16]
    module = sys.modules.get(module_name)
    if module is None:
        # Its own folder is importable, as for `python file.py`, so it can import its neighbours.
        if os.fspath(path.parent) not in sys.path:
            sys.path.append(os.fspath(path.parent))
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise _import_failed(value, os.fspath(path), err) from None
    resolved = _call_factory(module, attribute, value, reference, "file")
    _LOADED[(reference, sha256)] = resolved
    return resolved


def _from_module(module_name: str, attribute: str, value: str) -> ResolvedModel:
    origin = _module_file(module_name, value)
    sha256 = sha256_file(origin) if origin else ""
    if (value, sha256) in _LOADED:
        return _LOADED[(value, sha256)]
    try:
        module = importlib.import_module(module_name)
        if _IMPORTED.get(module_name, sha256) != sha256:
            module = importlib.reload(module)
    except Exception as err:
        raise _import_failed(value, origin or module_name, err) from None
    _IMPORTED[module_name] = sha256
    resolved = _call_factory(module, attribute, value, value, "module")
    _LOADED[(value, sha256)] = resolved
    return resolved


def _module_file(module_name: str, value: str) -> str | None:
    try:
        found = importlib.util.find_spec(module_name)
    except ModuleNotFoundError as err:  # a parent package is missing
        found, missing = None, err.name
    except Exception as err:  # a parent package's __init__ failed
        raise _import_failed(value, module_name, err) from None
    else:
        missing = module_name
    if found is None:
        raise ConfigError(f"--model {value}: no module named {missing!r} on the Python path",
                          hint="install the package that holds it, or add its folder to PYTHONPATH; a file is "
                               "named by its path: --model path/to/file.py:factory")
    return found.origin if found.has_location else None


def _call_factory(module, attribute: str, value: str, reference: str, kind: str,
                  distribution: str | None = None) -> ResolvedModel:
    where = getattr(module, "__file__", None) or module.__name__
    try:
        factory = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        public = sorted(name for name, item in vars(module).items()
                        if inspect.isfunction(item) and not name.startswith("_") and item.__module__ == module.__name__)
        raise ConfigError(f"--model {value}: {where} has no {attribute!r}",
                          hint=f"name a function defined there ({', '.join(public) or 'it defines none'}); "
                               f"{FACTORY_HINT}") from None
    if isinstance(factory, ModelSpec) or not callable(factory):
        raise ConfigError(f"--model {value}: {attribute} in {where} is a {type(factory).__name__}, not a function",
                          hint=f"define def {attribute.split('.')[-1]}(): return ModelSpec(...); {FACTORY_HINT}")
    try:
        spec = factory()
    except Exception as err:
        raise ConfigError(f"--model {value}: {attribute}() raised {type(err).__name__}: {_message(err)}"
                          f"{_innermost_line(err)}", hint=f"fix {attribute} in {where}; {FACTORY_HINT}") from None
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"--model {value}: {attribute}() returned a {type(spec).__name__}, not a ModelSpec",
                          hint=f"return the ModelSpec itself from {attribute} in {where}; {FACTORY_HINT}")
    registered = _REGISTRY.get(spec.name)
    if registered is not None and registered is not spec:
        raise ConfigError(f"--model {value} makes a model named {spec.name!r}, which is already the name of the "
                          f"{resolve_model(spec.name).source.describe()} model",
                          hint="give your ModelSpec a name of its own: it names the output folders (build/<name>/)")
    return ResolvedModel(spec, ModelSource(reference=reference, kind=kind, name=spec.name,
                                           files=_defining_files(module, spec), distribution=distribution))


def _defining_files(module, spec: ModelSpec) -> dict[str, str]:
    """The factory's file, then the file of the backbone's class, where that is another."""
    build = spec.build
    while isinstance(build, functools.partial):
        build = build.func
    files = []
    for item in (module, inspect.getmodule(build)):
        path = getattr(item, "__file__", None)
        if path and Path(path).is_file() and os.path.abspath(path) not in files:
            files.append(os.path.abspath(path))
    return {path: sha256_file(path) for path in files}


def _registered_source(spec: ModelSpec) -> ModelSource:
    """A model registered by a register_model call: the package's own, or the caller's."""
    module = inspect.getmodule(spec.build.func if isinstance(spec.build, functools.partial) else spec.build)
    built_in = module is not None and module.__name__.startswith(BUILT_IN_PACKAGE + ".")
    source = ModelSource(reference=spec.name, kind="built-in" if built_in else "registered", name=spec.name,
                         files=_defining_files(module, spec) if module is not None else {})
    _ORIGINS[spec.name] = source
    return source


def _import_failed(value: str, where: str, err: Exception) -> ConfigError:
    missing = getattr(err, "name", None) if isinstance(err, ImportError) else None
    return ConfigError(f"--model {value}: importing {where} failed: {type(err).__name__}: {_message(err)}"
                       f"{_innermost_line(err)}",
                       hint=f"install {missing!r}, which {where} imports" if missing else f"fix the error in {where}")


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, ConfigError) and err.args else str(err)


def _innermost_line(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


# --- entry points ---------------------------------------------------------------------------------

def _entry_points(name: str | None = None) -> list:
    found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def _distribution(entry_point) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else f"'{entry_point.value}'"


def _load_entry_point(name: str, candidates: list) -> ResolvedModel:
    if name in _REGISTRY:
        return resolve_model(name)
    if len(candidates) > 1:
        raise ConfigError(f"model {name!r} is provided by several plugins: "
                          f"{', '.join(_distribution(ep) for ep in candidates)}",
                          hint="uninstall all but one of them (pip uninstall NAME)")
    entry_point = candidates[0]
    plugin = f"plugin {_distribution(entry_point)} (entry point {entry_point.name} = {entry_point.value})"
    fix = f"fix the plugin, or uninstall it (pip uninstall {getattr(entry_point.dist, 'name', 'NAME')})"
    if not entry_point.attr:
        raise ConfigError(f"{plugin} names a module, not a factory in it",
                          hint=f"{fix}; its value must be package.module:factory")
    try:
        module = importlib.import_module(entry_point.module)
        resolved = _call_factory(module, entry_point.attr, entry_point.value, entry_point.value, "entry point",
                                 distribution=_distribution(entry_point))
    except ConfigError as err:
        raise ConfigError(f"{plugin} cannot be loaded: {_message(err)}", hint=f"{fix}; {err.hint}") from None
    except Exception as err:
        raise ConfigError(f"{plugin} cannot be loaded: importing {entry_point.module} failed: "
                          f"{type(err).__name__}: {err}{_innermost_line(err)}", hint=fix) from None
    if resolved.spec.name != name:
        raise ConfigError(f"{plugin} makes a model named {resolved.spec.name!r}, not {name!r}",
                          hint=f"{fix}; name the entry point after the model: {resolved.spec.name} = "
                               f"{entry_point.value}")
    _REGISTRY[name] = resolved.spec
    source = ModelSource(reference=name, kind="entry point", name=name, files=resolved.source.files,
                         distribution=resolved.source.distribution)
    _ORIGINS[name] = source
    return ResolvedModel(resolved.spec, source)
