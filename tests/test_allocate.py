"""A bit budget (`--bits`): the allocator's choice, the mixed group files it writes (exact round trips, the header
bound), and runs of a family under a budget (within it, loadable, resumable, refused where it cannot hold)."""
import itertools
import json
import random
import struct

import pytest
import torch

import qmoe
from qmoe import compress as compress_cli
from qmoe.checkpoint import CheckpointError
from qmoe.compression.allocate import EXACT, BudgetError, Option, _hull, choose, header_bound
from qmoe.compression.compressor import compress_model
from qmoe.compression.settings import CompressConfig
from qmoe.format.directory import GroupReader, write_group
from qmoe.format.packed import QuantizedMatrix
from qmoe.quant import Scheme, rtn
from hf_fixtures import next_token_loss
from test_family_compress import SPEC, _quiet, _save, _val_ids

T, T64, I2, I3, I4 = Scheme.TERNARY, Scheme.TERNARY_G64, Scheme.INT2, Scheme.INT3, Scheme.INT4


def _brute(options: dict, budget: int) -> float:
    """The least total error of any choice within the budget."""
    keys = sorted(options)
    best = float("inf")
    for pick in itertools.product(*(options[k] for k in keys)):
        if sum(o.bytes for o in pick) <= budget:
            best = min(best, sum(o.error for o in pick))
    return best


def _total(options: dict, chosen: dict) -> tuple[int, float]:
    picked = [next(o for o in options[k] if o.scheme is s) for k, s in chosen.items()]
    return sum(o.bytes for o in picked), sum(o.error for o in picked)


def test_the_hull_keeps_the_options_worth_a_byte():
    a, b, c, d = Option(T, 10, 9.0), Option(I2, 20, 8.5), Option(I3, 30, 2.0), Option(I4, 40, 2.5)
    # b is above the segment a -> c (it removes less error per byte than c does), d costs more for more error.
    assert _hull([d, c, b, a]) == [a, c]
    assert _hull([a, Option(I2, 10, 9.0)]) == [a]  # equal options: the first by (bytes, error) stays


