"""Any ONNX file in: `lpcv-depth export --onnx FILE [--wrap ...]`.

A user's graph is read (external data included), checked (one float NCHW input, one output, standard
ops only, opset 11 or newer), its dynamic axes fixed, brought to the export's opset, and then either
taken as it is (it already meets the Track 3 contract) or wrapped with the Track 3 pre- and
post-processing as ONNX ops, the same arithmetic as models/wrapper.py's Track3Wrapper:

    image (B,3,480,640) [0,255] -> (x - mean*255) / (std*255) -> bilinear resize to the native size
    -> the user's graph -> bilinear resize to 480x640 -> per-sample scaling (depth) or min-max and
    floor / (d + floor) (disparity) -> depth (B,1,480,640) in [0,1]

The result is simplified with onnxsim and verified like a torch export; the export folder's manifest
records the source file's sha256 (and its external data files'), so ptq can work from it alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError, ContractError
from lpcv_depth.manifest import read_manifest, sha256_file, write_manifest
from lpcv_depth.results import ExportResults
from lpcv_depth.stage import StageLog, StagingDir, display_path
from lpcv_depth.verify import OrtRunner, compare_outputs

__all__ = ["run_onnx_export", "parse_channels", "format_channels", "read_user_onnx", "adapt_to_contract",
           "source_hashes", "MIN_SOURCE_OPSET", "NATIVE_OUTPUTS", "onnx_model_name"]

MIN_SOURCE_OPSET = 11
NATIVE_OUTPUTS = ("depth", "disparity")
# What models/wrapper.py uses: the clamp floor of a depth map and of a per-sample maximum.
_EPS = 1e-6
_DISPARITY_FLOOR = 0.05
_STANDARD_DOMAINS = ("", "ai.onnx")
_WRAP = "lpcv_track3/"  # prefix of every name the wrapper adds, so none collides with the user's graph
# protobuf cannot serialise one message over 2 GB: bigger models keep their weights in external data.
_PROTO_LIMIT = 2 ** 31 - 1


def parse_channels(text: str) -> tuple[float, float, float]:
    """--mean/--std: three comma-separated numbers, R,G,B, for pixels scaled to [0,1]."""
    import argparse

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B like 0.485,0.456,0.406, got {text!r}")
    return values  # type: ignore[return-value]


def format_channels(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def onnx_model_name(path: str | os.PathLike) -> str:
    """The name an ONNX file's model goes by (its folder under build/, its manifests): the file's stem."""
    return Path(path).stem


@dataclass(frozen=True)
class _Source:
    """The user's file as read: the model, where it came from and what it hashes to."""

    model: object
    path: Path
    sha256: str
    opset: int
    external_data: dict[str, str]  # file name beside the .onnx -> sha256


