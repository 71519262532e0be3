"""Exact, faster stand-ins for the AIMET CPU kernels that calibration and simulation spend their time in.

Each one computes what aimet-torch 2.42 computes, bit for bit, and falls back to AIMET's own code
wherever that is not guaranteed (tests/test_aimet_fast.py compares them against AIMET and torch):

- `use_fast_histograms(sim)`: tf-enhanced observers that skip AIMET's redundant passes and bin with
  `histc` below instead of torch.histc;
- `histc`: torch.histc's CPU result from vectorized arithmetic and one bincount;
- `fast_quantize_dequantize()`: an AIMET quantization backend whose per-tensor fake quantization
  without autograd is plain vectorized arithmetic instead of torch's fake_quantize kernel, which also
  writes a mask that nothing reads without autograd, and which fake-quantizes each weight once per
  encoding instead of once per forward (`_ParameterMemo`);
- `calibration_without_output_copies(sim)`: calibration hands the fresh output of an op on as it
  is, where AIMET copies every activation first.

The first three are CPU kernels: a tensor on another device (ptq --device cuda) takes AIMET's own
path. The fourth only decides whether a tensor is copied, which is the same on every device.

Where the time went, and what these changed: docs/history/ptq-speed.md.
"""

from __future__ import annotations

import contextvars
import functools
import types
from contextlib import ExitStack, contextmanager
from typing import Iterator

from lpcv_depth.backends.aimet import activation_slots

__all__ = ["use_fast_histograms", "histc", "fast_quantize_dequantize", "calibration_without_output_copies",
           "FAST_QDQ_BACKEND"]

FAST_QDQ_BACKEND = "lpcv_depth_exact_cpu"
# torch.histc counts in the input's float32, exact only below 2**24 per bin.
_EXACT_FLOAT32_COUNT = 2 ** 24
# torch's fake quantization casts the scaled value to int64; beyond this the cast is undefined.
_INT64_SAFE = 2.0 ** 62


def _bin_positions(values, left, right, bins: int, dtype):
    """The bin of each value exactly as torch.histc computes it on CPU (linear bins, no search):
    (x - left) * bins / (right - left) in float32, truncated; the right edge falls in the last bin."""
    return _unclamped_positions(values, left, right, bins).to(dtype).clamp_(max=bins - 1)


def _unclamped_positions(values, left, right, bins: int):
    """(x - left) * bins / (right - left) in float32 as torch.histc computes it, not yet truncated (a
    value on the right edge gives `bins`); the caller makes sure that width * bins is finite. With a
    power-of-two `bins` whose step (right - left) / bins is exact, (x - left) * bins / width and
    (x - left) / step are the same real number rounded once: one pass less."""
    import torch

    positions = torch.sub(values, left)
    width = right - left
    step = width / bins
    if bins & (bins - 1) == 0 and bool((step * bins == width).all()):
        return positions.div_(step)
    return positions.mul_(bins).div_(width)


def _binnable(left, right, bins: int) -> bool:
    """(x - left) * bins stays finite for every x in [left, right] (torch.histc's own arithmetic)."""
    import torch

    return bool(torch.isfinite((right - left) * bins).all())


def histc(values, bins: int, low, high, extrema=None):
    """torch.histc(values, bins, low, high) for a float32 CPU tensor of finite values, bit for bit and
    about three times faster (torch.histc's CPU kernel does one element at a time); values outside
    [low, high] are not counted, as in torch.histc. Anything else goes to torch.histc itself.
    `extrema`: the values' (min, max) when the caller has them."""
    import torch

    left, right = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
    if (values.dtype != torch.float32 or values.device.type != "cpu" or values.numel() >= _EXACT_FLOAT32_COUNT
            or not bool(right > left) or not _binnable(left, right, bins)):
        return torch.histc(values, bins=bins, min=low, max=high)
    smallest, largest = torch.aminmax(values) if extrema is None else extrema
    if not bool(torch.isfinite(smallest) & torch.isfinite(largest)):
        return torch.histc(values, bins=bins, min=low, max=high)
    flat = values.reshape(-1)
    if bool((smallest >= left) & (largest <= right)):
        counts = torch.bincount(_unclamped_positions(flat, left, right, bins).to(torch.int32), minlength=bins + 1)
    else:
        # Values outside are binned as if clamped, then moved to an extra bin that is dropped.
        positions = _unclamped_positions(torch.clamp(flat, left, right), left, right, bins).to(torch.int32)
        positions.masked_fill_((flat < left) | (flat > right), bins + 1)
        counts = torch.bincount(positions, minlength=bins + 2)
    counts[bins - 1] += counts[bins]  # the right edge itself belongs to the last bin
    return counts[:bins].to(torch.float32)


