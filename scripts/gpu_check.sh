#!/usr/bin/env bash
# The prepared accelerator check, run on a lent GPU machine from the repository root:
# the gpu-marked tests (the triton executor's included: its device bits against the
# CPU reference, in casting modes llama and gemma with the fused residual add too:
# tests/test_triton_semantics.py; the Triton backward's dx and dW against the CPU's:
# tests/test_triton_backward.py; the exact weight gradient's state against the CPU's:
# tests/test_triton_exact_dw.py), a CPU-vs-device bit comparison of every method, the
# triton forward's and backward's bits (y and h of the residual plans; dx and dW; the
# exact dW state and weight.grad) and interleaved timings, the fused residual add and
# forward+backward against torch.nn.RMSNorm (and Liger-Kernel where it is installed)
# and the exact against the float weight gradient included (benchmarks/gpu_bench.py),
# and the rest of the suite on that machine's torch.
# The timeouts add up to under 10 minutes.  Test-only wheels the image lacks (pytest-asyncio,
# trio and its deps) travel in .whl/ (see docs/performance.md "GPU check").
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
# Each dtype and setting compiles its own kernel (the residual and casting-mode tests add 24,
# the backward's 9 tests about 20 more, the exact dW's 3 about 9).
timeout 240 python3 -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
timeout 45 python3 benchmarks/device_bits.py 2>&1 | tee "$out/device_bits.md"
# Bits first (exit 1 on a difference; the llama and gemma residual plans compare y and h),
# then the timing tables; torch.compile's first calls (forward, then forward+backward)
# take most of the budget (the exact dW's bits and timings about 20 s more).
timeout 220 python3 benchmarks/gpu_bench.py --rounds 7 --inner 10 2>&1 | tee "$out/gpu_bench.md"
timeout 80 python3 -m pytest -q -p no:cacheprovider -m "not gpu and not slow" \
    --ignore=tests/test_distributed.py 2>&1 | tail -40 | tee "$out/suite_tail.log"