def read_user_onnx(path: str | os.PathLike) -> _Source:
    """Load the file (and its external data), refusing what is not a readable standard ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--onnx {path}: no such file", hint="pass the path of your .onnx file")
    fix = "export the model again (a file cut short by a full disk or an interrupted copy cannot be read)"
    try:
        header = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: the bytes are not a whole ONNX model
        raise ConfigError(f"--onnx {path} cannot be read as an ONNX model (truncated or not ONNX): {err}",
                          hint=fix) from None
    external = _external_data_files(header)
    missing = [name for name in external if not (path.parent / name).is_file()]
    if missing:
        raise ConfigError(f"--onnx {path} keeps its weights in {', '.join(missing)}, which is not beside it",
                          hint="keep the external data files in the same folder as the .onnx file")
    try:
        model = onnx.load(os.fspath(path)) if external else header
        onnx.checker.check_model(os.fspath(path) if external else model)
    except Exception as err:
        raise ConfigError(f"--onnx {path} is not a valid ONNX model: {err}", hint=fix) from None
    if not model.graph.node:
        raise ConfigError(f"--onnx {path} has an empty graph", hint=fix)
    return _Source(model=model, path=path.resolve(), sha256=sha256_file(path), opset=_default_opset(model),
                   external_data={name: sha256_file(path.parent / name) for name in external})


def _external_data_files(model) -> list[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return sorted({ExternalDataInfo(t).location for t in _all_initializers(model) if uses_external_data(t)})


def source_hashes(path: Path) -> dict[str, str]:
    """sha256 of an ONNX file and of each external data file beside it that it names (unreadable: the file alone)."""
    import onnx

    hashes = {path.name: sha256_file(path)}
    try:
        header = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # a truncated file: export refuses it with its fix; its own hash is enough here
        return hashes
    for name in _external_data_files(header):
        if (path.parent / name).is_file():
            hashes[name] = sha256_file(path.parent / name)
    return hashes


def _all_initializers(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)


# --- selecting and checking the graph's input and output ------------------------------------------

def _graph_inputs(model) -> list:
    initializers = {init.name for init in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _pick(values: list, name: str | None, what: str, flag: str):
    names = [v.name for v in values]
    if name is not None:
        if name not in names:
            raise ConfigError(f"{flag} {name!r} is not one of the graph's {what}s {names}",
                              hint=f"pass {flag} with one of {names}")
        return next(v for v in values if v.name == name)
    if len(values) != 1:
        raise ConfigError(f"the graph has {len(values)} {what}s {names}; which one is the {what} to use?",
                          hint=f"pass {flag} NAME with one of {names}")
    return values[0]


def _dims(value) -> list[int | None]:
    """A value's shape, None for every dynamic (named or unknown) axis."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def _check_standard_ops(model) -> None:
    local = {f.domain for f in model.functions}
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in _STANDARD_DOMAINS and n.domain not in local})
    if custom:
        raise ConfigError(f"the graph uses custom-domain ops {custom}: ONNX Runtime, AIMET and the phone's NPU run "
                          "only standard ONNX ops",
                          hint="export the model with standard ONNX ops only (e.g. without custom symbolic "
                               "functions or contrib ops)")


def _check_input(value) -> None:
    import onnx

    elem = value.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise ConfigError(f"input {value.name!r} is {onnx.TensorProto.DataType.Name(elem)}, not float32",
                          hint="export the model with a float32 image input (cast inside the model if it needs "
                               "another type)")
    rank = len(value.type.tensor_type.shape.dim)
    if rank != 4:
        raise ConfigError(f"input {value.name!r} has rank {rank}; an image input is (batch, 3, height, width)",
                          hint="export the model with an NCHW image input of rank 4")
    channels = _dims(value)[1]
    if channels not in (None, 3):
        raise ConfigError(f"input {value.name!r} has {channels} channels; the Track 3 input is RGB",
                          hint="export the model with a 3-channel RGB input")


def _convert_opset(model, source_opset: int, target: int):
    """The graph at the export's opset; a newer graph is kept at its own (never converted down)."""
    from onnx import version_converter

    if source_opset < MIN_SOURCE_OPSET:
        raise ConfigError(f"the graph's opset is {source_opset}; opsets from {MIN_SOURCE_OPSET} up are supported",
                          hint=f"export the model again with opset {MIN_SOURCE_OPSET} or newer (17 recommended)")
    if source_opset >= target:
        return model, source_opset
    try:
        return version_converter.convert_version(model, target), target
    except Exception as err:
        raise ConfigError(f"the graph cannot be converted from opset {source_opset} to {target}: {err}",
                          hint=f"export the model again with opset {target}, or pass --opset {source_opset}") from None


# --- adapting the graph to the contract -----------------------------------------------------------

@dataclass(frozen=True)
class _Adapted:
    model: object
    opset: int
    native_input_size: tuple[int, int]
    wrapped: bool


