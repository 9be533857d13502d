"""The synthetic checkpoint generator: the published sharded layout, loadable, deterministic, the asked shapes."""
from qmoe.checkpoint import read_tensor
from qmoe.models.registry import build, load
from qmoe.models.switch import FAMILY as SWITCH
from qmoe.synth import main, synth_config, write_synthetic


def test_synthetic_checkpoint_loads_with_the_asked_shapes(tmp_path):
    hf = synth_config(blocks=2, experts=3, d_model=24, d_ff=40, num_heads=2, d_kv=8)
    d = write_synthetic(tmp_path / "s", hf, seed=1, progress=lambda *_: None)
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("model-*.safetensors"))) == 5
    model, reader, _ = build(d)
    assert model.cfg == SWITCH.config(hf) and model.cfg.num_experts == 3 and model.cfg.d_ff == 40
    w = SWITCH.read_expert(lambda n: read_tensor(reader, n), reader, "decoder.block.1", 2)
    assert w["wi"].shape == (40, 24) and w["wo"].shape == (24, 40)
    assert abs(float(w["wi"].std()) - 24 ** -0.5) < 0.05  # N(0, 1/fan_in)
    model = load(d)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_deterministic_in_seed(tmp_path):
    args = ["--blocks", "1", "--experts", "2", "--dim", "d_model=16", "--dim", "d_ff=24", "--dim", "num_heads=2",
            "--dim", "d_kv=8"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    assert main(["--out", str(tmp_path / "c"), "--seed", "1", *args]) == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    shard = "model-00002-of-00003.safetensors"
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()


def test_generation_holds_one_tensor_not_a_block(tmp_path):
    """A block of 16 experts (128 MB in bf16) is written with far less memory than the block: tensor by tensor."""
    from qmoe.compression.memory import PeakMonitor

    hf = synth_config(blocks=1, experts=16, d_model=512, d_ff=4096, num_heads=2, d_kv=8)
    mon = PeakMonitor(interval=0.005)
    base = mon.sample()
    write_synthetic(tmp_path / "s", hf, progress=lambda *_: None)
    grown = mon.stop() - base
    block = 16 * 2 * 512 * 4096 * 2
    assert grown < block / 2, f"grew by {grown / 2**20:.0f} MiB for a {block / 2**20:.0f} MiB block"