@functools.cache
def _fast_tf_enhanced_class():
    """TfEnhancedEncodingAnalyzer with a cheaper `update_stats` that leaves bit-identical histograms.

    Per call, aimet-torch 2.42 builds a full histogram of the batch in collect_stats and then
    throws it away (merge_stats uses only its min and max and histograms the batch again over the
    merged range), and finds the min and max through isfinite/where copies. This keeps only what
    changes the result: one aminmax pass and one histogram (`histc`, exact and faster), over
    AIMET's own bin edges on the first call and over merge_stats' merged range after it. The
    out-of-range counts merge_stats adds are computed only when the growth limit actually clips
    (they are zero otherwise), and any
    tensor off the CPU, non-finite value, non-float32 input, per-channel or blockwise observer, and every weight
    quantizer, takes AIMET's own path.

    AIMET also runs the whole tf-enhanced candidate search on every batch's own histogram, for a
    per-batch encoding that a passthrough (activation) quantizer attaches to its output and never
    applies; the only reader, the int32 bias-overflow fix of QuantizedLinear/Conv, takes its
    `producer` and then that quantizer's final encoding. So the per-batch encoding here is the
    batch's min-max. That shortcut is taken only for the statistics this update_stats returns, which
    only activation quantizers produce (AIMET always calibrates those in passthrough); a weight
    quantizer gets AIMET's own statistics and search."""
    import torch
    from aimet_torch.quantization.encoding_analyzer import TfEnhancedEncodingAnalyzer, _Histogram, adjust_min_max

    class ExactFastTfEnhancedEncodingAnalyzer(TfEnhancedEncodingAnalyzer):
        _searched = None  # (stats list, its histograms, num_steps, symmetric, result) of the last search
        weights = False  # a weight quantizer applies its per-batch encoding: AIMET's own statistics only

        @torch.no_grad()
        def compute_encodings_from_stats(self, stats, num_steps, is_symmetric):
            if len(stats) == 1 and stats[0].histogram is None and stats[0].min is not None:  # update_stats' batch
                low, high = adjust_min_max(stats[0].min.clone(), stats[0].max.clone(), num_steps, is_symmetric)
                return low.view(self.observer.shape), high.view(self.observer.shape)
            # A weight is observed once, and AIMET searches its (per-channel) histograms twice: for the
            # per-batch encoding and again for the final one, on the very same statistics objects.
            last = self._searched
            if (last is not None and last[0] is stats and last[2:4] == (num_steps, is_symmetric)
                    and len(stats) == len(last[1]) and all(a is b for a, b in zip(stats, last[1]))):
                return tuple(t.clone() for t in last[4])
            result = super().compute_encodings_from_stats(stats, num_steps, is_symmetric)
            self._searched = (stats, list(stats), num_steps, is_symmetric, tuple(t.clone() for t in result))
            return result

        def _per_channel_histograms(self, weight):
            """collect_stats of a per-output-channel observer in one vectorized pass instead of a
            Python loop of histc calls, one per channel; None where that is not this case. The bin
            of each value is histc's own float32 arithmetic, pos = (x - left) * bins / (right - left)
            truncated (pos == bins is the last bin), on the same edges AIMET makes."""
            observer = self.observer
            shape = tuple(observer.shape)
            channels = shape[0] if shape else 1
            if (observer.block_size is not None or weight.dtype != torch.float32 or len(shape) != weight.dim()
                    or channels < 2 or weight.shape[0] != channels or any(dim != 1 for dim in shape[1:])):
                return None
            rows = weight.reshape(channels, -1)
            mins, maxs = torch.aminmax(rows, dim=1)
            if not bool(torch.isfinite(mins).all() & torch.isfinite(maxs).all()):
                return None
            bins = observer.num_bins
            # _HistogramObserver._create_bin_edges, one row per channel.
            low = torch.where(mins == maxs, mins - 0.5, mins).float()
            high = torch.where(mins == maxs, maxs + 0.5, maxs).float()
            step = (high - low) / bins
            edges = torch.arange(0, bins + 1, device=weight.device)[None, :] * step[:, None] + low[:, None]
            left, right = edges[:, :1], edges[:, -1:]
            if not bool((right > left).all()) or not _binnable(left, right, bins):
                return None
            position = _bin_positions(rows, left, right, bins, torch.int64)
            inside = (rows >= left) & (rows <= right)
            index = (position + torch.arange(channels, device=weight.device)[:, None] * bins)[inside]
            histograms = torch.bincount(index, minlength=channels * bins).reshape(channels, bins).float()
            histograms[:, 0] += (rows < left).sum(dim=1)
            histograms[:, -1] += (rows > right).sum(dim=1)
            return [_Histogram(histograms[c], edges[c], mins[c], maxs[c]) for c in range(channels)]

        def _first_batch(self, input_tensor, low, high):
            """AIMET's collect_stats and merge_stats of a finite per-tensor first batch, binned by `histc`."""
            observer = self.observer
            edges = observer._create_bin_edges(min_val=low, max_val=high, device=input_tensor.device)
            histogram = histc(input_tensor, observer.num_bins, edges[0], edges[-1], extrema=(low, high))
            # collect_stats' own correction: values beyond the float32 edges go to the end bins.
            histogram[0] += torch.sum(input_tensor < edges[0])
            histogram[-1] += torch.sum(input_tensor > edges[-1])
            observer.merge_stats([_Histogram(histogram, edges, low, high)], input_tensor)
            return [_Histogram(None, None, low, high)]

        def _kept_range(self, current, low, high):
            """merge_stats' own test for a batch whose range, clamped to the growth limit, leaves the
            histogram's range as it is: then the (min, max) it would store (the clamped values, equal to
            the current ones), else None. merge_stats would only copy the histogram and rebuild the
            same edges, at 0.3 ms per quantizer and image."""
            left_limit, right_limit = self.observer._histogram_range_limit[0]
            low, high = low.clamp(left_limit, current.bin_edges[0]), high.clamp(current.bin_edges[-1], right_limit)
            return (low, high) if bool(low == current.min) and bool(high == current.max) else None

        @torch.no_grad()
        def update_stats(self, input_tensor):
            if input_tensor.device.type != "cpu":  # exact against torch.histc's CPU arithmetic only
                return super().update_stats(input_tensor)
            observer = self.observer
            current = observer.stats[0]
            if self.weights and current.histogram is None:
                stats = self._per_channel_histograms(input_tensor)
                if stats is not None:
                    observer.merge_stats(stats, input_tensor)
                    return stats
            if (self.weights or len(observer.stats) != 1 or observer.block_size is not None
                    or input_tensor.dtype != torch.float32 or not input_tensor.numel()):
                return super().update_stats(input_tensor)
            low, high = torch.aminmax(input_tensor)
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return super().update_stats(input_tensor)
            if current.histogram is None:
                return self._first_batch(input_tensor, low, high)
            stats = [_Histogram(None, None, low, high)]
            kept = self._kept_range(current, low, high)
            if kept is not None:  # what merge_stats would rebuild: the same counts and edges
                merged = _Histogram(current.histogram, current.bin_edges, *kept)
            else:
                # With an empty batch merge_stats does only the re-binning of the old histogram into the
                # merged range; the batch's own histc and out-of-range counts are then added in the same
                # order as merge_stats adds them, so the float32 counts round identically.
                observer.merge_stats(stats, input_tensor.new_empty((0,)))
                merged = observer.stats[0]
            histogram = histc(input_tensor, observer.num_bins, merged.min, merged.max, extrema=(low, high))
            histogram += merged.histogram
            if low < merged.min:
                histogram[0] += torch.sum(input_tensor < merged.min)
            if high > merged.max:
                histogram[-1] += torch.sum(input_tensor > merged.max)
            observer.stats[0] = _Histogram(histogram, merged.bin_edges, merged.min, merged.max)
            return stats

    return ExactFastTfEnhancedEncodingAnalyzer


