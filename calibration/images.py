"""Image rows for VLM calibration: the model's image processor, its image tokens, and the prompt around an image.

transformers 5's `PixtralProcessor` needs torchvision, so this module uses `AutoImageProcessor` (which resolves to
the PIL Pixtral image processor) and expands the image tokens itself, as the processor would: for an image resized
to H×W and an effective patch p·m (patch size × spatial merge), `[IMG]`×(W/pm) then `[IMG_BREAK]` per patch row,
the last `[IMG_BREAK]` replaced by `[IMG_END]`. The prompt is the tokenizer's chat template with a content list
[image, text]; when the template cannot render the image placeholder, the row is image tokens + prompt text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from calibration.tokens import encode_chat, encode_text, special_id
from quantize.errors import CalibrationError

DEFAULT_IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


class ImageTokenIds(NamedTuple):
    image: int
    brk: int
    end: int


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the model takes it: pixel_values [1, 3, H, W] and its expanded image-token ids."""

    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    grid: tuple[int, int]
    token_ids: list[int]


@dataclass
class ImageRow:
    """An image row of a calibration set: the row index, the image as the vision tower takes it, and where its
    tokens sit in the row (`image_token_positions`: the [IMG] positions the image features replace; `span`: the
    whole block with the breaks and [IMG_END], end exclusive)."""

    row: int
    pixel_values: torch.Tensor
    image_sizes: list[tuple[int, int]]
    image_token_positions: torch.Tensor
    span: tuple[int, int]
    source: str = ""


@dataclass(frozen=True)
class PromptIds:
    """A tokenized prompt with one image placeholder token at index `placeholder` (`expand_prompt` expands it)."""

    ids: list[int]
    placeholder: int
    used_template: bool


