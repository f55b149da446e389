"""Text generation in ONNX Runtime with a model exported with its KV cache
(``onnxprune export DIR -o out/ --task text-generation-with-past``), dense or pruned.

One prefill over the prompt (a cache of length 0), then one decode step per new token, the cache
(``present.{i}.key|value``) fed back as ``past_key_values.{i}.key|value``. Greedy unless a
temperature is given (then nucleus sampling, ``top_p``). A pruned model runs the library's kernel
(``library="auto"``) or the op's function body (``"none"``).

A batch of prompts of different lengths is left-padded, as transformers' ``generate`` does; the
model's mask and positions make that exact for a dense model, but a pruned layout is laid over
absolute cache positions, which padding shifts: ``generate_ids`` refuses such a batch for a
pruned model (run the prompts one at a time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.lm_feeds import PAST_INPUT, POSITIONS_INPUT, cache_inputs, cache_shape, empty_cache, positions
from onnxprune.model_io import ModelInfo, read_info

#: ``library`` choices: ``auto`` registers the library for a model with onnxprune ops; ``none``
#: runs their function body.
LIBRARY_CHOICES = ("auto", "none")
EXPORT_HINT = "export it with --task text-generation-with-past"
JSON_SCHEMA = "onnxprune.generate/1"


@dataclasses.dataclass
class Generation:
    """What ``generate`` produced, and how long it took."""

    text: str  # the new text (special tokens left out)
    token_ids: list[int]  # the new tokens
    prompt_tokens: int
    stop_reason: str  # "eos", "max_new_tokens" or "positions" (the model's last position reached)
    prefill_seconds: float
    decode_seconds: float  # every decode step together
    decode_steps: int
    kernel: bool = False  # a pruned model ran onnxprune's kernel (not the op's function body)

    @property
    def decode_tokens_per_second(self) -> float | None:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else None

    def to_json(self) -> dict:
        return {"schema": JSON_SCHEMA, **dataclasses.asdict(self),
                "decode_tokens_per_second": self.decode_tokens_per_second}


class CausalLM:
    """A with-past decoder in an ONNX Runtime session: ``step`` runs new tokens over a cache."""

    def __init__(self, model: str | os.PathLike | ModelInfo, library: str = "auto", threads: int | None = None):
        from onnxprune.runtime import session

        if library not in LIBRARY_CHOICES:
            raise OnnxpruneError(f"library must be one of {LIBRARY_CHOICES}, got {library!r}")
        self.info = model if isinstance(model, ModelInfo) else read_info(model)
        self.pruned = self.info.uses_domain(op_schema.DOMAIN)
        self.cache = cache_inputs(self.info)
        if "input_ids" not in self.info.input_names:
            raise OnnxpruneError(f"{self.info.path}: has no input_ids input; {EXPORT_HINT}")
        if not self.cache:
            raise OnnxpruneError(f"{self.info.path}: has no KV cache inputs (past_key_values.*); {EXPORT_HINT}")
        self.kv_shape = {c.name: cache_shape(c) for c in self.cache}
        self.kernel = self.pruned and library == "auto"
        self.session = session(self.info, threads=threads, with_library=self.kernel)
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outputs:
            raise OnnxpruneError(f"{self.info.path}: has no logits output; {EXPORT_HINT}")
        self.presents = {}
        for c in self.cache:
            layer, kind = PAST_INPUT.match(c.name).groups()
            present = f"present.{layer}.{kind}"
            if present not in outputs:
                raise OnnxpruneError(f"{self.info.path}: has {c.name} but no {present} output; {EXPORT_HINT}")
            self.presents[c.name] = present
        self.output_names = ["logits", *self.presents.values()]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return empty_cache(self.info, batch)

    def check_cache(self, cache: dict[str, np.ndarray], batch: int) -> int:
        """The cache's length; one line naming the first array that does not fit the model."""
        lengths = set()
        for name, (heads, size) in self.kv_shape.items():
            if name not in cache:
                raise OnnxpruneError(f"the cache lacks {name}")
            shape = tuple(cache[name].shape)
            if len(shape) != 4 or shape[0] != batch or shape[1] != heads or shape[3] != size:
                raise OnnxpruneError(f"cache {name} has shape {list(shape)}; the model takes "
                                     f"[{batch}, {heads}, past_sequence, {size}] (batch {batch})")
            lengths.add(shape[2])
        if len(lengths) != 1:
            raise OnnxpruneError(f"the cache's arrays have different lengths {sorted(lengths)}")
        return lengths.pop()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict[str, np.ndarray]):
        """``(logits [B, S, V], cache)`` after ``input_ids [B, S]``; ``attention_mask [B, past + S]``
        covers the cache and the new tokens (0 = padding)."""
        from onnxprune.runtime import run

        batch, length = input_ids.shape
        past = self.check_cache(cache, batch)
        if attention_mask.shape != (batch, past + length):
            raise OnnxpruneError(f"attention_mask has shape {list(attention_mask.shape)}; expected "
                                 f"[{batch}, {past + length}] (cache {past} + new {length})")
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **cache}
        if POSITIONS_INPUT in self.info.input_names:
            feeds[POSITIONS_INPUT] = positions(attention_mask, length)
        logits, *presents = run(self.session, {n: v for n, v in feeds.items() if n in self.info.input_names},
                                self.info.path)
        cache = dict(zip(self.presents, presents))
        for name, array in cache.items():  # the next step would blame the cache it was given
            heads, size = self.kv_shape[name]
            if array.shape != (batch, heads, past + length, size):
                raise OnnxpruneError(f"{self.info.path}: output {self.presents[name]} has shape {list(array.shape)}; "
                                     f"expected [{batch}, {heads}, {past + length}, {size}] ({name} plus the new tokens)")
        return logits, cache


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``logits [B, V]``: the argmax, or a nucleus sample."""
    if temperature <= 0:
        return logits.argmax(axis=-1)
    chosen = []
    for row in logits.astype(np.float64) / temperature:
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        kept = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        chosen.append(rng.choice(kept, p=probs[kept] / probs[kept].sum()))
    return np.array(chosen)


@dataclasses.dataclass
class IdsGeneration:
    """``generate_ids``' result: the new tokens of each prompt and the timings."""

    token_ids: list[list[int]]
    stop_reason: str
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int


