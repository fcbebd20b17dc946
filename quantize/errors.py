"""Typed errors of the whole pipeline.

The library raises these with the numbers and the file in the message and, where there is one, the remedy.
Only the CLI turns them into exit codes and one-line messages.
"""

from __future__ import annotations


class Exl2Error(Exception):
    """Base of every error the pipeline reports to a user as one line."""


class ModelFormatError(Exl2Error):
    """A model folder is unreadable, incomplete, or its tensors contradict its config.json."""


class UnsupportedArchitectureError(Exl2Error):
    """The model's architecture is not one the pipeline handles."""


class CalibrationError(Exl2Error):
    """A calibration source is missing, malformed, or too small for the rows asked for."""


class AssetError(Exl2Error):
    """A packaged asset (the SmolLM2 wheel, exllamav2's calibration files) cannot be found or fetched."""


class CudaRequiredError(Exl2Error):
    """Something that only runs on a CUDA GPU (the exllamav2 engine) was asked for on a machine without one."""


class EvalError(Exl2Error):
    """An evaluation set is missing, malformed, overlaps the calibration text, or does not fit the model."""


class ReportError(Exl2Error):
    """A report file is missing or does not have the columns of a report."""


class RecipeError(Exl2Error):
    """A recipe file is unreadable, includes itself, or does not validate."""
