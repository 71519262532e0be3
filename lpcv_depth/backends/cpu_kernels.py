"""numba-compiled CPU kernels behind the exact fast paths of aimet_fast.py.

torch computes a histogram or a fake quantization as five or six passes over memory, each with its
own temporary tensor; these do the same float32 arithmetic, operation by operation, in one pass.
Only aimet_fast imports this module, and it keeps its torch arithmetic where numba is missing.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["histogram", "quantize_dequantize"]

# Positions are computed a block at a time (a loop the compiler vectorizes), then counted.
_BLOCK = 4096
# torch's fake quantization casts the scaled value to int64; at or beyond this the cast is undefined.
_INT64_SAFE = np.float32(2.0 ** 62)


@numba.njit(parallel=True, nogil=True, cache=True)
def histogram(values, left, right, bins, chunks):
    """Counts of the finite 1-D float32 `values` in `bins` linear bins over [left, right], as
    torch.histc counts them on CPU: the bin is (x - left) * bins / (right - left) in float32,
    truncated, the right edge falls in the last bin, and values outside are not counted. `chunks`
    slices are counted in parallel, then summed."""
    size = values.size
    counts = np.zeros((chunks, bins + 1), dtype=np.int64)
    width = right - left
    scale = np.float32(bins)
    last = bins - 1
    for chunk in numba.prange(chunks):
        start, stop = size * chunk // chunks, size * (chunk + 1) // chunks
        positions = np.empty(_BLOCK, dtype=np.int32)
        row = counts[chunk]
        for block in range(start, stop, _BLOCK):
            length = min(_BLOCK, stop - block)
            for i in range(length):
                value = values[block + i]
                # Clamped first so that the float-to-int conversion is defined for every lane.
                position = np.int32((min(max(value, left), right) - left) * scale / width)
                positions[i] = min(position, last) if value >= left and value <= right else bins
            for i in range(length):
                row[positions[i]] += 1
    return counts[:, :bins].sum(axis=0)


@numba.njit(parallel=True, nogil=True, cache=True)
def quantize_dequantize(values, out, inverse_step, zero_point, qmin, qmax, step, chunks):
    """out = (clamp(rint(x * inverse_step) + zero_point, qmin, qmax) - zero_point) * step, in float32
    with rint rounding ties to even (1-D arrays, every argument float32 except `chunks`). False,
    with `out` undefined, if some x * inverse_step is not finite or too large for an int64."""
    size = values.size
    valid = np.ones(chunks, dtype=np.bool_)
    for chunk in numba.prange(chunks):
        start, stop = size * chunk // chunks, size * (chunk + 1) // chunks
        unsafe = False
        for i in range(start, stop):
            scaled = values[i] * inverse_step
            unsafe |= not abs(scaled) < _INT64_SAFE  # true for NaN too
            level = np.rint(scaled) + zero_point
            out[i] = (min(max(level, qmin), qmax) - zero_point) * step
        valid[chunk] = not unsafe
    return valid.all()
