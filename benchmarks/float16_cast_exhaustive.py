"""The numba backend's float32 -> float16 cast against NumPy's on all 2^32 float32
bit patterns (numba_kernels.single_to_half, the activation store's float16 copies).

The tests check rounding boundaries and a stride through the patterns; this
checks every one, in chunks of 2^25, and prints how many results differ, apart
from NaN payloads (NaN must stay NaN; its payload bits may differ). Run it once on
a new platform (an ARM board, say): about 3 CPU-minutes on this project's x86
machine, where it found no difference at all.

    python benchmarks/float16_cast_exhaustive.py
"""
from __future__ import annotations

import time

import numpy as np


def main() -> int:
    from minilars.backends import numba_kernels as K

    chunk = 1 << 25
    started = time.perf_counter()
    wrong = nan_payloads = 0
    out = np.empty(chunk, np.uint16)
    for first in range(0, 1 << 32, chunk):
        bits = np.arange(first, first + chunk, dtype=np.uint64).astype(np.uint32)
        with np.errstate(all="ignore"):
            expected = bits.view(np.float32).astype(np.float16).view(np.uint16)
        K.single_to_half(bits, out)
        differ = out != expected
        if differ.any():
            nan_in = np.isnan(bits.view(np.float32))
            nan_payloads += int((differ & nan_in).sum())
            wrong += int((differ & ~(nan_in & np.isnan(out.view(np.float16)))).sum())
    print(f"all 2^32 float32 patterns: {wrong} results differ from NumPy's, {nan_payloads} NaNs differ in payload "
          f"({time.perf_counter() - started:.0f} s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