def adapt_to_contract(source_model, source_opset: int, config) -> _Adapted:
    """The user's graph with one input and one output, its axes fixed, at the export's opset, and
    either wrapped (--wrap) or checked to be in the contract already."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(source_model)
    _check_standard_ops(model)
    graph_input = _pick(_graph_inputs(model), config.input_name, "input", "--input-name")
    graph_output = _pick(list(model.graph.output), config.output_name, "output", "--output-name")
    _check_input(graph_input)
    input_name, output_name = graph_input.name, graph_output.name
    for other in [o for o in model.graph.output if o.name != graph_output.name]:
        model.graph.output.remove(other)
    for other in [i for i in _graph_inputs(model) if i.name != graph_input.name]:
        raise ConfigError(f"the graph has a second input {other.name!r}; only the image input can be fed",
                          hint="export the model with the image as its only input")
    size = _native_size(graph_input, config) if config.wrap else (TRACK3.height, TRACK3.width)
    _set_shape(graph_input, [config.batch, 3, *size])
    # Shapes recorded for the old dynamic axes would contradict the fixed ones: let inference redo them.
    del model.graph.value_info[:]
    model, opset = _convert_opset(model, _default_opset(model), config.opset)
    if config.wrap:
        # A bare graph's own tensors may already be called `image` or `depth`: the wrapper's I/O needs those names.
        # (version_converter returns a new model: from here on, the names only.)
        renamed = {name: _WRAP + name for name in (TRACK3.input.name, TRACK3.output.name)}
        for old, new in renamed.items():
            _rename(model, old, new)
        _wrap(model, renamed.get(input_name, input_name), renamed.get(output_name, output_name), size, config, opset)
    else:
        _check_in_contract(model, model.graph.output[0])
        _rename(model, input_name, TRACK3.input.name)
        _rename(model, model.graph.output[0].name, TRACK3.output.name)
    _set_shape(model.graph.output[0], list(TRACK3.output.concrete_shape(config.batch)))
    return _Adapted(model=model, opset=opset, native_input_size=size, wrapped=config.wrap)


def _native_size(graph_input, config) -> tuple[int, int]:
    static = _dims(graph_input)[2:]
    if config.native_input_size is not None:
        wanted = tuple(config.native_input_size)
        if None not in static and tuple(static) != wanted:
            raise ConfigError(f"--native-input-size {wanted[0]}x{wanted[1]} but the graph's input is fixed at "
                              f"{static[0]}x{static[1]}",
                              hint=f"pass --native-input-size {static[0]}x{static[1]}, or leave it out")
        return wanted  # type: ignore[return-value]
    if None in static:
        raise ConfigError(f"input {graph_input.name!r} has a dynamic height or width; the wrapper needs the size "
                          "the model was trained at",
                          hint="pass --native-input-size HxW (e.g. 224x224)")
    return tuple(static)  # type: ignore[return-value]


def onnx_input_size(config) -> tuple[int, int]:
    """The size an export of `config` (an ExportConfig with --onnx) runs its graph at: the wrapped
    graph's own, else the contract's. Read from the file's header alone, before any export."""
    if not config.wrap:
        return TRACK3.height, TRACK3.width
    import onnx

    try:
        header = onnx.load(os.fspath(config.onnx), load_external_data=False)
    except Exception:  # noqa: BLE001 - missing or unreadable: read_user_onnx says which, with its fix
        header = read_user_onnx(config.onnx).model
    return _native_size(_pick(_graph_inputs(header), config.input_name, "input", "--input-name"), config)


def _check_in_contract(model, graph_output) -> None:
    """Without --wrap the graph must already take the contract's input; its outputs are checked on images."""
    from lpcv_depth.options import flag_name

    dims = _dims(_graph_inputs(model)[0])
    out_dims = _dims(graph_output)
    contract_size = [TRACK3.height, TRACK3.width]
    fits = all(d in (None, want) for d, want in zip(dims[2:], contract_size))
    out_fits = len(out_dims) == 4 and all(d in (None, want) for d, want in zip(out_dims[1:], [1, *contract_size]))
    if not (fits and out_fits):
        raise ConfigError(f"the graph ({dims} -> {out_dims}) is not in the Track 3 contract "
                          f"{list(TRACK3.input.shape)} [0,255] -> {list(TRACK3.output.shape)} [0,1]",
                          hint=f"pass {flag_name('wrap')} with --mean R,G,B --std R,G,B (and --native-output "
                               "disparity for a disparity model) to add the Track 3 pre- and post-processing")


def _set_shape(value, dims: list[int]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for size in dims:
        shape.dim.add().dim_value = int(size)


def _rename(model, old: str, new: str) -> None:
    if old == new:
        return
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.initializer):
        if value.name == old:
            value.name = new


