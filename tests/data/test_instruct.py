"""Instruction-tuning data: layout, loss mask on the response only, cutting, shuffling, bad input."""

from __future__ import annotations

import json

import numpy
import pytest

from bam_megatron.data.errors import DataError
from bam_megatron.data.instruct import InstructDataset, build_instruct_datasets, encode_pairs, read_pairs
from bam_megatron.data.tokenizer import load_tokenizer
from bam_megatron.training.batches import MicroBatches


class WordTokenizer:
    """One id per distinct word (ids from 4 up; pad 0, eod 3): makes every position checkable."""

    pad, eod = 0, 3

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def tokenize(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, 4 + len(self.ids)) for w in text.split()]


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_loss_mask_covers_the_response_and_eod_only():
    tok = WordTokenizer()
    enc = encode_pairs([("a b c", "d e")], tok, seq_length=8)
    a, b, c, d, e = (tok.ids[w] for w in "abcde")
    numpy.testing.assert_array_equal(enc.tokens[0], [a, b, c, d, e, 3, 0, 0])
    numpy.testing.assert_array_equal(enc.labels[0], [b, c, d, e, 3, 0, 0, 0])
    # labels d, e and eod (positions 2, 3, 4) are learned; prompt labels and padding are not
    numpy.testing.assert_array_equal(enc.loss_mask[0], [0, 0, 1, 1, 1, 0, 0, 0])
    assert enc.truncated == enc.dropped == 0


def test_long_pairs_are_cut_and_prompts_filling_the_window_dropped():
    tok = WordTokenizer()
    enc = encode_pairs([("p1 p2 p3", "r1 r2 r3 r4"), ("q1 q2 q3 q4", "x"), ("s", "t")], tok, seq_length=4)
    assert (enc.truncated, enc.dropped, len(enc.tokens)) == (1, 1, 2)
    numpy.testing.assert_array_equal(enc.labels[0], [tok.ids[w] for w in ("p2", "p3", "r1", "r2")])
    numpy.testing.assert_array_equal(enc.loss_mask[0], [0, 0, 1, 1])  # the eod was cut off
    with pytest.raises(DataError, match="every prompt is at least --seq-length 2"):
        encode_pairs([("a b", "c")], tok, seq_length=2)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing key 'response'"),
        ('{"prompt": "a", "response": 3}', "key 'response' holds int"),
        ('{"prompt": "a", "response": " "}', "empty 'response'"),
    ],
    ids=["json", "object", "missing", "type", "empty"],
)
def test_a_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "", line])
    with pytest.raises(DataError, match=f"d.jsonl:3: {message}"):
        read_pairs(path)


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="no prompt/response pairs"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="not found"):
        read_pairs(str(tmp_path / "absent.jsonl"))


def test_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "id": 1}])
    assert read_pairs(path, "question", "answer") == [("q", "a")]


def test_each_training_epoch_is_a_seeded_permutation():
    tok = WordTokenizer()
    enc = encode_pairs([(f"p{i}", f"r{i}") for i in range(5)], tok, seq_length=4)
    ds = InstructDataset(enc, num_samples=15, seed=7)
    firsts = [int(ds[i]["tokens"][0]) for i in range(15)]
    for epoch in range(3):
        assert sorted(firsts[5 * epoch : 5 * epoch + 5]) == sorted(int(t) for t in enc.tokens[:, 0])
    assert firsts[:5] != firsts[5:10]  # a new order each epoch
    assert firsts == [int(InstructDataset(enc, 15, seed=7)[i]["tokens"][0]) for i in range(15)]
    valid = InstructDataset(enc)
    assert len(valid) == 5 and [int(valid[i]["tokens"][0]) for i in range(5)] == list(enc.tokens[:, 0])


def test_sentencepiece_pairs_batch_like_gpt_samples(tmp_path, corpus):
    pairs = [{"prompt": f"court statute {i}", "response": "theorem lemma proof"} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    valid = write_jsonl(tmp_path / "valid.jsonl", pairs[:2])
    tokenizer = load_tokenizer(corpus["tokenizer"])
    train_ds, valid_sets, fingerprint, summary = build_instruct_datasets(train, valid, tokenizer, 48, 1, 10)
    assert len(train_ds) == 10 and list(valid_sets) == ["instruct"] and "6 training pairs, 2 validation" in summary
    batch = MicroBatches(train_ds, 4, 0, 1).next_global_batch(1)[0]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (4, 48) for k in ("tokens", "labels", "loss_mask", "position_ids")
    }
    response = tokenizer.tokenize("theorem lemma proof") + [tokenizer.eod]
    row = batch["labels"][0][batch["loss_mask"][0] > 0].tolist()
    assert row == response
    other = build_instruct_datasets(train, valid, tokenizer, 48, 2, 10)[2]
    assert other != fingerprint  # the seed decides the order: part of the fingerprint
