"""Engines: exllamav2 is never imported at start-up, and asking for it without CUDA is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quantize.engines import ENGINES, exllamav2_installed, get_engine, import_exllamav2
from quantize.errors import CudaRequiredError, Exl2Error


def test_no_package_imports_exllamav2():
    code = (
        "import sys, quantize.adapters, quantize.modeling, quantize.vision, quantize.engines, calibration, "
        "pipeline.cli, pipeline.default_model, pipeline.calibrate; "
        "print('exllamav2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exllamav2_is_installed_and_found_without_import():
    assert exllamav2_installed()
    assert "exllamav2" not in sys.modules


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the import would succeed")
def test_exllamav2_without_cuda_says_so():
    with pytest.raises(
        CudaRequiredError, match=r"measurement needs a CUDA GPU \(torch .* sees none\); use --engine torch"
    ):
        import_exllamav2(purpose="measurement")
    assert "exllamav2" not in sys.modules


def test_engine_registry():
    assert get_engine("torch").needs_cuda is False and get_engine("exllamav2").needs_cuda is True
    assert set(ENGINES) == {"torch", "exllamav2"}
    with pytest.raises(Exl2Error, match=r"unknown engine 'tensorrt' \(known: torch, exllamav2\)"):
        get_engine("tensorrt")