def use_fast_histograms(sim) -> int:
    """Swap every tf-enhanced analyzer of the activation and weight quantizers for the exact fast
    one (before calibration); returns how many were swapped."""
    from aimet_torch.quantization.encoding_analyzer import TfEnhancedEncodingAnalyzer

    fast = _fast_tf_enhanced_class()
    swapped = 0
    for module in sim.model.modules():
        params = getattr(module, "param_quantizers", None) or {}
        quantizers = [(quantizer, False) for _, _, quantizer in activation_slots(module)]
        quantizers += [(quantizer, True) for quantizer in params.values() if quantizer is not None]
        for quantizer, weights in quantizers:
            analyzer = getattr(quantizer, "encoding_analyzer", None)
            if type(analyzer) is TfEnhancedEncodingAnalyzer:
                quantizer.encoding_analyzer = fast(analyzer.observer.shape, block_size=analyzer.observer.block_size)
                quantizer.encoding_analyzer.weights = weights
                swapped += 1
    return swapped


def _fast_per_tensor_qdq(tensor, scale, offset, qmin: int, qmax: int, block_size, zero_point_shift):
    """torch.fake_quantize_per_tensor_affine's CPU result, as AIMET calls it for one scale and offset
    without autograd, from a few vectorized passes; None where that is not the case or where the
    kernel's int64 cast is undefined (non-finite or huge values), so AIMET's own path runs.

    The kernel computes (clamp(int64(zp + nearbyint(x * (1/scale))), qmin, qmax) - zp) * scale, the
    last product in double and then rounded to float; k * scale is exact in double for |k| < 2**29,
    so it equals the float32 product. Adding zp before the clamp also turns -0.0 into +0.0 as the
    int64 cast does."""
    import torch
    from aimet_torch.quantization.affine.backends import torch_builtins

    if (block_size is not None or zero_point_shift != 0.0 or torch.is_grad_enabled() or torch.jit.is_tracing()
            or type(tensor) is not torch.Tensor or tensor.dtype != torch.float32 or tensor.device.type != "cpu"
            or scale.dtype != torch.float32 or scale.numel() != 1 or offset.numel() != 1
            or torch_builtins._round_fn is not torch.round or max(abs(qmin), abs(qmax)) >= 2 ** 29):
        return None
    torch_builtins._validate_arguments(tensor, scale, qmin, qmax, block_size)
    zero_point = float(-offset.reshape(()).to(torch.int32))
    step = scale.reshape(())
    scaled = torch.mul(tensor, 1.0 / step)
    smallest, largest = torch.aminmax(scaled) if scaled.numel() else (step.new_zeros(()), step.new_zeros(()))
    if not bool(torch.isfinite(smallest) & torch.isfinite(largest)) or max(-smallest, largest) >= _INT64_SAFE:
        return None
    scaled.round_().add_(zero_point).clamp_(qmin, qmax)
    if zero_point:  # subtracting 0.0 changes no bit, not even of -0.0
        scaled.sub_(zero_point)
    return scaled.mul_(step)


