"""Recover: win back what pruning cost, without labels (self-distillation), then prune again.

The pruned ``.onnx`` holds the layouts. The PyTorch model is loaded twice: a frozen dense teacher
and a student whose attention applies those layouts with the op's exact semantics
(:mod:`onnxprune.masked_attention`). The student learns to reproduce the teacher on unlabelled
text; the objective is chosen by ``objective``:

- ``embedding``: 1 − cosine of the mean-pooled sentence embeddings (the issue's reference);
- ``hidden``: that, plus every layer's hidden states (MSE over valid tokens, normalised by the
  teacher's mean square), which gives each layer its own target instead of only the last;
- ``hidden+attention``: that, plus each attention layer's output before the output projection.

Before training, the masked student is checked against the pruned ONNX model (the library's
kernel) on the data; afterwards the student is exported and pruned with the same layouts, and the
result is checked against the student again. Training stops at ``steps`` or at the time budget,
whichever comes first; checkpoints make a stopped run resumable.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxprune.data import pad_batch
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import RECOVERED_KEY, Layouts, load_layouts
from onnxprune.masked_attention import apply_layouts, recording
from onnxprune.model_io import atomic_path, load_model
from onnxprune.progress import progress

OBJECTIVES = ("embedding", "hidden", "hidden+attention")
#: Largest |masked PyTorch − pruned ONNX| accepted on the last hidden state.
PARITY_ATOL = 1e-4


@dataclasses.dataclass
class RecoverConfig:
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-4
    time_budget_s: float | None = None
    objective: str = "hidden"
    warmup_steps: int = 10
    seed: int = 0
    checkpoint: str | None = None  # path of the resumable checkpoint (None: no checkpoints)
    checkpoint_every: int = 25
    log_every: int = 10
    #: Inputs held out of training to choose the best state by (0: none; keep the last state).
    validation_examples: int = 128
    validate_every: int = 100
    #: Stop after this many validation passes in a row without a new best (None: never).
    patience: int | None = None


@dataclasses.dataclass
class RecoverReport:
    output: str
    steps: int
    elapsed_s: float
    cpu_s: float  # process CPU time of the training steps (all threads)
    stopped_by: str  # "steps", "time budget" or "no improvement" (patience)
    losses: list[float]
    parity_before: float  # max |masked torch − pruned ONNX| before training
    parity_after: float  # max |fine-tuned masked torch − recovered ONNX|
    resumed_from_step: int = 0
    best_step: int = 0  # the step whose state was kept (validation loss lowest; 0: the pruned model's own)
    validation: list = dataclasses.field(default_factory=list)  # [step, validation loss] pairs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Models


def load_pretrained(model_dir: str | os.PathLike):
    """The transformers base model (hidden states out) with eager attention, in eval mode."""
    from transformers import AutoModel

    if not (Path(model_dir) / "config.json").is_file():
        raise OnnxpruneError(f"{model_dir}: no config.json (not a transformers model directory)")
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", local_files_only=True)
    return model.eval()


def masked_pair(model, pruned: Layouts):
    """(student with the layouts, its attention modules, dense teacher, its attention modules)."""
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student_modules = apply_layouts(model, pruned)
    teacher_modules = apply_layouts(teacher, None)
    return model, student_modules, teacher, teacher_modules


def _forward(model, feeds: dict, hidden_states: bool = False):
    import torch

    kwargs = {k: torch.as_tensor(v, device=model.device) for k, v in feeds.items()}
    if "use_cache" in model.forward.__code__.co_varnames:
        kwargs["use_cache"] = False
    return model(**kwargs, output_hidden_states=hidden_states)


def last_hidden_state(model, feeds: dict):
    return _forward(model, feeds).last_hidden_state


def pooled_embeddings(hidden, mask):
    """Mean over valid tokens, L2-normalised (sentence-transformers' recipe)."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def torch_embeddings(model, examples: list[np.ndarray], names: list[str], batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings of the (masked) PyTorch model, in example order."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    out = np.zeros((len(examples), model.config.hidden_size))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            feeds = pad_batch([examples[i] for i in chosen], names)
            hidden = last_hidden_state(model, feeds)
            mask = torch.as_tensor(feeds["attention_mask"], device=hidden.device)
            out[chosen] = pooled_embeddings(hidden, mask).double().cpu().numpy()
    return out


def parity(model, onnx_path: str | os.PathLike, examples: list[np.ndarray], names: list[str],
           threads: int | None = None, batch_size: int = 8) -> float:
    """Max |PyTorch − ONNX| of the last hidden state over valid tokens (ONNX with the library)."""
    import torch

    from onnxprune.runtime import session

    sess = session(onnx_path, threads=threads)
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            feeds = pad_batch(examples[start : start + batch_size], names)
            expected = last_hidden_state(model, feeds).numpy()
            got = sess.run(None, feeds)[0]
            valid = feeds["attention_mask"].astype(bool)
            worst = max(worst, float(np.abs(got - expected)[valid].max(initial=0.0)))
    return worst


# ---------------------------------------------------------------------------------------------
# Objective


def _normalised_mse(student, teacher, valid):
    """MSE over valid positions, divided by the teacher's mean square there (scale-free per layer)."""
    diff = ((student - teacher) ** 2).mean(-1)
    power = (teacher**2).mean(-1)
    return (diff * valid).sum() / (power * valid).sum().clamp_min(1e-12)


def distillation_loss(objective: str, student_out, teacher_out, student_attn, teacher_attn, mask):
    valid = mask.to(student_out.last_hidden_state.dtype)
    s_emb = pooled_embeddings(student_out.last_hidden_state, mask)
    t_emb = pooled_embeddings(teacher_out.last_hidden_state, mask)
    loss = (1.0 - (s_emb * t_emb).sum(-1)).mean()
    if objective in ("hidden", "hidden+attention"):
        layers = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))
        loss = loss + sum(_normalised_mse(s, t, valid) for s, t in layers) / len(layers)
    if objective == "hidden+attention":
        # [B, H, S, D] → [B, S, H·D] so positions line up with the token mask
        flat = lambda a: a.transpose(1, 2).reshape(a.shape[0], a.shape[2], -1)  # noqa: E731
        pairs = list(zip(student_attn, teacher_attn))
        loss = loss + sum(_normalised_mse(flat(s), flat(t), valid) for s, t in pairs) / len(pairs)
    return loss


