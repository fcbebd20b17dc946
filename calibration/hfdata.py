"""Loading Hugging Face datasets for calibration with the real `datasets` code.

A folder written by `Dataset.save_to_disk`/`DatasetDict.save_to_disk` is read with `load_from_disk`; anything else
(a folder of jsonl/parquet/csv data files, or a hub name) goes through `load_dataset`. A DatasetDict is narrowed to
the requested split, else "train", else its only split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.spec import SourceSpec

log = logging.getLogger(__name__)

# Files `save_to_disk` writes at the top of its folder (a Dataset, or a DatasetDict).
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS)


def load_hf_dataset(name: str, *, config_name: str | None, split: str | None) -> Any:
    """The `datasets.Dataset` for (name, config, split); errors become one-line CalibrationErrors."""
    import datasets

    local = Path(name).expanduser()
    try:
        if is_saved_dataset(local):
            if config_name:
                log.warning("hf source '%s' is a save_to_disk folder: config '%s' is ignored", name, config_name)
            loaded = datasets.load_from_disk(str(local))
        elif split is not None:
            loaded = datasets.load_dataset(str(local) if local.exists() else name, config_name, split=split)
        else:
            loaded = datasets.load_dataset(str(local) if local.exists() else name, config_name)
    except CalibrationError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(f"hf dataset '{name}' cannot be loaded: {message}") from exc
    return _pick_split(loaded, name, split)


def _pick_split(loaded: Any, name: str, split: str | None) -> Any:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if not isinstance(loaded, datasets.DatasetDict):
        raise CalibrationError(f"hf dataset '{name}' loaded as {type(loaded).__name__}, not a Dataset")
    splits = list(loaded)
    if split is not None:
        if split not in loaded:
            raise CalibrationError(f"hf dataset '{name}' has no split '{split}' (splits: {', '.join(splits)})")
        return loaded[split]
    if "train" in loaded:
        return loaded["train"]
    if len(splits) == 1:
        log.info("hf dataset '%s': no 'train' split; using its only split '%s'", name, splits[0])
        return loaded[splits[0]]
    raise CalibrationError(f"hf dataset '{name}' has splits {', '.join(splits)}; name one with @SPLIT")


def dataset_identity(ds: Any, *, name: str, config_name: str | None, split: str | None) -> dict[str, Any]:
    """Name, config, split and the dataset's own content fingerprint."""
    return {
        "name": name,
        "config": config_name,
        "split": split,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "num_rows": len(ds),
        "columns": list(ds.column_names),
    }


class HfDatasetRef:
    """A source's dataset, loaded once on first use (identity() and build() both need it)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self._dataset: Any = None

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            spec = self.spec
            self._dataset = load_hf_dataset(spec.name or "", config_name=spec.config_name, split=spec.split)
        return self._dataset

    def identity(self) -> dict[str, Any]:
        spec = self.spec
        return dataset_identity(self.dataset, name=spec.name or "", config_name=spec.config_name, split=spec.split)
