"""Bad checkpoints stop with one clear error naming the file and the tensor."""
import datetime
import json
import shutil

import pytest
import torch

from qmoe.checkpoint import CheckpointError, CheckpointReader
from qmoe.models.registry import load as load_model


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


# Paths read from a model directory stay inside it (issue 11, item 10).

def _index_pointing_at(d, target: str):
    """Point the first tensor of d's safetensors index at `target`, a real copy of its shard placed there."""
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = sorted(index["weight_map"].items())[0]
    index["weight_map"][name] = target
    index_path.write_text(json.dumps(index))
    return index_path, name, d / shard


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_an_index_naming_a_file_outside_the_model_dir_is_refused(tiny_ckpt, tmp_path, how):
    d = _copy(tiny_ckpt, tmp_path / "c")
    secret = tmp_path / "secret.safetensors"
    target = "../secret.safetensors" if how == "dotdot" else str(secret)
    index_path, name, shard = _index_pointing_at(d, target)
    shutil.copy(shard, secret)  # a readable safetensors file holding the tensor: today it would be read
    expected = (f"{index_path}, tensor '{name}': shard '{target}' resolves to {secret.resolve()}, outside the model "
                f"directory {d.resolve()}: refused")
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(d)
    assert str(e.value) == expected


def test_a_bin_index_naming_a_file_outside_the_model_dir_is_refused(tiny_mixed_bin, tmp_path):
    d = _copy(tiny_mixed_bin, tmp_path / "c")
    index_path = d / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    name, shard = sorted(index["weight_map"].items())[0]
    shutil.copy(d / shard, tmp_path / "x.bin")
    index["weight_map"][name] = "sub/../../x.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin\.index\.json, tensor '{name}': shard "
                                              r"'sub/\.\./\.\./x\.bin' resolves to .*/x\.bin, outside the model"):
        load_model(d)


def test_a_shard_symlink_leading_out_is_refused(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json, tensor '.*': shard "
                                              rf"'{shard.name}' resolves to {outside}, outside the model directory"):
        CheckpointReader(d)


def test_a_single_file_checkpoint_symlinked_from_outside_is_refused(tmp_path):
    from hf_fixtures import make_hf_model, save_checkpoint

    src = save_checkpoint(make_hf_model("odd"), tmp_path / "src", "safetensors")
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"c/model\.safetensors: 'model\.safetensors' resolves to "
                                              rf"{src / 'model.safetensors'}, outside the model directory"):
        CheckpointReader(d)
    (d / "model.safetensors").unlink()
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(src / "config.json")
    with pytest.raises(CheckpointError, match=r"c/config\.json: 'config\.json' resolves to .*, outside the model"):
        load_model(d)


def test_symlinks_inside_the_model_dir_and_the_hub_cache_layout_are_read(tiny_ckpt, tmp_path):
    """Links that stay inside are fine, and so is the Hugging Face hub cache: snapshots/<rev>/* -> ../../blobs/*."""
    ref = load_model(tiny_ckpt)
    repo = tmp_path / "models--google--switch-tiny"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(tiny_ckpt.iterdir()):
        shutil.copy(f, repo / "blobs" / f"sha-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    model = load_model(snap)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))

    d = _copy(tiny_ckpt, tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    (d / "real").mkdir()
    shard.rename(d / "real" / shard.name)
    shard.symlink_to(f"real/{shard.name}")
    model = load_model(d)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    # A directory beside snapshots/ that is not the repo's blobs stays outside.
    (snap / "config.json").unlink()
    (repo / "other").mkdir()
    shutil.copy(tiny_ckpt / "config.json", repo / "other" / "config.json")
    (snap / "config.json").symlink_to("../../other/config.json")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_model(snap)


def test_model_file(tmp_path):
    import os

    from qmoe.checkpoint import model_file

    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    assert model_file(d, "tokenizer.json") == (d / "tokenizer.json").resolve()
    assert model_file(d, "spiece.model") is None
    (tmp_path / "secret").write_text("password")
    (d / "spiece.model").symlink_to(tmp_path / "secret")
    with pytest.raises(CheckpointError) as e:
        model_file(d, "spiece.model")
    assert str(e.value) == (f"{d / 'spiece.model'}: 'spiece.model' resolves to {tmp_path / 'secret'}, outside the "
                            f"model directory {d}: refused")
    (d / "dangling").symlink_to(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        model_file(d, "dangling")  # leads out even though nothing is there
    (d / "special_tokens_map.json").mkdir()
    with pytest.raises(CheckpointError, match=r"special_tokens_map\.json: 'special_tokens_map\.json' is not a regular"):
        model_file(d, "special_tokens_map.json")
    os.mkfifo(d / "tokenizer_config.json")  # reading a FIFO would hang
    with pytest.raises(CheckpointError, match="is not a regular file"):
        model_file(d, "tokenizer_config.json")
    (d / "loop").symlink_to(d / "loop")
    with pytest.raises(CheckpointError, match="'loop' cannot be resolved"):
        model_file(d, "loop")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        model_file(d, "/etc/passwd")


def test_a_tokenizer_linked_from_outside_is_refused(tmp_path):
    from qmoe.tokenizer import load_tokenizer

    d = tmp_path / "m"
    d.mkdir()
    (tmp_path / "secret.json").write_text('{"not": "a tokenizer"}')
    (d / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(CheckpointError, match=r"m/tokenizer\.json: 'tokenizer\.json' resolves to .*secret\.json, "
                                              r"outside the model directory"):
        load_tokenizer(d, {"vocab_size": 32128})
