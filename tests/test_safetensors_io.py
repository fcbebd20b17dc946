"""The streamed safetensors index: sharded folders with and without an index, and malformed inputs."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from quantize.errors import ModelFormatError
from quantize.safetensors_io import INDEX_NAME, SafetensorsIndex, read_header
from tiny_models import write_shards


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, generator=g),
        "c.bias": torch.arange(5, dtype=torch.int32),
        "d.weight": torch.randn(2, 2, generator=g).half(),
    }


@pytest.mark.parametrize(("shards", "index"), [(1, False), (3, True), (3, False)])
def test_reads_every_tensor_exactly(tmp_path, shards, index):
    state = _state()
    write_shards(state, tmp_path, shards=shards, index=index)
    files = SafetensorsIndex(tmp_path)
    assert sorted(files) == sorted(state)
    for key, tensor in state.items():
        got = files.get(key)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        entry = files.entry(key)
        assert entry.shape == tuple(tensor.shape) and entry.nbytes == tensor.numel() * tensor.element_size()
        # The raw bytes are the tensor's own bytes, for byte-for-byte copies.
        assert files.raw_bytes(key) == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert files.total_bytes == sum(t.numel() * t.element_size() for t in state.values())


def test_index_naming_a_missing_shard(tmp_path):
    write_shards(_state(), tmp_path, shards=2, index=True)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"index.json: lists shard model-00002-of-00002.safetensors"):
        SafetensorsIndex(tmp_path)


def test_index_naming_the_wrong_shard(tmp_path):
    write_shards(_state(), tmp_path, shards=2, index=True)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["a.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(
        ModelFormatError, match=r"'a.weight' in model-00002-of-00002.safetensors, but it is in model-00001"
    ):
        SafetensorsIndex(tmp_path)


def test_index_listing_a_tensor_no_shard_has(tmp_path):
    write_shards(_state(), tmp_path, shards=2, index=True)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=r"lists tensor 'ghost.weight'"):
        SafetensorsIndex(tmp_path)


def test_duplicate_key_across_shards(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(ModelFormatError, match=r"two.safetensors: tensor 'x' is also stored in one.safetensors"):
        SafetensorsIndex(tmp_path)


def test_truncated_file_names_the_file_and_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelFormatError, match=r"model.safetensors: tensor 'w' \(F32 \[64\]\) spans bytes 0..256"):
        read_header(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ModelFormatError, match=r"model.safetensors: unreadable safetensors header"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(ModelFormatError, match=r"not a safetensors file"):
        read_header(path)


def test_empty_folder(tmp_path):
    with pytest.raises(ModelFormatError, match=r"no \*.safetensors files"):
        SafetensorsIndex(tmp_path)
