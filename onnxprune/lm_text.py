"""Long text for language models, offline: Python's documentation and the standard library's
sources, each split in two disjoint halves (calibration, evaluation); token windows over them;
passkey-retrieval prompts.

Both domains are pinned by the Python version. ``pydoc_data.topics`` (the reference manual's
topics that ``help()`` shows) is split by topic, the standard library's sources by top-level
module, alternately: even indices calibrate, odd ones evaluate.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError

SPLITS = ("calibration", "evaluation")
#: stdlib folders that are not library code, or whose text belongs to the other domain (pydoc_data)
_SKIPPED_STDLIB = {"site-packages", "test", "tests", "idlelib", "turtledemo", "pydoc_data", "__pycache__"}


def _half(items: Sequence, split: str) -> list:
    if split not in SPLITS:
        raise OnnxpruneError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    return list(items[SPLITS.index(split)::2])


def pydoc_topics(split: str) -> list[str]:
    """The texts of ``pydoc_data.topics``' topics (sorted by name) of ``split``: even → calibration, odd → evaluation."""
    from pydoc_data.topics import topics

    return [topics[name] for name in _half(sorted(topics), split)]


def stdlib_modules(split: str) -> list[Path]:
    """The standard library's top-level modules (a ``.py`` file or a package folder), sorted by
    name, of ``split``: even → calibration, odd → evaluation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(
        (p for p in root.iterdir()
         if p.name not in _SKIPPED_STDLIB and not p.name.startswith(".")
         and ((p.suffix == ".py" and p.is_file()) or (p.is_dir() and (p / "__init__.py").is_file()))),
        key=lambda p: p.name.removesuffix(".py"),
    )
    return _half(modules, split)


def stdlib_sources(split: str) -> Iterator[str]:
    """The source text of ``split``'s stdlib modules, one file at a time (a package's files in
    path order, test folders left out); lazily, as a few windows need only the first files."""
    for module in stdlib_modules(split):
        files = [module] if module.is_file() else sorted(module.rglob("*.py"))
        for path in files:
            if any(part in _SKIPPED_STDLIB for part in path.relative_to(module.parent).parts[:-1]):
                continue
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield text


#: domain → split → texts
DOMAINS: dict[str, Callable[[str], Iterable[str]]] = {"pydoc": pydoc_topics, "stdlib": stdlib_sources}


def texts(domain: str, split: str) -> Iterable[str]:
    if domain not in DOMAINS:
        raise OnnxpruneError(f"unknown text domain {domain!r}; the domains are {', '.join(DOMAINS)}")
    return DOMAINS[domain](split)


def token_windows(documents: Iterable[str], encode: Callable[[str], list[int]], length: int, count: int,
                  separator: str = "\n\n") -> np.ndarray:
    """``count`` windows of ``length`` consecutive tokens, shape (count, length), int64: the
    documents tokenised one by one and concatenated (each followed by ``separator``), cut in
    order without overlap. Tokenises only as many documents as the windows need."""
    need = length * count
    stream: list[int] = []
    for document in documents:
        stream.extend(encode(document + separator))
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise OnnxpruneError(f"the text has {len(stream)} tokens; {count} windows of {length} need {need}")
    return np.asarray(stream[:need], dtype=np.int64).reshape(count, length)


# ---- passkey retrieval (Mohtashami & Jaggi, 2023): a number hidden in repetitive filler

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER = "The pass key is "


def passkey(rng: np.random.Generator) -> str:
    """A random 5-digit key."""
    return str(int(rng.integers(10_000, 100_000)))


def passkey_message(key: str, depth: float, repeats: int) -> str:
    """The user's message: the task, ``repeats`` filler lines with the key's line after
    ``round(depth * repeats)`` of them (depth 0: first, 1: last), and the question."""
    if not 0.0 <= depth <= 1.0:
        raise OnnxpruneError(f"depth must be in [0, 1], got {depth}")
    before = round(depth * repeats)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return (PASSKEY_TASK + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (repeats - before)
            + PASSKEY_QUESTION)