class _ParameterMemo:
    """Fake-quantized parameters, kept while neither the parameter nor its encoding changes.

    A calibration or simulation forward fake-quantizes every weight again with the same encoding.
    AIMET passes each one as a fresh alias of the parameter (same storage, same version counter),
    so an entry is found by storage address and layout, and holds the alias so that the storage
    cannot be freed and its address reused. An entry is used only while the parameter's version,
    the bits of its scale and offset and the result's own version are what they were."""

    def __init__(self, max_bytes: int):
        self.entries: dict = {}
        self.free_bytes = max_bytes
        self.hits = 0

    @staticmethod
    def applies(tensor) -> bool:
        """A trainable tensor outside autograd: an alias of a parameter (activations never require grad)."""
        import torch

        return tensor.requires_grad and not torch.is_grad_enabled() and tensor.device.type == "cpu"

    def quantize_dequantize(self, compute, tensor, scale, offset, *args):
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        entry = self.entries.get(key)
        if (entry is not None and entry["version"] == tensor._version and entry["args"] == args
                and entry["result"]._version == entry["result_version"]
                and _same_bits(entry["scale"], scale) and _same_bits(entry["offset"], offset)):
            self.hits += 1
            return entry["result"]
        result = compute(tensor, scale, offset, *args)
        if entry is None:  # a stale entry is replaced in place: same layout, same size
            size = result.numel() * result.element_size()
            if size > self.free_bytes:
                return result
            self.free_bytes -= size
        self.entries[key] = {"source": tensor, "version": tensor._version, "args": args, "result": result,
                             "result_version": result._version, "scale": scale.detach().clone(),
                             "offset": offset.detach().clone()}
        return result