def test_the_choice_holds_the_budget_and_matches_the_optimum_on_random_groups():
    """On random groups of four matrices, five grids each: every greedy choice is within its budget, the cheapest at
    the floor, the least error when the budget holds everything, and the exhaustive choice (what so few combinations
    get) is the optimum; when every matrix's options are convex with one step size, the greedy is the optimum
    itself."""
    rng = random.Random(0)
    for trial in range(40):
        options = {}
        for k in range(4):
            sizes = sorted(rng.sample(range(10, 200), 5))
            errors = sorted((rng.uniform(0, 10) for _ in range(5)), reverse=True)
            options[(k, "m")] = [Option(s, b, e) for s, b, e in zip((T, T64, I2, I3, I4), sizes, errors)]
        floor = sum(min(o.bytes for o in v) for v in options.values())
        top = sum(max(o.bytes for o in v) for v in options.values())
        for budget in (floor, (floor + top) // 2, top):
            used, err = _total(options, choose(options, budget, exact=0))
            assert used <= budget
            assert err >= _brute(options, budget) - 1e-9
            used, err = _total(options, choose(options, budget))
            assert used <= budget and err == pytest.approx(_brute(options, budget))
        for exact in (0, EXACT):
            assert choose(options, floor, exact) == {k: min(v, key=lambda o: o.bytes).scheme
                                                     for k, v in options.items()}
            assert _total(options, choose(options, top, exact))[1] == pytest.approx(sum(min(o.error for o in v)
                                                                                        for v in options.values()))
            with pytest.raises(BudgetError):
                choose(options, floor - 1, exact)
    for trial in range(20):  # convex, one step size: the greedy's choice is optimal
        options = {(k, "m"): [Option(s, 10 * (i + 1), e) for i, (s, e) in enumerate(zip(
            (T, I2, I3, I4), itertools.accumulate([rng.uniform(50, 100)] + [-rng.uniform(0, 10) for _ in range(3)])))]
            for k in range(3)}
        for k, v in options.items():  # make each matrix's error decrements shrink (a convex curve)
            steps = sorted((v[i].error - v[i + 1].error for i in range(3)), reverse=True)
            options[k] = [Option(v[0].scheme, v[0].bytes, v[0].error)] + [
                Option(v[i + 1].scheme, v[i + 1].bytes, v[0].error - sum(steps[:i + 1])) for i in range(3)]
        for budget in range(30, 121, 10):
            assert _total(options, choose(options, budget, exact=0))[1] == pytest.approx(_brute(options, budget))


def _matrices(seed: int):
    """Three experts of two kinds on five grids (round-to-nearest of random weights), odd shapes."""
    g = torch.Generator().manual_seed(seed)
    grids = [T, T64, I2, Scheme.INT3_G64, I4]
    out = {}
    for j in range(3):
        out[j] = {}
        for i, (kind, shape) in enumerate((("gate", (37, 131)), ("down", (131, 37)))):
            codes, p = rtn(torch.randn(1, *shape, generator=g), grids[(2 * j + i) % 5])
            out[j][kind] = QuantizedMatrix(codes[0], p.select(0))
    return out


def test_a_mixed_group_file_round_trips_and_its_header_is_bounded(tmp_path):
    experts = _matrices(0)
    rel, entries = write_group(tmp_path, "model.layers.1", 0, 3, experts, None)
    path = tmp_path / rel
    shapes = {"gate": (37, 131), "down": (131, 37)}
    reader = GroupReader(tmp_path, "model.layers.1", 0, 3, shapes, None)
    for j, qe in experts.items():
        got = reader.weights(j)
        for kind, qm in qe.items():
            assert torch.equal(got[kind], qm.values()), (j, kind)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["qmoe"])
    assert meta["scheme"] == "mixed" and meta["grids"]["expert_1.gate"] == experts[1]["gate"].params.scheme.value
    bound = header_bound({f"expert_{j}.{k}": shapes[k] for j in range(3) for k in shapes})
    assert 8 + n <= bound
    data = sum(qm.stored_bytes(coded=True) for qe in experts.values() for qm in qe.values())
    assert len(raw) == 8 + n + data  # every byte is the header's or a stored tensor's
    # A grid the metadata does not name is one line naming the file and the matrix.
    meta["grids"]["expert_2.down"] = "int9"
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={"qmoe": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="expert_2.down.*no grid named for it"):
        GroupReader(tmp_path, "model.layers.1", 0, 3, shapes, None).weights(2)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Experts of 128 x 192 (a matrix's header entries, bounded at about 0.2 bits a weight at this size, are in the budget)."""
    return _save("qwen3_moe", tmp_path_factory.mktemp("budget"), hidden_size=128, moe_intermediate_size=192)


def test_a_run_under_a_bit_budget_holds_it_and_loads(qwen, tmp_path):
    """--bits 2.5 over the default grids on the tiny Qwen3-MoE (groups of 4): every group file within its share,
    so the run within 2.5 bits a weight; several grids chosen, each recorded in config.json as its file names it;
    qmoe.load gives the walk's loss; the exports refuse it in one line."""
    cfg = CompressConfig(bits=2.5, group_size=4)
    s = compress_model(qwen, tmp_path / "o", cfg, SPEC, progress=_quiet)
    assert s["scheme"] == "mixed" and s["bits_per_param_experts"] <= 2.5
    hf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert hf["qmoe"]["scheme"] == "mixed" and hf["qmoe"]["settings"]["bits"] == 2.5
    chosen = hf["qmoe"]["matrix_grids"]
    for block, kinds in chosen.items():
        for f in sorted((tmp_path / "o" / "experts" / block).glob("*.safetensors")):
            raw = f.read_bytes()
            meta = json.loads(json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]["qmoe"])
            for name, grid in meta["grids"].items():
                j, kind = name.removeprefix("expert_").split(".")
                assert chosen[block][kind][int(j)] == grid
            weights = sum(r * c for r, c in meta["shapes"].values())
            assert 8 * len(raw) <= 2.5 * weights
    used = {g for kinds in chosen.values() for grids in kinds.values() for g in grids}
    assert len(used) >= 2, used
    decoded = qmoe.load(tmp_path / "o", fused=False)
    assert next_token_loss(decoded, _val_ids(), 4) == pytest.approx(s["val_loss_after"], rel=1e-5)
    from qmoe.export import ExportError, export
    with pytest.raises(ExportError, match="scheme 'mixed'.*its own grid"):
        export(tmp_path / "o", tmp_path / "x")


def test_a_budget_run_resumed_mid_layer_equals_an_uninterrupted_one(qwen, tmp_path, fail_reading):
    """A crash in a layer's second group: --resume replays the first from its file (grids and all) and the output
    equals an uninterrupted run's, byte for byte."""
    cfg = CompressConfig(bits=2.0, group_size=4)
    restore = fail_reading("model.layers.2", 5)
    with pytest.raises(CheckpointError, match="simulated"):
        compress_model(qwen, tmp_path / "o", cfg, SPEC, progress=_quiet)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sorted(manifest["groups"]["model.layers.2"]) == ["0"]  # the layer's first group was written
    restore()
    a = compress_model(qwen, tmp_path / "o", cfg, SPEC, progress=_quiet, resume=True)
    b = compress_model(qwen, tmp_path / "fresh", cfg, SPEC, progress=_quiet)
    files = sorted(p.relative_to(tmp_path / "fresh") for p in (tmp_path / "fresh").rglob("*.safetensors"))
    assert files
    for f in files:
        assert (tmp_path / "o" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes(), f
    assert (a["val_loss_before"], a["val_loss_after"]) == (b["val_loss_before"], b["val_loss_after"])


def test_a_budget_below_the_cheapest_grids_and_bad_flags_are_one_line(qwen, tmp_path, capsys):
    base = ["--model", str(qwen), "--out", str(tmp_path / "o"), "--train-samples", "4", "--val-samples", "0"]
    assert compress_cli.main(base + ["--bits", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--bits 0.3 is below what the cheapest of the grids take there" in err
    assert not json.loads((tmp_path / "o" / "manifest.json").read_text())["complete"]
    for extra, msg in ((["--bits", "2", "--scheme", "int2"], "without --scheme"),
                       (["--grids", "int2"], "give --bits too"), (["--bits", "0"], "--bits must be > 0"),
                       (["--bits", "2", "--grids", "int2,int4-sym"], "not int4-sym")):
        assert compress_cli.main(base + ["--overwrite"] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err, err
