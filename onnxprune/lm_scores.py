"""What a language model is scored by (``tools/eval_lm.py``, ``onnxprune demo --llm``): perplexity
over token windows, and passkey retrieval asked through the tokenizer's chat template, scored
teacher-forced or by the model's own greedy answer.

A model is seen through two callables: ``logits(ids [n]) -> [n, vocab]`` (one forward over the
ids, as perplexity and teacher forcing need) and, for greedy answers, a *stepper*
``step(new_ids) -> last logits [vocab]`` that extends one sequence (:func:`cached_stepper` over a
with-past model's KV cache, or :func:`full_forward_stepper`, one whole forward per new token).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from onnxprune import lm_text
from onnxprune.errors import OnnxpruneError

Logits = Callable[[np.ndarray], np.ndarray]
Stepper = Callable[[Sequence[int]], np.ndarray]
SCORINGS = ("teacher-forced", "greedy")
#: room left after the prompt for the greedy answer ("The pass key is 12345." and its end)
GREEDY_TOKENS = 16
_DIGITS = re.compile(r"\d+")


# ---- perplexity


def token_nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` given the logits of the positions before them
    (float64, chunked: the logits of a long window are large)."""
    nll = np.empty(len(ids) - 1)
    for start in range(0, len(ids) - 1, chunk):
        rows = logits[start:min(start + chunk, len(ids) - 1)].astype(np.float64)
        peak = rows.max(-1, keepdims=True)
        log_z = np.log(np.exp(rows - peak).sum(-1)) + peak[:, 0]
        targets = ids[start + 1:start + 1 + len(rows)]
        nll[start:start + len(rows)] = log_z - rows[np.arange(len(rows)), targets]
    return nll


def window_nll(logits: Logits, window: np.ndarray) -> list[float]:
    """``[NLL sum, positions, NLL sum of the last quarter, its positions]`` of one window: what
    perplexities pool (kept per window, so that more windows extend a measurement)."""
    nll = token_nll(logits(window), window)
    last = nll[-(len(window) // 4):]
    return [float(nll.sum()), len(nll), float(last.sum()), len(last)]


def pooled_perplexities(per_window: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(over all predicted positions, over each window's last quarter), pooled over the windows."""
    totals = np.asarray(per_window, np.float64).sum(0)
    return float(np.exp(totals[0] / totals[1])), float(np.exp(totals[2] / totals[3]))


# ---- greedy decoding


def cached_stepper(lm) -> Stepper:
    """Steps of ``lm`` (an :class:`onnxprune.generate.CausalLM`) over its KV cache: the first call
    is the prefill."""
    state = {"cache": lm.empty_cache(1), "length": 0}

    def step(tokens: Sequence[int]) -> np.ndarray:
        state["length"] += len(tokens)
        logits, state["cache"] = lm.step(np.asarray([tokens], np.int64), np.ones((1, state["length"]), np.int64),
                                         state["cache"])
        return logits[0, -1]

    return step


def full_forward_stepper(logits: Logits) -> Stepper:
    """Steps of a model without a cache: the whole sequence again for each new token."""
    seen: list[int] = []

    def step(tokens: Sequence[int]) -> np.ndarray:
        seen.extend(tokens)
        return logits(np.asarray(seen, np.int64))[-1]

    return step


def greedy(step: Stepper, prompt: Sequence[int], max_new_tokens: int, stop: Callable[[list[int]], bool]) -> list[int]:
    """The argmax tokens after ``prompt``, until ``stop(tokens so far)`` or ``max_new_tokens``."""
    new: list[int] = []
    logits = step(list(prompt))
    while True:
        new.append(int(logits.argmax()))
        if len(new) >= max_new_tokens or stop(new):
            return new
        logits = step(new[-1:])


# ---- passkey


def first_number(text: str) -> str:
    """The first run of digits in ``text`` ("" when there is none): the key an answer gives."""
    found = _DIGITS.search(text)
    return found.group() if found else ""


class Passkey:
    """Passkey prompts of about ``length`` tokens (at most ``length`` − GREEDY_TOKENS, so that the
    greedy answer fits) in the tokenizer's chat template. Trial ``index`` has its own key and depth
    (seeded by ``(seed, index)``): every model and scoring sees the same trials, and more trials
    extend the earlier ones."""

    def __init__(self, tokenizer, length: int, seed: int = 0):
        if not getattr(tokenizer, "chat_template", None):
            raise OnnxpruneError("the passkey is asked through a chat template, which the tokenizer lacks "
                                 "(--trials 0, or --tokenizer DIR with one)")
        self.tokenizer, self.length, self.seed = tokenizer, length, seed
        budget = length - GREEDY_TOKENS
        base, ten = (len(self.prompt_ids("00000", 0.5, r)) for r in (0, 10))
        per_repeat = max((ten - base) / 10, 1e-9)
        self.repeats = max(0, int((budget - base) / per_repeat))
        while self.repeats and len(self.prompt_ids("00000", 0.5, self.repeats)) > budget:
            self.repeats -= 1
        self.ends = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                     if isinstance(t, int) and t != tokenizer.unk_token_id}

    def case(self, index: int) -> tuple[str, float]:
        """(key, depth) of trial ``index``."""
        rng = np.random.default_rng([self.seed, index])
        return lm_text.passkey(rng), float(rng.uniform(0, 1))

    def prompt(self, key: str, depth: float, repeats: int | None = None) -> str:
        message = lm_text.passkey_message(key, depth, self.repeats if repeats is None else repeats)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, key: str, depth: float, repeats: int | None = None) -> list[int]:
        return self.tokenizer(self.prompt(key, depth, repeats), add_special_tokens=False)["input_ids"]

    def answer_ids(self, key: str, depth: float) -> tuple[list[int], int]:
        """The ids of prompt + "The pass key is " + key, and where the key's tokens start."""
        prefix = self.prompt(key, depth) + lm_text.PASSKEY_ANSWER
        head = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        # the answer's trailing space is the prefix's: only the key's own tokens are scored
        full = self.tokenizer(prefix + key, add_special_tokens=False)["input_ids"]
        if full[:len(head)] != head:
            raise OnnxpruneError("the tokenizer merges the key with the answer before it")
        return full, len(head)

    def teacher_forced(self, logits: Logits, index: int) -> tuple[bool, str]:
        """(every key token is the argmax given its prefix, the digits the argmax gives)."""
        key, depth = self.case(index)
        ids, start = self.answer_ids(key, depth)
        ids = np.asarray(ids, np.int64)
        predicted = logits(ids[:-1])[start - 1:].argmax(-1)
        return bool((predicted == ids[start:]).all()), self.tokenizer.decode(predicted.tolist())

    def answered(self, tokens: list[int]) -> bool:
        """Whether a greedy answer is done: an end token, or a number followed by something else."""
        if tokens[-1] in self.ends:
            return True
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        found = _DIGITS.search(text)
        return found is not None and found.end() < len(text.rstrip("\ufffd"))

    def greedy(self, step: Stepper, index: int) -> tuple[bool, str]:
        """(the first number of the model's greedy answer is the key, the answer)."""
        key, depth = self.case(index)
        tokens = greedy(step, self.prompt_ids(key, depth), GREEDY_TOKENS, self.answered)
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return first_number(answer) == key, answer
