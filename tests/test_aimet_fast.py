"""The exact fast kernels of lpcv_depth/backends/aimet_fast.py against AIMET's and torch's own, bit for
bit: histograms, tf-enhanced statistics and encodings, fake quantization, and a whole calibration."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")

import torch  # noqa: E402

from lpcv_depth.backends import aimet_fast  # noqa: E402
from lpcv_depth.host import keep_freed_memory  # noqa: E402


def _bits(tensor):
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("bins", [512, 500])  # a power of two takes the one-division path
@pytest.mark.parametrize("kind", ["normal", "on-edges", "relu", "narrow", "wide", "right-edge", "huge", "subnormal"])
def test_histc_is_torch_histc_bit_for_bit(kind, bins):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 70, 90, generator=generator)
    if kind == "on-edges":  # every bin edge itself, where the float arithmetic decides the bin
        x = torch.cat([x.flatten(), torch.linspace(float(x.min()), float(x.max()), bins + 1)])
    elif kind == "relu":
        x = x.clamp_min(0)
    elif kind == "narrow":
        x = 1.0 + x * 1e-6
    elif kind == "wide":
        x = x * 1e30
    elif kind == "huge":  # width * bins overflows float32
        x = x * 1e37
    elif kind == "subnormal":  # the step width / bins is not exact
        x = x * 1e-41
    low, high = torch.aminmax(x)
    if kind == "right-edge":
        high = high * 0 + 7.0
        x[0, 0, 0] = 7.0
    want = torch.histc(x, bins=bins, min=low, max=high)
    assert torch.equal(aimet_fast.histc(x, bins, low, high), want)
    assert torch.equal(aimet_fast.histc(torch.stack([x, x], -1)[..., 0], bins, low, high), want)  # strided
    assert torch.equal(aimet_fast.histc(x, bins, low.item(), high.item()), want)
    assert torch.equal(aimet_fast.histc(x, bins, low, high, extrema=torch.aminmax(x)), want)


@pytest.mark.parametrize("case", ["outside", "float64", "constant", "nan"])
def test_histc_leaves_other_cases_to_torch(case):
    x = torch.linspace(-2, 3, 1000)
    low, high = -1.0, 2.0  # "outside": values beyond both edges are not counted
    if case == "float64":
        x, low, high = x.double(), -2.0, 3.0
    elif case == "constant":
        x, low, high = torch.full((100,), 0.5), 0.5, 0.5
    elif case == "nan":
        x[10] = float("nan")
        low, high = -2.0, 3.0
    assert torch.equal(aimet_fast.histc(x, 64, low, high), torch.histc(x, bins=64, min=low, max=high))


QDQ_CASES = {  # (qmin, qmax, offset, scale): AIMET's encodings as its quantizers pass them
    "uint8-asymmetric": (0, 255, -117.0, 0.0123),
    "softmax-fixed": (0, 255, 0.0, 1 / 255),
    "int8-symmetric": (-128, 127, 0.0, 0.031),
    "int4-symmetric": (-8, 7, 0.0, 0.21),  # the 4-bit presets' per-tensor weights (a one-channel conv)
    "uint16-asymmetric": (0, 65535, -30001.0, 1.3e-4),
}


@pytest.mark.parametrize("case", sorted(QDQ_CASES))
def test_fast_quantize_dequantize_is_aimets_bit_for_bit(case):
    from aimet_torch.quantization.affine.backends import torch_builtins

    qmin, qmax, offset, scale = QDQ_CASES[case]
    scale, offset = torch.tensor([scale], dtype=torch.float32), torch.tensor([offset])
    generator = torch.Generator().manual_seed(3)
    steps = torch.arange(-(qmax - qmin) - 40, (qmax - qmin) + 40, dtype=torch.float32)
    x = torch.cat([torch.randn(20000, generator=generator) * float(scale) * (qmax - qmin) / 3,
                   (steps + 0.5) * scale,  # exact ties: nearbyint rounds them to even
                   -torch.rand(500, generator=generator) * scale * 0.49,  # round to -0.0
                   torch.tensor([0.0, -0.0, 1e12, -1e12])])  # far outside: clamped
    with torch.no_grad():
        ours = aimet_fast._fast_per_tensor_qdq(x, scale, offset, qmin, qmax, None, 0.0)
        want = torch_builtins.quantize_dequantize(x, scale, offset, qmin, qmax)
        strided = aimet_fast._fast_per_tensor_qdq(x.view(2, -1).t(), scale, offset, qmin, qmax, None, 0.0)
    assert ours is not None
    assert torch.equal(_bits(ours), _bits(want))
    assert torch.equal(_bits(strided), _bits(want.view(2, -1).t()))


def test_fast_quantize_dequantize_leaves_other_cases_to_aimet():
    scale, offset = torch.tensor([0.1]), torch.tensor([-10.0])
    with torch.no_grad():
        for special in (float("inf"), float("-inf"), float("nan"), 1e30, -1e30):  # int64 cast undefined there
            x = torch.cat([torch.linspace(-1, 1, 3000), torch.tensor([special])])
            assert aimet_fast._fast_per_tensor_qdq(x, scale, offset, 0, 255, None, 0.0) is None
        assert aimet_fast._fast_per_tensor_qdq(torch.ones(4).double(), scale, offset, 0, 255, None, 0.0) is None
        assert aimet_fast._fast_per_tensor_qdq(torch.ones(4), scale, offset, 0, 255, None, 0.5) is None
    assert aimet_fast._fast_per_tensor_qdq(torch.ones(4), scale, offset, 0, 255, None, 0.0) is None  # autograd on


def test_fast_backend_is_used_inside_the_block_only():
    from aimet_torch.quantization.affine.backends import get_backend

    before = get_backend().__name__
    with aimet_fast.fast_quantize_dequantize():
        assert get_backend().__name__ == aimet_fast.FAST_QDQ_BACKEND
    assert get_backend().__name__ == before != aimet_fast.FAST_QDQ_BACKEND


class _Tiny(torch.nn.Module):
    """Conv, ReLU, Linear, GELU and a softmax whose output the HTP config fixes to [0, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 16)
        self.gelu = torch.nn.GELU()
        self.softmax = torch.nn.Softmax(dim=-1)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.relu(self.conv(x)).flatten(2).transpose(1, 2)
        return self.out(self.softmax(self.gelu(self.fc(y))))


