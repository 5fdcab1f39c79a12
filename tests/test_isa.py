"""The CPU instruction sets the kernels use: under ``make test-avx2`` (NAD_GUARD_EXPECT_ISA=avx2) the
restriction must have taken effect, or that second pass of the suite would prove nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

EXPECT = os.environ.get("NAD_GUARD_EXPECT_ISA")


@pytest.mark.skipif(EXPECT != "avx2", reason="only under `make test-avx2` (NAD_GUARD_EXPECT_ISA=avx2)")
def test_the_kernels_are_restricted_to_avx2():
    from numpy._core._multiarray_umath import __cpu_features__

    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")  # torch's own kernels
    assert not __cpu_features__.get("X86_V4") and not __cpu_features__.get("AVX512_ICL")  # NumPy's
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2" and os.environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    # oneDNN (torch's convolutions) says which instructions it dispatched to
    probe = ("import torch; c = torch.nn.Conv2d(3, 8, 3).eval()\n"
             "with torch.no_grad(): c(torch.rand(2, 3, 8, 8))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    isa = [line for line in out.splitlines() if ",isa:" in line]
    assert isa and "AVX-512" not in isa[0], isa
