"""Data readers (onnxprune.data): text, JSON Lines, Parquet and datasets folders as streams, the
bounded shuffle, --limit before chunking."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from onnxprune.data import chunked, iter_texts, load_dataset, load_tokenizer, read_texts, shuffled, tokenize
from onnxprune.errors import OnnxpruneError
from text_models import sentences, tokenizer, write_parquet, write_saved_dataset

TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(50)]


def expected(texts=TEXTS):
    return [t.strip() for t in texts]


def test_text_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(TEXTS) + "\n\n  \n")
    assert list(iter_texts(path)) == expected()


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)) + "\n")
    assert list(iter_texts(path, "body")) == expected()
    with pytest.raises(OnnxpruneError, match=r"data.jsonl:1: no text field 'text' \(choose one with --text-field\)"):
        list(iter_texts(path))


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(OnnxpruneError, match=r"data.jsonl:2: not JSON"):
        list(iter_texts(path))


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", TEXTS, field="content")
    assert list(iter_texts(path, "content")) == expected()
    with pytest.raises(OnnxpruneError, match=r"no column 'text' \(has \['id', 'content'\]"):
        list(iter_texts(path))


def test_not_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    with pytest.raises(OnnxpruneError, match="not a readable Parquet file"):
        list(iter_texts(path))


def test_saved_dataset_folder(tmp_path):
    folder = write_saved_dataset(tmp_path / "train", TEXTS)
    assert list(iter_texts(folder)) == expected()


def test_dataset_dict_folder_names_its_splits(tmp_path):
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(OnnxpruneError, match=r"splits \['train', 'test'\]; give one split's folder"):
        list(iter_texts(folder))


def test_folder_without_state(tmp_path):
    with pytest.raises(OnnxpruneError, match="not a folder written by datasets' save_to_disk"):
        list(iter_texts(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(OnnxpruneError, match="no such data file"):
        iter_texts(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_reading_streams(tmp_path, kind):
    """Memory stays flat: reading a file of ~6 MB holds far less than the file at any time."""
    path = tmp_path / f"big.{kind}"
    line = "lorem ipsum dolor sit amet " * 20
    with open(path, "w") as f:
        for i in range(12_000):
            f.write((json.dumps({"text": f"{i} {line}"}) if kind == "jsonl" else f"{i} {line}") + "\n")
    assert path.stat().st_size > 6_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_texts(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 12_000
    assert peak < 1_000_000


def test_shuffle_is_a_seeded_bounded_permutation():
    items = list(range(1000))
    once, again = list(shuffled(items, seed=3, buffer=50)), list(shuffled(items, seed=3, buffer=50))
    assert once == again and sorted(once) == items and once != items
    assert list(shuffled(items, seed=4, buffer=50)) != once
    # An item leaves the buffer after it enters: never more than `buffer` places early.
    assert all(position >= item - 50 for position, item in enumerate(once))


def test_shuffle_smaller_than_buffer():
    assert sorted(shuffled(range(10), seed=0, buffer=100)) == list(range(10))


def test_limit_counts_texts_before_chunking(tmp_path):
    texts = sentences(20, seed=2, longest=150)
    path = tmp_path / "data.txt"
    path.write_text("\n".join(texts))
    chosen = list(read_texts(path, limit=6))
    assert chosen == texts[:6]
    examples = tokenize(chosen, load_tokenizer(tokenizer(tmp_path)), max_length=32)
    assert len(examples) > 6  # chunking comes after the limit
    shuffled_six = list(read_texts(path, limit=6, shuffle_seed=1))
    assert len(shuffled_six) == 6 and set(shuffled_six) <= set(texts) and shuffled_six != texts[:6]


def test_load_dataset_reads_every_format(tmp_path):
    texts = sentences(10, seed=3)
    tok = tokenizer(tmp_path)
    path = write_parquet(tmp_path / "data.parquet", texts)
    from_parquet = load_dataset(path, ["input_ids", "attention_mask"], tok, 64)
    (tmp_path / "data.txt").write_text("\n".join(texts))
    from_text = load_dataset(tmp_path / "data.txt", ["input_ids", "attention_mask"], tok, 64)
    assert len(from_parquet) == len(from_text)
    for a, b in zip(from_parquet.examples, from_text.examples):
        np.testing.assert_array_equal(a, b)


def test_chunked():
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