def _calibrated(model, batches, fast: bool):
    """(quantizers by name, the output on a held-out batch, the output quantizers calibrated without a copy)."""
    import contextlib

    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    from lpcv_depth.backends.aimet import htp_v75_config_path

    sim = QuantizationSimModel(copy.deepcopy(model), dummy_input=batches[0], default_output_bw=8, default_param_bw=8,
                               quant_scheme=QuantScheme.post_training_tf_enhanced,
                               config_file=str(htp_v75_config_path()))
    if fast:
        assert aimet_fast.use_fast_histograms(sim) > 0
    with aimet_fast.fast_quantize_dequantize() if fast else contextlib.nullcontext(), torch.no_grad():
        with aimet_fast.calibration_without_output_copies(sim) if fast else contextlib.nullcontext([]) as uncopied:
            sim.compute_encodings(lambda m: [m(batch) for batch in batches])
        assert not any("_compute_encodings" in vars(quantizer) for quantizer in sim.model.modules())
        held_out = sim.model(batches[0] * 1.5)
    quantizers = {name: module for name, module in sim.model.named_modules() if hasattr(module, "get_encodings")}
    return quantizers, held_out, uncopied


def _assert_same_encodings_and_output(theirs: dict, their_output, ours: dict, our_output) -> None:
    """Every quantizer's encoding, and the simulated output, the same bits in both calibrations."""
    assert theirs.keys() == ours.keys()
    for name, quantizer in theirs.items():
        if quantizer.get_encodings() is None:
            assert ours[name].get_encodings() is None, name
            continue
        assert torch.equal(_bits(quantizer.get_min()), _bits(ours[name].get_min())), name
        assert torch.equal(_bits(quantizer.get_max()), _bits(ours[name].get_max())), name
    assert torch.equal(_bits(their_output), _bits(our_output))