def generate_ids(
    lm: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_positions: int | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
) -> IdsGeneration:
    """New tokens for each prompt (lists of token ids), left-padded into one batch.

    Stops when every row has produced an end token, after ``max_new_tokens``, or when the
    sequence reaches ``max_positions``. ``on_tokens`` gets each step's tokens ``[B]``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OnnxpruneError("a prompt has no tokens")
    longest = max(len(p) for p in prompts)
    if max_positions is not None and longest > max_positions:
        raise OnnxpruneError(f"the prompt has {longest} tokens, more than the model's {max_positions} positions")
    if lm.pruned and len({len(p) for p in prompts}) > 1:
        raise OnnxpruneError("prompts of different lengths would be left-padded, which shifts the pruned layouts' "
                             "positions; generate for them one at a time")
    batch = len(prompts)
    ids = np.zeros((batch, longest), np.int64)
    mask = np.zeros((batch, longest), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    rng = np.random.default_rng(seed)
    ends = set(eos_token_ids)
    done = np.zeros(batch, bool)
    new: list[list[int]] = [[] for _ in prompts]
    cache = lm.empty_cache(batch)
    stop, prefill, decode, steps = "max_new_tokens", 0.0, 0.0, 0
    for index in range(max_new_tokens):
        if max_positions is not None and mask.shape[1] > max_positions:
            stop = "positions"
            break
        start = time.perf_counter()
        logits, cache = lm.step(ids, mask, cache)
        elapsed = time.perf_counter() - start
        if index == 0:
            prefill = elapsed
        else:
            decode, steps = decode + elapsed, steps + 1
        tokens = _pick(logits[:, -1], temperature, top_p, rng)
        for row, token in enumerate(tokens):
            if not done[row]:
                new[row].append(int(token))
                done[row] = int(token) in ends
        if on_tokens is not None:
            on_tokens(tokens)
        if done.all():
            stop = "eos"
            break
        ids = tokens[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return IdsGeneration(new, stop, prefill, decode, steps)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def model_settings(*folders: Path) -> tuple[list[int], int | None]:
    """End tokens and the number of positions from the config files of the first of ``folders``
    that has a config.json (a model directory; a pruned file's tokenizer directory)."""
    folder = next((f for f in folders if (f / "config.json").is_file()), folders[0])
    config = _read_json(folder / "config.json")
    text = config.get("text_config") or config
    generation = _read_json(folder / "generation_config.json")
    eos = generation.get("eos_token_id", text.get("eos_token_id"))
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    positions_ = text.get("max_position_embeddings") or text.get("n_positions")
    return eos, positions_


def resolve_model(model: str | os.PathLike, tokenizer: str | os.PathLike | None) -> tuple[Path, Path]:
    """``(model.onnx, tokenizer directory)``: MODEL may be a model directory holding model.onnx,
    whose tokenizer is then the default."""
    path = Path(model)
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise OnnxpruneError(f"{model}: a directory without model.onnx")
        return path / "model.onnx", Path(tokenizer) if tokenizer is not None else path
    if not path.is_file():
        raise OnnxpruneError(f"{model}: no such model file")
    if tokenizer is None:
        raise OnnxpruneError(f"{model}: give --tokenizer (a model file's folder need not hold one)")
    return path, Path(tokenizer)


def load_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        raise OnnxpruneError(f"{folder}: no tokenizer could be loaded ({' '.join(str(e).split())[:200]})") from None


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise OnnxpruneError("--chat needs a tokenizer with a chat template; this one has none")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(
    model: str | os.PathLike,
    prompt: str,
    tokenizer: str | os.PathLike | None = None,
    max_new_tokens: int = 64,
    chat: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    library: str = "auto",
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate text after ``prompt`` with a with-past ONNX model (a file, or a model directory
    holding model.onnx, whose tokenizer is then the default). ``on_text`` gets the text as it
    grows, piece by piece (streaming)."""
    path, tokenizer_dir = resolve_model(model, tokenizer)
    lm = CausalLM(path, library, threads)
    tok = load_tokenizer(tokenizer_dir)
    eos, max_positions = model_settings(path.parent, tokenizer_dir)
    if not eos and tok.eos_token_id is not None:
        eos = [tok.eos_token_id]
    ids = prompt_ids(tok, prompt, chat)
    new: list[int] = []
    shown = [""]

    def stream(tokens: np.ndarray) -> None:
        if on_text is None or (new and new[-1] in eos):
            return
        new.append(int(tokens[0]))
        text = tok.decode(new, skip_special_tokens=True)
        if len(text) > len(shown[0]) and not text.endswith("\ufffd"):  # a multi-byte character may be half done
            on_text(text[len(shown[0]):])
            shown[0] = text

    result = generate_ids(lm, [ids], max_new_tokens, eos, temperature, top_p, seed, max_positions, stream)
    tokens = result.token_ids[0]
    text = tok.decode(tokens, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown[0]):
        on_text(text[len(shown[0]):])
    return Generation(text, tokens, len(ids), result.stop_reason, result.prefill_seconds, result.decode_seconds,
                      result.decode_steps, lm.kernel)
