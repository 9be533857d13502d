"""Bad checkpoints stop with one clear error naming the file and the tensor."""
import datetime
import json
import shutil

import pytest
import torch

from qmoe.checkpoint import CheckpointError, CheckpointReader, load_model


def test_bad_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["decoder.block.1.layer.0.SelfAttention.k.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"decoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight.*missing"):
        load_model(d)


def test_truncated_safetensors_shard_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert shard.name in str(e.value)


def test_truncated_bin_shard_is_named(tiny_mixed_bin, tmp_path):
    d = _copy(tiny_mixed_bin, tmp_path / "c")
    shard = sorted(d.glob("pytorch_model-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable torch shard") as e:
        load_model(d)
    assert shard.name in str(e.value)


def test_bin_shard_with_a_pickled_object_is_refused(tiny_mixed_bin, tmp_path):
    """weights_only=True: a shard holding anything but tensors is not unpickled."""
    d = _copy(tiny_mixed_bin, tmp_path / "c")
    shard = sorted(d.glob("pytorch_model-*.bin"))[0]
    sd = torch.load(shard, weights_only=True)
    sd["evil"] = datetime.date(2020, 1, 1)  # an arbitrary class: not on the weights-only allow list
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match="unreadable torch shard"):
        load_model(d)


def test_wrong_shape_is_named(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_ckpt, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "encoder.final_layer_norm.weight"
    shard = d / index["weight_map"][name]
    sd = load_file(shard)
    sd[name] = torch.ones(7)
    save_file(sd, shard)
    with pytest.raises(CheckpointError, match=r"final_layer_norm.*shape \(7,\)"):
        load_model(d)


def test_missing_shard_file_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="shard file is missing") as e:
        load_model(d)
    assert victim.name in str(e.value)