class _InPlaceFanOut(torch.nn.Module):
    """In-place ops on tensors that another branch reads afterwards: a copy that is left out where it
    is needed changes what the later branch sees."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(8, 8)
        self.gelu = torch.nn.GELU()

    def forward(self, x):
        y = self.conv(x)
        z = self.relu(y)  # y itself, changed in place: held by the sum below as well
        z = z.mul_(2.0)
        tokens = (y + z).flatten(2).transpose(1, 2)
        h = self.fc(tokens)
        g = self.gelu(h)
        g = g.add_(1.0)  # in place on the GELU's output, which nothing else reads
        return h - g


def test_uncopied_outputs_only_where_nothing_else_holds_them():
    import sys

    fresh = torch.randn(4, 4)
    assert aimet_fast._unshared(fresh)
    # (pytest's assert would hold the base for its message: the result is taken first)
    view_of_unheld_base = aimet_fast._unshared(torch.randn(4, 4).view(16))
    assert view_of_unheld_base
    held = torch.randn(4, 4)
    assert not aimet_fast._unshared(held.view(16))  # its base is held here
    viewed = torch.randn(4, 4)
    other_view = viewed[0]
    assert not aimet_fast._unshared(viewed)  # another view shares its memory
    assert not aimet_fast._unshared(torch.nn.Parameter(torch.randn(4)))
    assert sys.getrefcount(other_view) >= 2 and sys.getrefcount(held) >= 2
    alias = aimet_fast._alias_if_unshared(fresh)
    assert alias.data_ptr() == fresh.data_ptr() and alias is not fresh
    copy_ = aimet_fast._alias_if_unshared(viewed)
    assert copy_.data_ptr() != viewed.data_ptr() and torch.equal(copy_, viewed)


def test_calibration_without_output_copies_is_aimets_with_in_place_ops(monkeypatch):
    """Encodings and the simulated output of a model with in-place ops and fan-out are AIMET's bit
    for bit; the in-place ReLU's output is copied, the fresh outputs are not."""
    from lpcv_depth.backends.aimet import prepare_for_quantsim

    torch.manual_seed(5)
    model, preparation = prepare_for_quantsim(_InPlaceFanOut().eval())  # the sum and difference become modules
    assert preparation.traced
    batches = [torch.randn(1, 3, 10, 10) * (1 + i) - i * 0.2 for i in range(5)]
    theirs, their_output, _ = _calibrated(model, batches, fast=False)
    aliases = []
    original = aimet_fast._alias_if_unshared

    def counting(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        aliases.append(result.data_ptr() == tensor.data_ptr())
        return result

    monkeypatch.setattr(aimet_fast, "_alias_if_unshared", counting)
    ours, our_output, uncopied = _calibrated(model, batches, fast=True)
    assert sum(aliases) >= 4 * len(batches)  # fc, gelu, the sum and the difference, every batch
    # The in-place ReLU's output is the conv's, which the sum reads again: it keeps AIMET's copy.
    assert "relu.output_quantizers.0" in ours
    assert sorted(uncopied) == ["fc.output_quantizers.0", "gelu.output_quantizers.0", "module_add.output_quantizers.0",
                                "module_sub.output_quantizers.0"]
    _assert_same_encodings_and_output(theirs, their_output, ours, our_output)


def test_calibration_with_the_fast_kernels_is_aimets_bit_for_bit(monkeypatch):
    """The whole QuantSim calibration, on AIMET's kernels and on ours: every encoding and the
    simulated output are the same bits; the fast paths were actually taken, and each weight was
    fake-quantized once per encoding instead of once per forward."""
    torch.manual_seed(4)
    model = _Tiny().eval()
    batches = [torch.randn(1, 3, 12, 12) * (1 + i) + i * 0.3 for i in range(6)]
    taken = {"qdq": 0, "memo_hits": 0}
    original = aimet_fast._fast_per_tensor_qdq

    def counting(*args):
        result = original(*args)
        taken["qdq"] += result is not None
        return result

    memo_class = aimet_fast._ParameterMemo

    class CountingMemo(memo_class):
        def quantize_dequantize(self, *args):
            hits = self.hits
            result = super().quantize_dequantize(*args)
            taken["memo_hits"] += self.hits - hits
            return result

    theirs, their_output, _ = _calibrated(model, batches, fast=False)
    monkeypatch.setattr(aimet_fast, "_fast_per_tensor_qdq", counting)
    monkeypatch.setattr(aimet_fast, "_ParameterMemo", CountingMemo)
    ours, our_output, uncopied = _calibrated(model, batches, fast=True)
    assert sorted(uncopied) == [f"{name}.output_quantizers.0" for name in ("fc", "gelu", "out", "relu", "softmax")]
    assert taken["qdq"] > 0
    assert taken["memo_hits"] >= 3 * (len(batches) - 1)  # three weights, every forward after the first
    assert not theirs["softmax.output_quantizers.0"].is_overwrite_allowed()  # fixed [0, 1]: applied in calibration
    assert len(theirs) > 8
    _assert_same_encodings_and_output(theirs, their_output, ours, our_output)


def test_keep_freed_memory_is_set_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True


@pytest.mark.parametrize("kind", ["normal", "growing", "shifting", "clipped", "relu", "signed-zeros", "constant",
                                  "far-edge", "inf", "nan", "inf-first"])
def test_fast_tf_enhanced_histograms_are_aimets_bit_for_bit(kind):
    """The calibration's tf-enhanced observer skips AIMET's redundant passes; its histograms, and so
    the encodings, must stay exactly AIMET's, including where the 3x growth limit clips."""
    import torch
    from aimet_torch.quantization.encoding_analyzer import TfEnhancedEncodingAnalyzer

    from lpcv_depth.backends.aimet_fast import _fast_tf_enhanced_class

    generator = torch.Generator().manual_seed(0)
    aimet, fast = TfEnhancedEncodingAnalyzer(()), _fast_tf_enhanced_class()(())
    for i in range(10):
        x = torch.randn(2, 50, 64, generator=generator)
        x = {"growing": x * (1 + 3 * i), "shifting": x + 2.0 * i, "relu": x.clamp_min(0),
             "clipped": x * (1 + 30 * i),  # beyond the 3x growth limit: the end bins take the rest
             "signed-zeros": torch.where(x < 0, x * 0, x),  # -0.0 and +0.0 at the minimum
             "constant": torch.full_like(x, 0.5 if i < 3 else float(i))}.get(kind, x)
        if kind == "far-edge" and i == 0:  # float32 puts the last bin edge of [-1000, 0.001] below 0.001
            x = x.clamp(max=0.0)
            x[0, 0, :2] = torch.tensor([-1000.0, 0.001])
        if kind in ("inf", "nan") and i == 5 or kind == "inf-first" and i == 0:
            x[0, 0, 0] = float(kind.split("-")[0])
        aimet.update_stats(x)
        fast.update_stats(x)
        ours, theirs = fast.observer.stats[0], aimet.observer.stats[0]
        for name in ("histogram", "bin_edges", "min", "max"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), (name, i)
            assert torch.equal(_bits(getattr(ours, name)), _bits(getattr(theirs, name))), (name, i)
    for want, got in zip(aimet.compute_encodings(255, False), fast.compute_encodings(255, False)):
        assert torch.equal(_bits(want), _bits(got))


def test_a_batch_inside_the_histograms_range_skips_the_merge(monkeypatch):
    """A batch that leaves the range as it is (merge_stats' own test) is added without merge_stats;
    one that widens it still goes through merge_stats' re-binning. The histograms stay AIMET's
    (the test above, batch by batch)."""
    import torch
    from aimet_torch.quantization.encoding_analyzer import _HistogramObserver

    from lpcv_depth.backends.aimet_fast import _fast_tf_enhanced_class

    merges = []
    merge = _HistogramObserver.merge_stats
    monkeypatch.setattr(_HistogramObserver, "merge_stats", lambda self, *args: merges.append(1) or merge(self, *args))
    fast = _fast_tf_enhanced_class()(())
    generator = torch.Generator().manual_seed(0)
    fast.update_stats(torch.randn(2000, generator=generator) * 4)  # the first batch sets the range
    inside = fast.observer.stats[0].max.item() * 0.25
    # The first merge may still move the range: the float32 last edge need not equal the first max.
    fast.update_stats(torch.rand(500, generator=generator) * inside)
    merges.clear()
    for _ in range(3):
        fast.update_stats(torch.rand(500, generator=generator) * inside)
    assert merges == []
    fast.update_stats(torch.randn(500, generator=generator) * 10)  # beyond the range: re-binned
    assert merges == [1]


def test_fast_tf_enhanced_leaves_tensors_off_the_cpu_to_aimet(monkeypatch):
    """ptq --device cuda calibrates on a GPU, whose histc is not the CPU arithmetic the fast histograms
    reproduce: AIMET's own update_stats takes every tensor off the CPU ("meta" stands in for a GPU)."""
    from aimet_torch.quantization.encoding_analyzer import TfEnhancedEncodingAnalyzer

    from lpcv_depth.backends.aimet_fast import _fast_tf_enhanced_class

    seen = []
    monkeypatch.setattr(TfEnhancedEncodingAnalyzer, "update_stats",
                        lambda self, tensor: seen.append(tensor.device.type) or "aimet")
    activation, weight = _fast_tf_enhanced_class()(()), _fast_tf_enhanced_class()((4, 1))
    weight.weights = True
    assert activation.update_stats(torch.ones(8, device="meta")) == "aimet"
    assert weight.update_stats(torch.ones(4, 3, device="meta")) == "aimet"
    assert seen == ["meta", "meta"]
    activation.update_stats(torch.linspace(-1, 1, 8))  # on the CPU: the fast path
    weight.update_stats(torch.linspace(-1, 1, 12).reshape(4, 3))
    assert seen == ["meta", "meta"]


@pytest.mark.parametrize("num_steps", [254, 14])  # symmetric 8-bit and 4-bit weights
@pytest.mark.parametrize("shape", [(16, 24), (12, 3, 3, 3)])
def test_fast_tf_enhanced_weight_encodings_are_aimets(shape, num_steps):
    """Per-output-channel weight histograms come from one vectorized pass with histc's own bin
    arithmetic, and must be AIMET's bit for bit; the second search on the same statistics (AIMET's
    per-batch encoding, then the final one) is served from the first."""
    import torch
    from aimet_torch.quantization.encoding_analyzer import TfEnhancedEncodingAnalyzer

    from lpcv_depth.backends.aimet_fast import _fast_tf_enhanced_class

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=generator) * torch.linspace(0.1, 3, shape[0]).view(-1, *[1] * (len(shape) - 1))
    weight[1] = 0.25  # a constant channel: AIMET widens its range by 0.5 each way
    observer_shape = (shape[0],) + (1,) * (len(shape) - 1)
    aimet, fast = TfEnhancedEncodingAnalyzer(observer_shape), _fast_tf_enhanced_class()(observer_shape)
    fast.weights = True
    theirs, ours = aimet.update_stats(weight), fast.update_stats(weight)
    for want, got in zip(theirs, ours):
        for name in ("histogram", "bin_edges", "min", "max"):
            assert torch.equal(getattr(want, name), getattr(got, name)), name
    first = fast.compute_encodings_from_stats(ours, num_steps, True)
    for want, got, again in zip(aimet.compute_encodings(num_steps, True), fast.compute_encodings(num_steps, True),
                                first):
        assert torch.equal(want, got) and torch.equal(want, again)


