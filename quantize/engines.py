"""The engines that run the EXL2 algorithm: `torch` (ours, CPU or CUDA) and `exllamav2` (CUDA only).

exllamav2 compiles its CUDA extension when imported, and on a machine without CUDA that import fails after a
long build attempt; so it is imported only here, only when its engine is asked for, and only after checking that
CUDA is present. Everything else in the project works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from quantize.errors import CudaRequiredError, Exl2Error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    name: str
    needs_cuda: bool
    summary: str


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("torch", False, "our PyTorch implementation of EXL2, on CPU or CUDA; bit-compatible files"),
        Engine("exllamav2", True, "exllamav2's own conversion and inference (CUDA GPU required)"),
    )
}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise Exl2Error(f"unknown engine '{name}' (known: {', '.join(ENGINES)})")
    return ENGINES[name]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """CUDA when present, else CPU; the choice is logged with its reason."""
    if cuda_available():
        log.info("device: cuda:0 (%s)", torch.cuda.get_device_name(0))
        return torch.device("cuda:0")
    log.info("device: cpu (torch %s sees no CUDA GPU)", torch.__version__)
    return torch.device("cpu")


def resolve_device(name: str) -> str:
    """A device name as given (cpu, cuda, cuda:N), with `auto` resolved by `default_device`."""
    return str(default_device()) if name == "auto" else name


def exllamav2_installed() -> bool:
    """Whether the exllamav2 package is installed, found without importing it."""
    return importlib.util.find_spec("exllamav2") is not None


def import_exllamav2(*, purpose: str = "the exllamav2 engine") -> ModuleType:
    """Import exllamav2 for `purpose`, or say in one line why it cannot run here."""
    if not exllamav2_installed():
        raise CudaRequiredError(f"{purpose} needs the exllamav2 package: pip install exllamav2==0.3.2")
    if not cuda_available():
        raise CudaRequiredError(
            f"{purpose} needs a CUDA GPU (torch {torch.__version__} sees none); use --engine torch on this machine"
        )
    return importlib.import_module("exllamav2")
