"""Span corruption, the train/validation split and the calibration-file reader."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qmoe.corpus import load_default_corpus
from qmoe.data import DataConfig, make_samples, span_corrupt, train_val_samples, windows
from qmoe.tokenizer import ByteTokenizer, read_text_file

TOK = ByteTokenizer()


def _reconstruct(inputs, targets):
    """Undo span corruption: replace each sentinel in the inputs by the span that follows it in the targets."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= TOK.sentinel_floor:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t >= TOK.sentinel_floor else [t])
    return out


@settings(max_examples=60, deadline=None)
@given(length=st.integers(4, 600), seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.15, 0.3, 0.5]))
def test_span_corruption_is_lossless_and_fixed_length(length, seed, density):
    tokens = np.arange(length) % 200 + 3
    cfg = DataConfig(raw_length=length, noise_density=density)
    inp, tgt = span_corrupt(tokens, cfg, TOK.sentinel, TOK.eos_id, np.random.default_rng(seed))
    assert _reconstruct(inp.tolist(), tgt.tolist()) == tokens.tolist()
    assert inp[-1] == TOK.eos_id and tgt[-1] == TOK.eos_id
    inp2, tgt2 = span_corrupt(tokens, cfg, TOK.sentinel, TOK.eos_id, np.random.default_rng(seed + 1))
    assert len(inp2) == len(inp) and len(tgt2) == len(tgt)


def test_default_noise_and_span_length():
    """15% noise, mean span 3, on 256-token windows: 38 noise tokens in 13 spans."""
    inp, tgt = span_corrupt(np.arange(256) + 3, DataConfig(), TOK.sentinel, TOK.eos_id, np.random.default_rng(0))
    assert len(tgt) == 38 + 13 + 1 and len(inp) == 256 - 38 + 13 + 1
    assert sorted(t for t in tgt if t >= TOK.sentinel_floor) == sorted(TOK.sentinel(k) for k in range(13))


def test_train_and_validation_windows_are_disjoint_and_seeded():
    ids = TOK.encode(load_default_corpus())
    train_w, val_w = windows(ids, 256)
    assert len(val_w) * 19 <= len(train_w) <= len(val_w) * 19 + 19
    assert not ({w.tobytes() for w in train_w} & {w.tobytes() for w in val_w})
    a = train_val_samples(load_default_corpus(), TOK, 8, 4, seed=3)
    b = train_val_samples(load_default_corpus(), TOK, 8, 4, seed=3)
    c = train_val_samples(load_default_corpus(), TOK, 8, 4, seed=4)
    assert all((x.input_ids == y.input_ids).all() for x, y in zip(a, b))
    assert not (a[0].input_ids == c[0].input_ids).all()


def test_validation_does_not_depend_on_calibration_size():
    _, v1 = train_val_samples(load_default_corpus(), TOK, 8, 4, seed=0)
    _, v2 = train_val_samples(load_default_corpus(), TOK, 100, 4, seed=0)
    assert (v1.labels == v2.labels).all()


def test_calib_file_plain_and_jsonl(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("hello world\n\nsecond document")
    assert read_text_file(plain) == "hello world\n\nsecond document"
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c", "url": "x"}) + "\n")
    assert read_text_file(jl) == "a b\n\nc"
    jl.write_text(json.dumps({"text": "a"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2"):
        read_text_file(jl)


def test_text_too_short_is_an_error():
    with pytest.raises(ValueError, match="text too short"):
        train_val_samples("tiny text", TOK, 4, 4, 0)


def test_zero_samples_keep_the_shape():
    train_w, _ = windows(TOK.encode(load_default_corpus()), 256)
    s = make_samples(train_w, 0, DataConfig(), TOK, 0)
    assert s.input_ids.shape == (0, 232) and s.labels.shape == (0, 52)


def test_byte_tokenizer_round_trip():
    text = "déjà vu: 3 < 4\n"
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.decode([TOK.sentinel(0), TOK.sentinel(99)]) == "<extra_id_0><extra_id_99>"