def _same_bits(a, b) -> bool:
    import torch

    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                            b.detach().reshape(-1).contiguous().view(torch.uint8)))


# Room for every fake-quantized weight of the models here (a ViT-S needs 88 MB); beyond it, none are kept.
_PARAMETER_MEMO_BYTES = 2 ** 30
_parameter_memo: contextvars.ContextVar[_ParameterMemo | None] = contextvars.ContextVar("parameter_memo",
                                                                                         default=None)


def _quantize_dequantize(tensor, scale, offset, qmin, qmax, block_size=None, zero_point_shift=0.0):
    from aimet_torch.quantization.affine.backends import torch_builtins

    fast = _fast_per_tensor_qdq(tensor, scale, offset, qmin, qmax, block_size, zero_point_shift)
    if fast is not None:
        return fast
    return torch_builtins.quantize_dequantize(tensor, scale, offset, qmin, qmax, block_size, zero_point_shift)


@functools.cache
def _fast_qdq_backend():
    """AIMET's torch_builtins backend whose quantize_dequantize computes each parameter once (while the
    block's memo lasts) and the per-tensor no-autograd case with `_fast_per_tensor_qdq`."""
    from aimet_torch.quantization.affine.backends import torch_builtins
    from aimet_torch.quantization.affine.backends.utils import add_backend

    def quantize_dequantize(tensor, scale, offset, qmin, qmax, block_size=None, zero_point_shift=0.0):
        memo = _parameter_memo.get()
        if memo is not None and memo.applies(tensor):
            return memo.quantize_dequantize(_quantize_dequantize, tensor, scale, offset, qmin, qmax, block_size,
                                            zero_point_shift)
        return _quantize_dequantize(tensor, scale, offset, qmin, qmax, block_size, zero_point_shift)

    backend = types.SimpleNamespace(__name__=FAST_QDQ_BACKEND, quantize=torch_builtins.quantize,
                                    dequantize=torch_builtins.dequantize, quantize_dequantize=quantize_dequantize)
    add_backend(FAST_QDQ_BACKEND, backend)
    return backend


def _fresh_output_types() -> tuple:
    """Modules whose forward returns a tensor its own op has just made: never one of its inputs, a
    tensor it keeps, or a view of either (when they do not work in place)."""
    from aimet_torch.nn.modules import custom
    from torch import nn

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
            nn.LayerNorm, nn.GroupNorm, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.SiLU, nn.Sigmoid,
            nn.Tanh, nn.Softmax, nn.Upsample, custom.MatMul, custom.Add, custom.Subtract, custom.Multiply,
            custom.Divide, custom.Interpolate, custom.Concat)


