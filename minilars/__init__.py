"""minilars."""
import os

# OpenBLAS's worker threads spin for 2^28 cycles (~0.1 s) after every matmul before
# they sleep. A training step interleaves numpy matmuls with the numba backend's
# threaded kernels (attention, RMSNorm, SwiGLU), so each kernel started on cores a
# spinning BLAS thread still held: measured here, 20 matmuls each followed by a
# 50 ms pause burned 1.1-1.2 s of CPU with the default and 0.55 s with a timeout of
# 2^4 cycles, and a LARS step at T = 2048 on numba took 23.5 s instead of 28.7-30.6
# (docs/speed.md). The variable is read when OpenBLAS loads, i.e. when numpy is first
# imported, so this acts only if minilars is imported first (the `minilars`
# command, `python -m minilars...`); a value you set yourself is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
