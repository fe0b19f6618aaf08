#!/usr/bin/env bash
# The prepared accelerator check, run on a lent GPU machine from the repository root.
# One run takes at most 5 minutes (the timeouts below add up to 285 s), so a rerun fits
# in the same lease after the machine's start.  Bits first, then timings:
#   1. benchmarks/device_bits.py: a CPU-vs-device bit table of every method;
#   2. the gpu-marked tests: the device bits against the CPU reference (tests/test_devices.py,
#      tests/test_concurrent_gpu.py), the triton forward in every casting mode with the fused
#      residual add (tests/test_triton.py, tests/test_triton_semantics.py), the Triton
#      backward's dx and dW (tests/test_triton_backward.py), the exact weight gradient's state
#      (tests/test_triton_exact_dw.py), CUDA graph capture (tests/test_ops_tracing.py);
#   3. benchmarks/gpu_bench.py: the triton forward's, backward's and exact dW's bits against
#      the CPU, then interleaved timings with few rounds (the forward against F.rms_norm eager
#      and torch.compile, the fused residual add, forward+backward against torch.nn.RMSNorm and
#      Liger-Kernel where it is installed, the exact against the float weight gradient).
# Every step writes under $OUT; a step cut by its timeout keeps what it printed.  The CPU
# suite is not run here: it runs anywhere.  Test-only wheels the image lacks
# (pytest-asyncio, trio and its deps) may travel in .whl/ and are installed first.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/device.txt"
# The triton tests skip without triton (CUDA wheels of torch bring it); say which one ran.
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$out/device.txt"
# TRITON_INTERPRET must not leak in from the caller: the device tests need compiled kernels.
unset TRITON_INTERPRET
# 1. The cross-device bit table (exit 1 on a difference where none is expected).
timeout 30 python3 benchmarks/device_bits.py 2>&1 | tee "$out/device_bits.md"
# 2. The gpu-marked tests.  Each dtype and setting compiles its own Triton kernel (the
#    casting-mode and residual tests 24, the backward's about 20, the exact dW's about 9),
#    which is most of this step's time.
timeout 140 python3 -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
# 3. Bits again on the benchmark shapes, then the timing tables (3 rounds of 5 calls each:
#    enough for a median; torch.compile's first calls take much of this step).
timeout 115 python3 benchmarks/gpu_bench.py --rounds 3 --inner 5 2>&1 | tee "$out/gpu_bench.md"
