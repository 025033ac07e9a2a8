"""The pipeline's stages and the pieces they share (docs/stages.md, docs/training.md)."""

import os
import platform

# The same bits on x86-64 CPUs with and without AVX-512. torch (ATen) and oneDNN pick their
# CPU kernels by the instruction set they find, and an AVX-512 kernel rounds its sums in another
# order than an AVX2 one: the default MNIST run trained to 0.965 test accuracy on an AVX-512
# EPYC and to 0.974 on an AVX2 one, from the same seed and code, and to 0.974 on the AVX-512 one
# with these two set (every metric equal). Not every CPU model, though: a third EPYC, AVX2
# only, trains to other bits with them set (docs/training.md). Set before torch is imported
# (every stage's process imports this package first); a value the user exported wins, e.g.
# ATEN_CPU_CAPABILITY=avx512 for speed over portability.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