def _unshared(tensor) -> bool:
    """Nothing but this one tensor object reaches its memory: no other tensor uses its storage, and
    if it is a view, nothing but the view holds its base (whose Python object then has three
    references: the view's, `base` here and getrefcount's argument). More Python names for the same
    tensor object are not visible here: `_fresh_output_types` rules those out."""
    import sys

    import torch

    if type(tensor) is not torch.Tensor or tensor._use_count() != 1:
        return False
    users = torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1  # less the storage object just made
    base = tensor._base
    if base is None:
        return users == 1
    return (users == 2 and type(base) is torch.Tensor and base._base is None and base._use_count() == 2
            and sys.getrefcount(base) == 3)


def _alias_if_unshared(tensor, *args, **kwargs):
    """torch.Tensor.clone, except that an unshared tensor is passed on as an alias of itself."""
    import torch

    if args or kwargs or not _unshared(tensor):
        return torch._C.TensorBase.clone(tensor, *args, **kwargs)
    return tensor.view_as(tensor)


@contextmanager
def _tensor_clone_replaced(replacement) -> Iterator[None]:
    import torch

    own = "clone" in vars(torch.Tensor)
    original = vars(torch.Tensor).get("clone")
    torch.Tensor.clone = replacement
    try:
        yield
    finally:
        if own:
            torch.Tensor.clone = original
        else:
            del torch.Tensor.clone


def _passthrough_without_copy(quantizer):
    """The quantizer's `_compute_encodings` with `_alias_if_unshared` in place of the copy AIMET's
    passthrough makes (it picks `torch.Tensor.clone` as it enters, and only then)."""
    original = quantizer._compute_encodings

    @contextmanager
    def compute_encodings(passthrough: bool = False):
        if not passthrough:
            with original(passthrough=False):
                yield
            return
        with ExitStack() as stack:
            with _tensor_clone_replaced(_alias_if_unshared):
                stack.enter_context(original(passthrough=True))
            yield

    return compute_encodings


@contextmanager
def calibration_without_output_copies(sim) -> Iterator[list[str]]:
    """Inside the block, AIMET's calibration passes the fresh output of an op on without copying it.

    While calibrating, every activation quantizer hands its input on as a copy, so that the encoding
    AIMET attaches to what it returns does not land on a tensor that anything else holds. The output
    of an op that has just made it (`_fresh_output_types`, not in place) is held by nothing else: its
    output quantizers hand it on as an alias instead, which every later op and observer sees with
    the same values. `_unshared` checks that at run time as well, and the copy is made wherever it
    fails. Input quantizers always copy (the caller may still hold the tensor). Yields the names of
    the quantizers that take this path (`<module>.output_quantizers.<index>`)."""
    from aimet_torch.quantization.affine.quantizer import AffineQuantizerBase

    fresh = _fresh_output_types()
    patched = {}
    for name, module in sim.model.named_modules():
        if not isinstance(module, fresh) or getattr(module, "inplace", False):
            continue
        for index, quantizer in enumerate(getattr(module, "output_quantizers", None) or []):
            if isinstance(quantizer, AffineQuantizerBase) and "_compute_encodings" not in vars(quantizer):
                quantizer._compute_encodings = _passthrough_without_copy(quantizer)
                patched[f"{name}.output_quantizers.{index}"] = quantizer
    try:
        yield list(patched)
    finally:
        for quantizer in patched.values():
            del quantizer._compute_encodings


@contextmanager
def fast_quantize_dequantize() -> Iterator[None]:
    """AIMET's quantization runs on `_fast_qdq_backend` inside the block, with a memo of the
    fake-quantized parameters that ends with it (exports still use AIMET's exportable builtins:
    AIMET picks those itself while exporting)."""
    from aimet_torch.quantization.affine.backends.utils import set_backend

    _fast_qdq_backend()
    token = _parameter_memo.set(_ParameterMemo(_PARAMETER_MEMO_BYTES))
    try:
        with set_backend(FAST_QDQ_BACKEND):
            yield
    finally:
        _parameter_memo.reset(token)