@dataclass
class ImageContext:
    """What image rows need from the model folder: image processor, image token ids, patch and merge sizes."""

    image_processor: Any
    token_ids: ImageTokenIds
    token_strings: tuple[str, str, str]
    patch_size: int
    merge_size: int = 1
    model_dir: str | None = None
    processor_config: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_patch(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, tokenizer: Any | None = None) -> ImageContext:
        """Read config.json (+ processor_config.json) and preprocessor_config.json of a Llava/Pixtral/Mistral3
        folder. A model without a vision config, or a tokenizer without the image tokens, is a CalibrationError."""
        folder = Path(model_dir)
        config = _read_json(folder / "config.json", required=True)
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CalibrationError(f"model '{folder}' has no vision_config in config.json; image sources need a VLM")
        proc_cfg = _read_json(folder / "processor_config.json", required=False)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        strings = tuple(proc_cfg.get(k, d) for k, d in zip(_TOKEN_KEYS, DEFAULT_IMAGE_TOKENS, strict=True))
        ids = image_token_ids(tokenizer, strings, expected_image_id=_config_image_id(config), where=str(folder))
        patch = int(vision.get("patch_size") or proc_cfg.get("patch_size") or 0)
        if patch <= 0:
            raise CalibrationError(f"model '{folder}': vision_config has no patch_size")
        merge = int(config.get("spatial_merge_size") or proc_cfg.get("spatial_merge_size") or 1)
        return cls(
            image_processor=_load_image_processor(folder),
            token_ids=ids,
            token_strings=strings,  # type: ignore[arg-type]
            patch_size=patch,
            merge_size=merge,
            model_dir=str(folder),
            processor_config=_read_json(folder / "preprocessor_config.json", required=False),
        )

    def identity(self) -> dict[str, Any]:
        """What about the image side changes the rows (for the calibration fingerprint)."""
        blob = json.dumps(self.processor_config, sort_keys=True, default=str).encode()
        return {
            "processor": type(self.image_processor).__name__,
            "processor_config": hashlib.sha256(blob).hexdigest(),
            "token_ids": list(self.token_ids),
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
        }

    def check_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer that builds the rows must give the image tokens the ids this context expands to."""
        got = image_token_ids(tokenizer, self.token_strings, where="tokenizer")
        if got != self.token_ids:
            raise CalibrationError(
                f"the tokenizer gives the image tokens ids {tuple(got)}; the model folder {tuple(self.token_ids)}"
            )

    def process_image(self, image: Image.Image, *, max_edge: int | None = None) -> ProcessedImage:
        """Resize/normalize one image with the model's processor and expand its image tokens."""
        patch = self.effective_patch
        kwargs: dict[str, Any] = {"patch_size": {"height": patch, "width": patch}, "return_tensors": "pt"}
        if max_edge is not None:
            kwargs["size"] = {"longest_edge": int(max_edge)}
        try:
            out = self.image_processor(image.convert("RGB"), **kwargs)
        except Exception as exc:  # any processor failure is a bad calibration image to the user
            raise CalibrationError(f"image processor {type(self.image_processor).__name__} failed: {exc}") from exc
        pixel_values = _single_image(out["pixel_values"])
        height, width = (int(v) for v in torch.as_tensor(out["image_sizes"]).reshape(-1, 2)[0])
        # The processor pads a batch to its largest image; one image is never padded, but keep the check cheap.
        pixel_values = pixel_values[..., :height, :width].contiguous().float()
        ids = expand_image_tokens((height, width), patch=patch, ids=self.token_ids)
        grid = (height // patch, width // patch)
        return ProcessedImage(pixel_values=pixel_values, image_size=(height, width), grid=grid, token_ids=ids)

    def prompt_ids(self, tokenizer: Any, prompt: str, answer: str | None) -> tuple[PromptIds, str | None]:
        """Tokenized chat prompt with exactly one image placeholder; the second value says why the chat template
        was not used (None when it was)."""
        if not getattr(tokenizer, "chat_template", None):
            return self._plain_prompt(tokenizer, prompt, answer), "the tokenizer has no chat template"
        try:
            text = _render_chat(tokenizer, prompt, answer)
            ids = encode_chat(tokenizer, text)
            hits = [i for i, t in enumerate(ids) if t == self.token_ids.image]
            if len(hits) == 1:
                return PromptIds(ids=ids, placeholder=hits[0], used_template=True), None
            reason = f"the chat template renders {len(hits)} {self.token_strings[0]} tokens for one image, not 1"
        except Exception as exc:  # a template that rejects content lists (TemplateError, TypeError...)
            reason = f"the chat template cannot render an image part ({type(exc).__name__}: {exc})"
        return self._plain_prompt(tokenizer, prompt, answer), reason

    def _plain_prompt(self, tokenizer: Any, prompt: str, answer: str | None) -> PromptIds:
        bos = special_id(tokenizer, "bos")
        head = [bos] if bos is not None else []
        text = prompt + (f"\n{answer}" if answer else "")
        return PromptIds(
            ids=[*head, self.token_ids.image, *encode_text(tokenizer, text)], placeholder=len(head), used_template=False
        )


_TOKEN_KEYS = ("image_token", "image_break_token", "image_end_token")


def image_token_ids(
    tokenizer: Any,
    strings: tuple[str, ...] = DEFAULT_IMAGE_TOKENS,
    *,
    expected_image_id: int | None = None,
    where: str = "tokenizer",
) -> ImageTokenIds:
    """Ids of [IMG], [IMG_BREAK], [IMG_END] in the tokenizer; missing tokens or a config image id that disagrees
    with the tokenizer's are CalibrationErrors."""
    vocab = tokenizer.get_vocab()
    missing = [s for s in strings if s not in vocab]
    if missing:
        raise CalibrationError(f"{where}: the tokenizer lacks the image tokens {', '.join(missing)}")
    ids = ImageTokenIds(*(int(vocab[s]) for s in strings))
    if expected_image_id is not None and expected_image_id != ids.image:
        raise CalibrationError(
            f"{where}: config.json says the image token id is {expected_image_id}, "
            f"the tokenizer gives {strings[0]} id {ids.image}"
        )
    return ids


def expand_image_tokens(image_size: tuple[int, int], *, patch: int, ids: ImageTokenIds) -> list[int]:
    """Token ids for an image of `image_size` (H, W) and effective patch `patch`: per patch row, [IMG]×cols then
    [IMG_BREAK]; the last [IMG_BREAK] becomes [IMG_END]."""
    height, width = image_size
    rows, cols = height // patch, width // patch
    if rows < 1 or cols < 1 or height % patch or width % patch:
        raise CalibrationError(f"image of {height}×{width} pixels does not tile into {patch}-pixel patches")
    tokens = ([ids.image] * cols + [ids.brk]) * rows
    tokens[-1] = ids.end
    return tokens


def expand_prompt(prompt: PromptIds, image_tokens: list[int]) -> tuple[list[int], int, int]:
    """Replace the prompt's one placeholder by the image tokens; returns (ids, start, end) of the image block."""
    start = prompt.placeholder
    ids = prompt.ids[:start] + image_tokens + prompt.ids[start + 1 :]
    return ids, start, start + len(image_tokens)


def _render_chat(tokenizer: Any, prompt: str, answer: str | None) -> str:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    ]
    if answer:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answer)


def _single_image(pixel_values: Any) -> torch.Tensor:
    if isinstance(pixel_values, list):  # some processor versions return one tensor per image
        pixel_values = pixel_values[0]
    tensor = torch.as_tensor(pixel_values)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[0] != 1:
        raise CalibrationError(f"image processor returned pixel_values of shape {tuple(tensor.shape)}, not [1,3,H,W]")
    return tensor


def _config_image_id(config: dict[str, Any]) -> int | None:
    value = config.get("image_token_index", config.get("image_token_id"))
    return int(value) if value is not None else None


def _load_image_processor(folder: Path) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except Exception as exc:  # missing/unknown preprocessor_config.json
        raise CalibrationError(f"model '{folder}': cannot load its image processor ({exc})") from exc


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CalibrationError(f"'{path}' is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"'{path}' is not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