class _Builder:
    """Adds wrapper nodes and constants to a graph, each named under the wrapper's prefix."""

    def __init__(self, graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list = []
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{_WRAP}{what}_{self.count}"

    def const(self, what: str, values, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(what)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        from onnx import helper

        output = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.name(op_type), **attributes))
        return output

    def resize(self, x: str, size: list[int], output: str | None = None) -> str:
        # F.interpolate(mode="bilinear", align_corners=False), as torch.onnx exports it.
        return self.op("Resize", [x, "", "", self.const("sizes", size, np.int64)], output, mode="linear",
                       coordinate_transformation_mode="pytorch_half_pixel", nearest_mode="floor",
                       cubic_coeff_a=-0.75)

    def reduce(self, op_type: str, x: str) -> str:
        """Per-sample reduction over (C,H,W), kept as (B,1,1,1); axes moved from attribute to input in opset 18."""
        if self.opset >= 18:
            return self.op(op_type, [x, self.const("axes", [1, 2, 3], np.int64)], keepdims=1)
        return self.op(op_type, [x], axes=[1, 2, 3], keepdims=1)

    def clamp_min(self, x: str, low: float) -> str:
        return self.op("Clip", [x, self.const("min", low)])

    def per_sample_scale(self, x: str, output: str | None = None) -> str:
        return self.op("Div", [x, self.clamp_min(self.reduce("ReduceMax", x), _EPS)], output)

    def per_sample_min_max(self, x: str, output: str | None = None) -> str:
        shifted = self.op("Sub", [x, self.reduce("ReduceMin", x)])
        return self.per_sample_scale(shifted, output)


def _wrap(model, input_name: str, output_name: str, size: tuple[int, int], config, opset: int) -> None:
    """Track3Wrapper.forward around the graph, op for op (see models/wrapper.py)."""
    from onnx import helper

    graph = model.graph
    graph_input = next(i for i in graph.input if i.name == input_name)
    graph.input.remove(graph_input)
    build = _Builder(graph, opset)
    mean = np.asarray(config.mean, np.float32).reshape(1, 3, 1, 1) * 255.0
    std = np.asarray(config.std, np.float32).reshape(1, 3, 1, 1) * 255.0
    normalised = build.op("Div", [build.op("Sub", [TRACK3.input.name, build.const("pixel_mean", mean)]),
                                  build.const("pixel_std", std)])
    if size != (TRACK3.height, TRACK3.width):
        build.resize(normalised, [config.batch, 3, *size], input_name)
    else:
        build.op("Identity", [normalised], input_name)
    pre = list(build.nodes)
    build.nodes.clear()

    graph_output = next(o for o in graph.output if o.name == output_name)
    raw = output_name
    rank = len(graph_output.type.tensor_type.shape.dim)
    if rank == 3:
        raw = build.op("Unsqueeze", [raw, build.const("axis", [1], np.int64)])
    elif rank != 4:
        raise ConfigError(f"output {output_name!r} has rank {rank}; a depth map is (B,1,H,W) or (B,H,W)",
                          hint="pass --output-name with the depth or disparity output")
    raw = build.resize(raw, [config.batch, 1, TRACK3.height, TRACK3.width])
    _post_process(build, raw, config)
    graph.output.remove(graph_output)
    nodes = [*pre, *graph.node, *build.nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.insert(0, helper.make_tensor_value_info(TRACK3.input.name, graph_input.type.tensor_type.elem_type,
                                                        list(TRACK3.input.concrete_shape(config.batch))))
    graph.output.append(helper.make_tensor_value_info(TRACK3.output.name, graph_input.type.tensor_type.elem_type,
                                                      list(TRACK3.output.concrete_shape(config.batch))))


def _post_process(build: _Builder, raw: str, config) -> None:
    """Track3Wrapper._to_output: depth scaled per sample, or disparity turned into depth."""
    out = TRACK3.output.name
    if config.native_output == "disparity":
        if config.output == "disparity":
            build.per_sample_min_max(raw, out)
            return
        disparity = build.per_sample_min_max(raw)
        floor = build.const("disparity_floor", _DISPARITY_FLOOR)
        build.op("Div", [floor, build.op("Add", [disparity, floor])], out)
        return
    depth = build.clamp_min(raw, _EPS)
    if config.output == "depth":
        build.per_sample_scale(depth, out)
        return
    build.per_sample_min_max(build.op("Reciprocal", [depth]), out)


# --- the stage ------------------------------------------------------------------------------------

def run_onnx_export(config, log: StageLog):
    """export --onnx: read, adapt, simplify, verify; the same folder and results as a torch export."""
    from lpcv_depth.stages import export as torch_export

    config.check_onnx_only()
    photos = torch_export.check_images_folder(config)
    with StagingDir(config.destination, stage=torch_export.STAGE,
                    inputs=[config.onnx, photos if photos.is_dir() else None]) as staging:
        with log.step("read-onnx") as step:
            source = read_user_onnx(config.onnx)
            step.detail = (f"{display_path(source.path)}, opset {source.opset}, {len(source.model.graph.node)} nodes"
                           + (f", external data {', '.join(source.external_data)}" if source.external_data else ""))
        images, images_info = torch_export._check_inputs(config, log)
        with log.step("adapt") as step:
            adapted = adapt_to_contract(source.model, source.opset, config)
            step.detail = (f"wrapped (input {adapted.native_input_size[0]}x{adapted.native_input_size[1]}, "
                           f"{config.native_output} out), opset {adapted.opset}" if adapted.wrapped
                           else f"in the contract, opset {adapted.opset}")
        onnx_path = staging / torch_export.ONNX_NAME
        nodes, outputs = _simplify_and_save(config, source, adapted, onnx_path, log)
        reference = _run_unsimplified(adapted.model, images, staging.path, log)
        contract, ort_outputs = torch_export._check_contract(config, onnx_path, images, log)
        _check_outputs(ort_outputs, config.batch)
        with log.step("parity") as step:
            parity = compare_outputs(reference, ort_outputs, config.parity, "simplified vs the adapted graph")
            step.detail = f"onnxsim changed the outputs by at most {parity['max_abs_diff']:.2e}"
        params = _parameter_count(adapted.model)
        results = ExportResults(
            params=params, macs=count_onnx_macs(onnx_path), weights=_weights_info(source), gelu_modules=0,
            model=_describe(config, source, adapted), spec=_spec(config, source, adapted), check_images=images_info,
            **nodes, contract=contract, parity=parity, onnx_bytes=sum(p.stat().st_size for p in outputs))
        manifest_path = write_manifest(staging.path, stage=torch_export.STAGE, config=config.as_dict(),
                                       inputs={"onnx": _source_record(source), "check_images": images_info},
                                       outputs=outputs, timings=log.timings, results=results)
    destination = config.destination
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(destination / torch_export.ONNX_NAME)}")
    return torch_export.ExportOutput(destination, destination / torch_export.ONNX_NAME,
                                     destination / manifest_path.name, results, read_manifest(destination))