# ---------------------------------------------------------------------------------------------
# Training


def _learning_rate(config: RecoverConfig, step: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay to 10% over whichever ends first: steps or time budget."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    done = step / max(config.steps, 1)
    if config.time_budget_s:
        done = max(done, elapsed / config.time_budget_s)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def _length_bucketed_batches(examples, batch_size: int, rng, pool: int = 50) -> list[list[int]]:
    """One pass over the data in random batches of similar lengths: shuffle, sort each pool of
    ``pool`` batches by length, cut into batches, shuffle the batches. Random batches of docstrings
    would mostly pad to the longest one (several times the tokens)."""
    order = rng.permutation(len(examples))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start : start + batch_size * pool].tolist(), key=lambda i: len(examples[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _validation_split(count: int, wanted: int, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) indices; validation is empty when the data is too small to spare it."""
    wanted = min(wanted, count // 10)
    order = np.random.default_rng(seed + 1).permutation(count).tolist()
    return sorted(order[wanted:]), sorted(order[:wanted])


def batch_loss(objective, student, student_modules, teacher, teacher_modules, feeds: dict):
    """The objective on one padded batch: the teacher without gradients, the student with them
    (unless the caller disabled them)."""
    import torch

    mask = torch.as_tensor(feeds["attention_mask"], device=student.device)
    with torch.no_grad(), recording(teacher_modules) as teacher_attn:
        teacher_out = _forward(teacher, feeds, hidden_states=True)
    with recording(student_modules) as student_attn:
        student_out = _forward(student, feeds, hidden_states=True)
        return distillation_loss(objective, student_out, teacher_out, student_attn, teacher_attn, mask)


def validation_loss(objective, student, student_modules, teacher, teacher_modules, examples, names,
                    batch_size: int = 16) -> float:
    """The objective averaged over ``examples`` (batches of similar lengths), without gradients."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            feeds = pad_batch([examples[i] for i in order[start : start + batch_size]], names)
            loss = batch_loss(objective, student, student_modules, teacher, teacher_modules, feeds)
            total += float(loss) * len(feeds["attention_mask"])
            weight += len(feeds["attention_mask"])
    return total / max(weight, 1)


def _save_checkpoint(path: str, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def distill(student, student_modules, teacher, teacher_modules, examples: list[np.ndarray], names: list[str],
            config: RecoverConfig, fingerprint: str = "", log=print, show_progress: bool = True) -> dict:
    """Fine-tune ``student`` in place.

    A few inputs (``config.validation_examples``) are held out of training; every
    ``validate_every`` steps and at the end the objective is measured on them, and the student
    ends in the state where it was lowest, the untrained pruned model's included. Fine-tuning
    can overfit the unlabelled text and move away from the teacher elsewhere (measured: at
    p = 0.5 on 1 356 docstrings, held-out cosine fell from 0.9975 to 0.9955); this keeps the
    result no worse than what pruning alone gave, as far as unseen text tells.

    Returns ``{steps, elapsed_s, cpu_s, stopped_by, losses, resumed_from_step, best_step,
    validation}``: ``elapsed_s`` is wall-clock training time (what the time budget counts, the
    validation passes included), ``cpu_s`` this process's CPU time.
    """
    import torch

    if config.objective not in OBJECTIVES:
        raise OnnxpruneError(f"--objective must be one of {OBJECTIVES}, got {config.objective!r}")
    if len(examples) < 1:
        raise OnnxpruneError("no training examples")
    if config.validation_examples < 0:
        raise OnnxpruneError(f"validation_examples must be 0 or more, got {config.validation_examples}")
    # Token embeddings stay: pruning changed attention, not the vocabulary, and a tied LM head
    # (GPT-2) then still fits the recovered hidden states. Fewer parameters also step faster.
    student.get_input_embeddings().weight.requires_grad_(False)
    training, held_out = _validation_split(len(examples), config.validation_examples, config.seed)
    validation_examples = [examples[i] for i in held_out]
    examples = [examples[i] for i in training]
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    step, elapsed, cpu, losses = 0, 0.0, 0.0, []
    validation: list[list[float]] = []
    best: dict = {"step": 0, "loss": math.inf, "state": None}
    if config.checkpoint and Path(config.checkpoint).is_file():
        state = torch.load(config.checkpoint, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise OnnxpruneError(
                f"{config.checkpoint}: checkpoint of another run (other model, layouts, data or objective); "
                "delete it or pass another --checkpoint"
            )
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step, elapsed, losses, order = state["step"], state["elapsed_s"], state["losses"], state["order"]
        cpu = state["cpu_s"]
        validation, best = state.get("validation", []), state.get("best", best)
        log(f"resumed from {config.checkpoint} at step {step} ({elapsed:.0f} s trained)")
    else:
        order = []  # the batches (lists of example indices) still to run in this pass over the data
    resumed_from = step

    def checkpoint() -> None:
        if config.checkpoint:
            _save_checkpoint(config.checkpoint, {
                "fingerprint": fingerprint, "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": rng.bit_generator.state, "order": order, "step": step, "elapsed_s": elapsed, "cpu_s": cpu, "losses": losses,
                "validation": validation, "best": best,
            })

    def validate() -> None:
        nonlocal elapsed, cpu
        if not validation_examples or (validation and validation[-1][0] == step):
            return
        started, started_cpu = time.perf_counter(), time.process_time()
        loss = validation_loss(config.objective, student, student_modules, teacher, teacher_modules,
                               validation_examples, names)
        validation.append([step, loss])
        if loss < best["loss"]:
            best.update(step=step, loss=loss, state={k: v.detach().clone() for k, v in student.state_dict().items()})
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        log(f"step {step}: validation loss {loss:.5f} (best {best['loss']:.5f} at step {best['step']})")

    # Dropout off: the target is the teacher's deterministic output.
    student.eval()
    stopped_by = "steps"
    validate()
    bar = progress(range(step, config.steps), total=config.steps - step, desc="recovering", unit="step",
                   enabled=show_progress)
    for _ in bar:
        if config.time_budget_s is not None and elapsed >= config.time_budget_s:
            stopped_by = "time budget"
            break
        started, started_cpu = time.perf_counter(), time.process_time()
        if not order:
            order = _length_bucketed_batches(examples, config.batch_size, rng)
        chosen, order = order[0], order[1:]
        loss = batch_loss(config.objective, student, student_modules, teacher, teacher_modules,
                          pad_batch([examples[i] for i in chosen], names))
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step, elapsed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        losses.append(float(loss.detach()))
        if validation_examples and step % config.validate_every == 0:
            validate()
            if config.patience and step - best["step"] >= config.patience * config.validate_every:
                stopped_by = "no improvement"
                log(f"step {step}: no better validation loss in {config.patience} passes; stopping")
                break
        if config.checkpoint and step % config.checkpoint_every == 0:
            checkpoint()
        if step % config.log_every == 0:
            recent = losses[-config.log_every :]
            log(f"step {step}/{config.steps}  loss {np.mean(recent):.5f}  {elapsed:.0f} s")
    else:
        if config.time_budget_s is not None and elapsed >= config.time_budget_s and step < config.steps:
            stopped_by = "time budget"
    validate()
    checkpoint()
    if best["state"] is not None and best["step"] != step:
        student.load_state_dict(best["state"])
        log(f"kept the state of step {best['step']} (validation loss {best['loss']:.5f}; "
            f"step {step}: {validation[-1][1]:.5f})")
    return {"steps": step, "elapsed_s": elapsed, "cpu_s": cpu, "stopped_by": stopped_by, "losses": losses,
            "resumed_from_step": resumed_from, "best_step": best["step"] if validation_examples else step,
            "validation": validation}


# ---------------------------------------------------------------------------------------------
# Export again with the same layouts


def prune_with_layouts(dense_path: str | os.PathLike, pruned: Layouts, extra_metadata: dict[str, str]):
    """``dense_path`` pruned with ``pruned``'s layouts, given to its attention sites in order."""
    from onnxprune.passes import prune_passes
    from onnxprune.rules import find_sites

    model = load_model(dense_path).model
    # A fresh export may name its sites differently: the layouts follow the order the sites run in.
    layouts = pruned.renamed([s.name for s in find_sites(model).sites])
    prune_passes(layouts)(model)
    model.metadata_props.update(layouts.metadata_props())
    model.metadata_props.update(extra_metadata)
    return model


def recover(
    model_dir: str | os.PathLike,
    pruned_path: str | os.PathLike,
    examples: list[np.ndarray],
    output: str | os.PathLike,
    config: RecoverConfig | None = None,
    threads: int | None = None,
    parity_examples: int = 16,
    log=print,
    show_progress: bool = True,
) -> RecoverReport:
    """Fine-tune ``model_dir``'s model under ``pruned_path``'s layouts and write the recovered pruned model."""
    import torch

    from onnxprune.export import export
    from onnxprune.model_io import save_model

    config = config or RecoverConfig()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    pruned_file = load_model(pruned_path)
    pruned, names = load_layouts(pruned_file), pruned_file.info.input_names
    student, student_modules, teacher, teacher_modules = masked_pair(load_pretrained(model_dir), pruned)
    check = examples[:parity_examples]
    before = parity(student, pruned_path, check, names, threads)
    if before > PARITY_ATOL:
        raise OnnxpruneError(
            f"the masked PyTorch model differs from {pruned_path} by {before:.2e} (> {PARITY_ATOL:g}): "
            "is it the model that was exported and pruned?"
        )
    log(f"masked PyTorch model matches {pruned_path}: max |diff| {before:.2e}")
    fingerprint = json.dumps([pruned_file.info.sha256, config.objective, config.batch_size, config.seed,
                              config.validation_examples, len(examples), int(sum(len(e) for e in examples))])
    run = distill(student, student_modules, teacher, teacher_modules, examples, names, config, fingerprint, log,
                  show_progress)

    with tempfile.TemporaryDirectory(prefix="onnxprune-recover-") as tmp:
        weights = Path(tmp) / "model"
        student.config._attn_implementation = "eager"
        student.save_pretrained(str(weights))
        dense = Path(tmp) / "recovered-dense.onnx"
        positions = getattr(student.config, "max_position_embeddings", None) or getattr(student.config, "n_positions", 128)
        # A traced length below the position table's size keeps the exported length dynamic.
        export(weights, dense, seq_len=min(64, positions // 2), opset=pruned_file.info.opset() or 20, attn="eager", log=log)
        model = prune_with_layouts(dense, pruned, {
            RECOVERED_KEY: json.dumps({"objective": config.objective, "steps": run["steps"],
                                               "kept_step": run["best_step"],
                                               "elapsed_s": round(run["elapsed_s"], 1),
                                               "examples": len(examples), "from": Path(pruned_path).name}),
        })
        save_model(model, output)
    apply_layouts(student, pruned)
    after = parity(student, output, check, names, threads)
    if after > PARITY_ATOL:
        raise OnnxpruneError(f"the recovered ONNX model differs from the fine-tuned PyTorch model by {after:.2e}")
    log(f"wrote {output}: {run['steps']} steps in {run['elapsed_s']:.0f} s; "
        f"recovered ONNX vs fine-tuned PyTorch max |diff| {after:.2e}")
    return RecoverReport(output=str(output), steps=run["steps"], elapsed_s=run["elapsed_s"], cpu_s=run["cpu_s"],
                         stopped_by=run["stopped_by"], losses=run["losses"], parity_before=before,
                         parity_after=after, resumed_from_step=run["resumed_from_step"], best_step=run["best_step"],
                         validation=run["validation"])
