"""Pages handed back to the OS (backends/resident.py): numba's LLVM code pages after
each compile or cache load, and compiling still works afterwards."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")
if not sys.platform.startswith("linux"):
    pytest.skip("madvise on /proc/self/smaps mappings is Linux only", allow_module_level=True)

SCRIPT = textwrap.dedent("""
    import numpy as np
    from minilars.backends.resident import clean_mappings

    def llvm_resident_kib():
        # Rss of libllvmlite.so's clean mappings, from /proc/self/smaps
        starts = {start for start, _ in clean_mappings("libllvmlite.so")}
        total, current = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                current = int(head[0].split("-")[0], 16) in starts
            elif current and head[0] == "Rss:":
                total += int(head[1])
        return total, len(starts)

    import numba
    before, n_maps = llvm_resident_kib()
    from minilars.backends.numba_backend import NumbaBackend, warmup
    from minilars.backends import numba_kernels as K
    warmup(("float32",))
    after_warmup, _ = llvm_resident_kib()

    @numba.njit(cache=False)
    def fresh(x):  # a function no cache holds: LLVM compiles it now
        return np.sqrt(x) * 2.0 + 1.0

    x = np.arange(1.0, 6.0)
    assert np.array_equal(fresh(x), np.sqrt(x) * 2.0 + 1.0)
    after_compile, _ = llvm_resident_kib()
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    y, rstd = NumbaBackend().rmsnorm_forward(a, w, 1e-5)
    ref = a / np.sqrt((a.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5) * w
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-6)
    print(n_maps, before, after_warmup, after_compile, K.RELEASE_COMPILER.releases)
""")


def test_llvm_code_pages_are_released_and_compiling_still_works():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]  # a dropped written page (RELRO) would crash the compile
    n_maps, before, after_warmup, after_compile, releases = map(int, out.stdout.split()[-5:])
    assert n_maps >= 2  # code and read-only data
    assert before > 20_000  # importing numba brings tens of MiB of LLVM in (KiB)
    assert releases >= 2  # after the warm-up's loads and after the fresh compile
    # a few pages may come back between the release and the read (the listener's own return path)
    assert after_warmup < before / 20 and after_compile < before / 20


def test_release_of_a_library_not_loaded_does_nothing():
    from minilars.backends.resident import clean_mappings, release_library_pages

    assert clean_mappings("no-such-library.so") == []
    assert release_library_pages("no-such-library.so") == 0