def _simplify_and_save(config, source: _Source, adapted: _Adapted, onnx_path: Path, log: StageLog):
    import onnx

    from lpcv_depth.stages.export import _simplify, op_histogram

    model = adapted.model
    too_big = model.ByteSize() > _PROTO_LIMIT
    if too_big:
        log.warn("the model is over 2 GB: onnxsim cannot read it, so it is kept unsimplified")
        simplified = model
    else:
        with log.step("onnxsim") as step:
            simplified = _simplify(model)
            step.detail = f"{len(model.graph.node)} -> {len(simplified.graph.node)} nodes"
    onnx.helper.set_model_props(simplified, {
        **TRACK3.metadata_props(), "lpcv.model": onnx_model_name(source.path), "lpcv.output_mode": config.output,
        "lpcv.weights_source": "onnx", "lpcv.weights_sha256": source.sha256,
        "lpcv.backbone_input_size": "x".join(map(str, adapted.native_input_size)),
        "lpcv.native_output": config.native_output, "lpcv.max_depth": ""})
    outputs = [onnx_path]
    if too_big:
        data = onnx_path.with_name(onnx_path.name + ".data")
        onnx.save(simplified, os.fspath(onnx_path), save_as_external_data=True, location=data.name)
        outputs.append(data)
    else:
        onnx.save(simplified, os.fspath(onnx_path))
    with log.step("onnx.checker"):
        onnx.checker.check_model(os.fspath(onnx_path), full_check=True)
    return ({"nodes_exported": len(model.graph.node), "nodes_simplified": len(simplified.graph.node),
             "op_histogram": op_histogram(simplified)}, outputs)