def _memo_case():
    """A per-channel weight quantizer and its weight, as AIMET's quantized layers hold them."""
    from aimet_torch.quantization.affine import QuantizeDequantize

    generator = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(6, 10, generator=generator))
    quantizer = QuantizeDequantize((6, 1), 8, True)
    quantizer.set_range(-weight.detach().abs().amax(1, keepdim=True), weight.detach().abs().amax(1, keepdim=True))
    return weight, quantizer


def _plain_qdq(quantizer, weight):
    """AIMET's own fake quantization of `weight` with the quantizer's current encoding."""
    from aimet_torch.quantization.affine.backends import torch_builtins

    with torch.no_grad():
        return torch_builtins.quantize_dequantize(weight.detach(), quantizer.get_scale(), quantizer.get_offset(),
                                                  quantizer.qmin, quantizer.qmax)


def test_parameter_memo_serves_a_weight_until_it_or_its_encoding_changes():
    weight, quantizer = _memo_case()
    with aimet_fast.fast_quantize_dequantize(), torch.no_grad():
        memo = aimet_fast._parameter_memo.get()
        first = quantizer(weight)
        assert torch.equal(_bits(quantizer(weight)), _bits(first)) and memo.hits == 1
        assert torch.equal(_bits(first), _bits(_plain_qdq(quantizer, weight)))

        weight.mul_(0.5)  # the parameter changed in place: its version moved on
        halved = quantizer(weight)
        assert memo.hits == 1 and torch.equal(_bits(halved), _bits(_plain_qdq(quantizer, weight)))

        quantizer.set_range(quantizer.get_min() * 2, quantizer.get_max() * 2)  # a new encoding
        widened = quantizer(weight)
        assert memo.hits == 1 and torch.equal(_bits(widened), _bits(_plain_qdq(quantizer, weight)))

        widened.as_subclass(torch.Tensor).add_(1.0)  # somebody wrote into the shared result
        again = quantizer(weight)
        assert memo.hits == 1 and torch.equal(_bits(again), _bits(_plain_qdq(quantizer, weight)))
        assert quantizer(weight) is not None and memo.hits == 2
    assert aimet_fast._parameter_memo.get() is None  # the memo, and what it holds, ends with the block


