"""The numerical claims hold on other kernel paths than the one this CPU picks by itself.

A CPU offers PyTorch's oneDNN its widest ISA (AVX-512, VNNI, bf16, AMX), and the predictor's engine selection
picks whichever engine and precision is fastest here. A bound tuned on one of those paths breaks on another
(issue 18), so the tests marked ``numerics`` run again in fresh pytest processes:

- ``onednn-avx2``: PyTorch's oneDNN and ATen kernels limited to AVX2 (``ONEDNN_MAX_CPU_ISA``,
  ``ATEN_CPU_CAPABILITY``), as on an AVX2-only machine: the ``numerics`` tests, those whose compared numbers
  come from PyTorch (the CAM head, ONNX against PyTorch, one DDP step, the EMA). ONNX Runtime (MLAS) and
  OpenVINO choose their ISA themselves, with no such switch: an AVX2-only machine runs their AVX2 paths.
- ``onnxruntime``, ``openvino-fp32`` (OpenVINO's inference precision hint f32: bf16 off), ``openvino-bf16``
  (hint bf16: on, only where the CPU computes bf16 natively, as the product requires): the ``engine_choice``
  tests, with ``PNEUMOSCOPE_ENGINE`` and ``PNEUMOSCOPE_PRECISION`` pinned.

The bundles they need are exported once for all of them (``PNEUMOSCOPE_TEST_BUNDLE_CACHE``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving_fixtures import BUNDLE_CACHE_ENV

TESTS = Path(__file__).resolve().parents[1]  # tests/: the marked modules live in its package folders
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
CONFIGS = {
    "onednn-avx2": (AVX2, "numerics"),
    "onnxruntime": ({"PNEUMOSCOPE_ENGINE": "onnxruntime", "PNEUMOSCOPE_PRECISION": "fp32"}, "engine_choice"),
    "openvino-fp32": ({"PNEUMOSCOPE_ENGINE": "openvino", "PNEUMOSCOPE_PRECISION": "fp32"}, "engine_choice"),
    "openvino-bf16": ({"PNEUMOSCOPE_ENGINE": "openvino", "PNEUMOSCOPE_PRECISION": "bf16"}, "engine_choice"),
}


@pytest.fixture(scope="module")
def bundle_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


def _environment(extra: dict, bundle_cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PNEUMOSCOPE_ENGINE", "PNEUMOSCOPE_PRECISION")}
    env.update(extra, **{BUNDLE_CACHE_ENV: str(bundle_cache)})
    return env


def test_the_avx2_switches_reach_pytorchs_kernels(bundle_cache):
    """Otherwise the AVX2 run would prove nothing: oneDNN reports the ISA it was limited to."""
    code = ("import torch\n"
            "print('aten', torch.backends.cpu.get_cpu_capability())\n"
            "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.no_grad():\n"
            "    torch.nn.Conv2d(64, 64, 3).eval()(torch.randn(2, 64, 32, 32))\n")
    result = subprocess.run([sys.executable, "-c", code], env=_environment(AVX2, bundle_cache), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "aten AVX2" in result.stdout, result.stdout
    isa = [line for line in result.stdout.splitlines() if ",info,cpu,isa:" in line]
    assert isa and isa[0].rsplit("isa:", 1)[1].strip() == "Intel AVX2", isa


@pytest.mark.parametrize("name", CONFIGS)
def test_the_numerical_claims_hold_on_another_kernel_path(name, bundle_cache):
    extra, marker = CONFIGS[name]
    if name == "openvino-bf16":
        from serving.engine import native_bf16

        if not native_bf16():
            pytest.skip("this CPU has no native bf16 (AVX512_BF16 or AMX): the product never serves bf16 here")
    # only the modules that mark tests so (collecting every module would cost each run a minute of imports)
    modules = sorted(str(f) for f in TESTS.rglob("test_*.py") if f"mark.{marker}" in f.read_text())
    assert modules, f"no test is marked {marker}"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                             "-W", "ignore", *modules], env=_environment(extra, bundle_cache), cwd=TESTS.parent,
                            capture_output=True, text=True, timeout=850)  # below pytest's own 900 s
    summary = result.stdout.strip().splitlines()[-1:] or ["no output"]
    assert result.returncode == 0, f"{name}: {result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary[0] and "failed" not in summary[0], summary