def _run_unsimplified(model, images: np.ndarray, scratch: Path, log: StageLog) -> np.ndarray:
    """The adapted graph before onnxsim, on the check images: the reference simplification must keep."""
    import onnx

    path = scratch / "adapted.onnx"
    too_big = model.ByteSize() > _PROTO_LIMIT
    onnx.save(model, os.fspath(path), save_as_external_data=too_big, location="adapted.onnx.data")
    try:
        with log.step("adapted-graph") as step:
            outputs = OrtRunner(path).run(images)
            step.detail = f"ONNX Runtime on {len(images)} images"
    finally:
        for leftover in (path, scratch / "adapted.onnx.data"):
            leftover.unlink(missing_ok=True)
    return outputs


def _check_outputs(outputs: np.ndarray, batch: int) -> None:
    """The shape the graph really computes (a declared shape can be wrong), and a map that varies."""
    want = (len(outputs), *TRACK3.output.concrete_shape(batch)[1:])
    if outputs.shape != want:
        raise ContractError(f"the model computes an output of shape {list(outputs.shape)}, the contract needs "
                            f"{list(want)}",
                            hint="pass --wrap (with --mean/--std) to resize the model's output to the contract")
    spread = [float(np.ptp(sample)) for sample in outputs]
    flat = [index for index, value in enumerate(spread) if value < 1e-6]
    if flat:
        raise ContractError(f"the model's output is constant on check image(s) {flat}: a depth map must vary",
                            hint="check --output-name (is it the depth output?), --mean/--std and --native-output, "
                                 "and that the file holds trained weights")


def _parameter_count(model) -> int:
    return int(sum(np.prod(init.dims, dtype=np.int64) for init in model.graph.initializer
                   if not init.name.startswith(_WRAP)))


def count_onnx_macs(path: Path) -> int:
    """Multiply-accumulates of the Conv, ConvTranspose, MatMul and Gemm nodes, from inferred shapes."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(os.fspath(path)))
    graph = model.graph
    shapes = {v.name: _dims(v) for v in (*graph.input, *graph.output, *graph.value_info)}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    total = 0
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or None in out:
            continue
        if node.op_type == "Conv" and node.input[1] in shapes:
            total += int(np.prod(out, dtype=np.int64)) * int(np.prod(shapes[node.input[1]][1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose" and node.input[1] in shapes and node.input[0] in shapes:
            weight, x = shapes[node.input[1]], shapes[node.input[0]]
            if None not in x:
                total += int(np.prod(x, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
        elif node.op_type in ("MatMul", "Gemm") and shapes.get(node.input[0]):
            depth = shapes[node.input[0]][-1 if node.op_type == "MatMul" else 1]
            if depth:
                total += int(np.prod(out, dtype=np.int64)) * int(depth)
    return total


def _weights_info(source: _Source) -> dict:
    return {"source": "onnx", "path": os.fspath(source.path), "sha256": source.sha256, "url": None}


def _source_record(source: _Source) -> dict:
    return {"path": os.fspath(source.path), "sha256": source.sha256, "opset": source.opset,
            "external_data": source.external_data}


def _describe(config, source: _Source, adapted: _Adapted) -> dict:
    return {"model": onnx_model_name(source.path), "output": config.output,
            "input_size": list(adapted.native_input_size),
            "disparity_floor": _DISPARITY_FLOOR if config.native_output == "disparity" else None,
            "native_output": config.native_output, "output_semantics": config.native_output, "max_depth": None,
            "wrapped": adapted.wrapped}


def _spec(config, source: _Source, adapted: _Adapted) -> dict:
    return {"name": onnx_model_name(source.path), "native_input_size": list(adapted.native_input_size),
            "patch_multiple": 1, "mean": list(config.mean) if config.wrap else None,
            "std": list(config.std) if config.wrap else None, "native_output": config.native_output,
            "license": "", "weight_source": f"ONNX file {source.path}", "hub_weights": None,
            "default_weights": None, "description": f"user ONNX file {source.path.name}", "max_depth": None,
            "output_semantics": config.native_output}