def test_parameter_memo_keeps_nothing_beyond_its_budget_and_skips_activations(monkeypatch):
    weight, quantizer = _memo_case()
    monkeypatch.setattr(aimet_fast, "_PARAMETER_MEMO_BYTES", weight.numel() * 4 - 1)
    with aimet_fast.fast_quantize_dequantize(), torch.no_grad():
        memo = aimet_fast._parameter_memo.get()
        for _ in range(3):
            assert torch.equal(_bits(quantizer(weight)), _bits(_plain_qdq(quantizer, weight)))
        activation = weight.detach().clone()  # no grad: an activation, computed every time
        for _ in range(2):
            quantizer(activation)
        assert memo.hits == 0 and not memo.entries
    with aimet_fast.fast_quantize_dequantize():  # autograd on: never served from the memo
        quantizer(weight)
        quantizer(weight)
        assert aimet_fast._parameter_memo.get().hits == 0


class _ConvChain(torch.nn.Module):
    """Conv-ReLU-Conv-ReLU-Conv: two pairs that cross-layer scaling equalizes, optionally with BatchNorm."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.first, self.second, self.last = (torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                                              torch.nn.Conv2d(8, 1, 1))
        self.norm = torch.nn.BatchNorm2d(8) if batch_norm else torch.nn.Identity()
        self.relu1, self.relu2 = torch.nn.ReLU(), torch.nn.ReLU()
        with torch.no_grad():
            for conv in (self.first, self.second, self.last):
                # Channels of very different ranges, so that scaling has something to even out.
                gains = torch.logspace(-2, 2, conv.out_channels)[:, None, None, None]
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * gains)

    def forward(self, x):
        return self.last(self.relu2(self.second(self.relu1(self.norm(self.first(x))))))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cross_layer_equalize_is_aimets_equalize_model(batch_norm, monkeypatch):
    """Without a BatchNorm the shortcut skips equalize_model's fold (a whole trace that finds nothing);
    the equalized weights are AIMET's bit for bit, with or without one."""
    from aimet_torch import cross_layer_equalization

    from lpcv_depth.backends import aimet as aimet_sim

    model = _ConvChain(batch_norm).eval()
    dummy = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    folds, fold = [], cross_layer_equalization.fold_all_batch_norms
    monkeypatch.setattr(cross_layer_equalization, "fold_all_batch_norms",
                        lambda *args, **kwargs: folds.append(1) or fold(*args, **kwargs))
    aimet_sim.cross_layer_equalize(ours, dummy)
    monkeypatch.undo()
    assert len(folds) == int(batch_norm)
    cross_layer_equalization.equalize_model(theirs, dummy_input=dummy)
    for (name, want), (_, got) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(_bits(got) if got.is_floating_point() else got,
                           _bits(want) if want.is_floating_point() else want), name
    assert not torch.equal(ours.second.weight, model.second.weight), "CLE changed nothing: the test is void"
