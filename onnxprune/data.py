"""Model inputs from data files: text with a tokenizer, or ``.npz``.

Text comes from a text file (one example per line), JSON Lines (``--text-field`` names the field),
Parquet, or a folder written by ``datasets``' ``save_to_disk``; ``read_texts`` streams any of them
(memory does not grow with the file), ``load_dataset`` reads all into a ``Dataset``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError

#: Inputs a tokenizer can fill in; any other model input must come from an .npz file.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: Examples a streaming shuffle holds (``shuffled``): with texts of a few KB, tens of MB.
SHUFFLE_BUFFER = 10_000

#: Rows a Parquet or Arrow reader decodes at a time.
READ_BATCH_ROWS = 1024


def tokenizer_file(tokenizer: str | os.PathLike) -> Path:
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise OnnxpruneError(f"{tokenizer}: no tokenizer.json found (give a tokenizer directory or file)")
    return file


def load_tokenizer(tokenizer: str | os.PathLike):
    file = tokenizer_file(tokenizer)
    return tokenizer_from_json(file.read_text(encoding="utf-8"), str(file))


def tokenizer_from_json(text: str, source: str = "tokenizer"):
    """A tokenizer from the contents of a ``tokenizer.json`` (what workers on other machines get)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise OnnxpruneError(f"{source}: not a readable tokenizer ({e})") from None
    tok.no_padding()
    return tok


def read_lines(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    lines = list(iter_texts(path, text_field))
    if not lines:
        raise OnnxpruneError(f"{path}: no examples (no non-empty text)")
    return lines


def is_text_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds text for a tokenizer (anything but an .npz of model inputs)."""
    return Path(path).suffix != ".npz"


def iter_texts(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The non-empty texts of a data file or folder, in order, read as a stream."""
    path = Path(path)
    if path.is_dir():
        reader = _saved_dataset_texts(path, text_field)
    elif not path.is_file():
        raise OnnxpruneError(f"{path}: no such data file")
    elif path.suffix == ".jsonl":
        reader = _jsonl_texts(path, text_field)
    elif path.suffix == ".parquet":
        reader = _parquet_texts(path, text_field)
    else:
        reader = _line_texts(path)
    return (t for t in (text.strip() for text in reader) if t)


def _line_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from f


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise OnnxpruneError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise OnnxpruneError(f"{path}:{number}: no text field {field!r} (choose one with --text-field)")
            yield record[field]


def _arrow_texts(batches: Iterable, field: str, source) -> Iterator[str]:
    for batch in batches:
        if field not in batch.schema.names:
            raise OnnxpruneError(
                f"{source}: no column {field!r} (has {batch.schema.names}; choose one with --text-field)"
            )
        for text in batch.column(field).to_pylist():
            if text is not None:
                yield str(text)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise OnnxpruneError(
            "reading Parquet or datasets folders needs pyarrow: pip install 'onnxprune[data]'"
        ) from None


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    _pyarrow()
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError and others
        raise OnnxpruneError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in file.schema_arrow.names:
        raise OnnxpruneError(f"{path}: no column {field!r} (has {file.schema_arrow.names}; choose one with --text-field)")
    yield from _arrow_texts(file.iter_batches(batch_size=READ_BATCH_ROWS, columns=[field]), field, path)


def _saved_dataset_texts(folder: Path, field: str) -> Iterator[str]:
    """A ``datasets`` ``save_to_disk`` folder: Arrow IPC streams listed in ``state.json``."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise OnnxpruneError(f"{folder}: a dataset with splits {splits}; give one split's folder, e.g. {folder / 'train'}")
    state = folder / "state.json"
    if not state.is_file():
        raise OnnxpruneError(f"{folder}: not a folder written by datasets' save_to_disk (no state.json)")
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise OnnxpruneError(f"{state}: not a datasets state file ({e})") from None
    _pyarrow()
    import pyarrow as pa

    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                yield from _arrow_texts(pa.ipc.open_stream(source), field, file)
        except (OSError, pa.ArrowInvalid) as e:
            raise OnnxpruneError(f"{file}: not a readable Arrow stream ({e})") from None


def shuffled(items: Iterable, seed: int, buffer: int = SHUFFLE_BUFFER) -> Iterator:
    """``items`` in a random order, streaming: each step emits a random one of the next ``buffer``
    (a bounded buffer, so an item moves at most about ``buffer`` places earlier)."""
    rng = random.Random(seed)
    pool = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        index = rng.randrange(buffer)
        yield pool[index]
        pool[index] = item
    rng.shuffle(pool)
    yield from pool


def read_texts(path: str | os.PathLike, text_field: str = "text", limit: int | None = None,
               shuffle_seed: int | None = None) -> Iterator[str]:
    """``iter_texts``, shuffled with a bounded buffer when ``shuffle_seed`` is given, then the
    first ``limit`` (examples read, before any chunking)."""
    texts = iter_texts(path, text_field)
    if shuffle_seed is not None:
        texts = shuffled(texts, shuffle_seed)
    return itertools.islice(texts, limit) if limit else texts


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


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
    text_field: str = "text",
) -> Dataset:
    """Examples for a model with ``input_names`` from text + tokenizer, or an .npz; ``limit``
    counts examples after chunking."""
    path = Path(data)
    if path.suffix == ".npz":
        return _load_npz(path, input_names, limit)
    check_text_inputs(path, input_names, tokenizer)
    lines = read_lines(path, text_field)
    examples = tokenize(lines, load_tokenizer(tokenizer), max_length, chunk=chunk)
    if limit:
        examples = examples[:limit]
    return Dataset(examples, input_names)


def check_text_inputs(data, input_names: Sequence[str], tokenizer) -> None:
    """Refuse text for a model with inputs a tokenizer cannot fill in, or text without a tokenizer."""
    missing = [n for n in input_names if n not in TEXT_INPUTS]
    if missing:
        raise OnnxpruneError(
            f"the model needs inputs {missing} that a text file cannot give; pass an .npz with them"
        )
    if tokenizer is None:
        raise OnnxpruneError(f"{data}: a text data file needs --tokenizer")


def npz_examples(path: str | os.PathLike, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Each example of an .npz of model inputs (first axis), as a dict of the model's inputs."""
    return _load_npz(Path(path), input_names, None).examples


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
