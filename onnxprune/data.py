"""Model inputs from data files: a text file (one example per line) with a tokenizer, or ``.npz``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError

#: Inputs a tokenizer can fill in; any other model input must come from an .npz file.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_tokenizer(tokenizer: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise OnnxpruneError(f"{tokenizer}: no tokenizer.json found (give a tokenizer directory or file)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise OnnxpruneError(f"{file}: not a readable tokenizer ({e})") from None
    tok.no_padding()
    return tok


def read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise OnnxpruneError(f"{path}: no such data file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise OnnxpruneError(f"{path}: no examples (one example per non-empty line)")
    return lines


def tokenize(lines: Sequence[str], tokenizer, max_length: int, chunk: bool = True) -> list[np.ndarray]:
    """Token ids per example; with ``chunk`` a long line becomes several examples of ≤ max_length."""
    tokenizer.enable_truncation(max_length)
    examples = []
    for encoding in tokenizer.encode_batch(list(lines)):
        examples.append(np.asarray(encoding.ids, dtype=np.int64))
        if chunk:
            examples.extend(np.asarray(o.ids, dtype=np.int64) for o in encoding.overflowing if len(o.ids) > 2)
    return examples


def pad_batch(examples: Sequence[np.ndarray], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    length = max(len(e) for e in examples)
    ids = np.zeros((len(examples), length), dtype=np.int64)
    mask = np.zeros((len(examples), length), dtype=np.int64)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = example
        mask[row, : len(example)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: feeds[name] for name in input_names}


class Dataset:
    """A list of examples, batched by similar length (less padding, less wasted compute)."""

    def __init__(self, examples: list[dict[str, np.ndarray]] | list[np.ndarray], input_names: Sequence[str]):
        self.examples = examples
        self.input_names = list(input_names)

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, sort: bool = True) -> Iterator[dict[str, np.ndarray]]:
        order = list(range(len(self.examples)))
        if sort:
            order.sort(key=lambda i: _length(self.examples[i]))
        for start in range(0, len(order), batch_size):
            chosen = [self.examples[i] for i in order[start : start + batch_size]]
            if isinstance(chosen[0], dict):
                yield {k: np.stack([c[k] for c in chosen]) for k in chosen[0]}
            else:
                yield pad_batch(chosen, self.input_names)


def _length(example) -> int:
    if isinstance(example, dict):
        return int(next(iter(example.values())).shape[-1])
    return len(example)


def load_dataset(
    data: str | os.PathLike,
    input_names: Sequence[str],
    tokenizer: str | os.PathLike | None = None,
    max_length: int = 256,
    chunk: bool = True,
    limit: int | None = None,
) -> Dataset:
    """Examples for a model with ``input_names`` from a text file + tokenizer, or an .npz."""
    path = Path(data)
    if path.suffix == ".npz":
        return _load_npz(path, input_names, limit)
    missing = [n for n in input_names if n not in TEXT_INPUTS]
    if missing:
        raise OnnxpruneError(
            f"the model needs inputs {missing} that a text file cannot give; pass an .npz with them"
        )
    if tokenizer is None:
        raise OnnxpruneError(f"{path}: a text data file needs --tokenizer")
    lines = read_lines(path)
    examples = tokenize(lines, load_tokenizer(tokenizer), max_length, chunk=chunk)
    if limit:
        examples = examples[:limit]
    return Dataset(examples, input_names)


def _load_npz(path: Path, input_names: Sequence[str], limit: int | None) -> Dataset:
    if not path.is_file():
        raise OnnxpruneError(f"{path}: no such data file")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise OnnxpruneError(f"{path}: not a readable .npz ({e})") from None
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise OnnxpruneError(f"{path}: lacks model inputs {missing} (has {sorted(arrays)})")
    rows = {arrays[n].shape[0] for n in input_names}
    if len(rows) != 1:
        raise OnnxpruneError(f"{path}: inputs disagree on the number of examples (first axes {sorted(rows)})")
    count = rows.pop()
    examples = [{n: arrays[n][i] for n in input_names} for i in range(count)]
    if limit:
        examples = examples[:limit]
    return Dataset(examples, input_names)
