"""recover: the masked PyTorch model equals the pruned ONNX model; distillation lowers the loss,
resumes exactly from a checkpoint, and exports a pruned model that runs with the library and
matches the fine-tuned PyTorch model."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_token_examples
from models import tiny
from onnxprune.errors import OnnxpruneError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

MAX_POSITIONS = tiny.MAX_POSITIONS


def _save_tiny(arch: str, folder) -> str:
    path = folder / arch
    tiny.transformers_model(arch, attn=None, seed=1).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory):
    """``pruned_tiny(arch, p)``: (model dir, pruned .onnx, examples), built once per (arch, p)."""
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.export import export
    from onnxprune.model_io import read_info, save_model
    from onnxprune.prune import prune

    folder = tmp_path_factory.mktemp("recover")
    examples = random_token_examples(48, seed=3, low=20, high=MAX_POSITIONS)
    cache: dict = {}

    def get(arch: str, p: float):
        if arch not in cache:
            model_dir = _save_tiny(arch, folder)
            dense = folder / f"{arch}.onnx"
            export(model_dir, dense, seq_len=32, log=lambda *a: None)
            stats = calibrate(dense, Dataset(examples, read_info(dense).input_names), max_length=MAX_POSITIONS,
                              show_progress=False)
            cache[arch] = (model_dir, dense, stats)
        model_dir, dense, stats = cache[arch]
        pruned = folder / f"{arch}.p{int(p * 100)}.onnx"
        if not pruned.exists():
            save_model(prune(dense, stats, p, block_size=16)[0], pruned)
        return model_dir, str(pruned), examples

    return get


@pytest.mark.parametrize("arch,p", [("bert", 0.0), ("bert", 0.9), ("gpt2", 0.5), ("gpt2", 0.9)])
def test_masked_torch_equals_pruned_onnx(pruned_tiny, arch, p):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import load_pretrained, masked_pair, parity

    model_dir, pruned, examples = pruned_tiny(arch, p)
    layouts = load_layouts(pruned)
    student, _, teacher, _ = masked_pair(load_pretrained(model_dir), layouts)
    names = read_info(pruned).input_names
    assert parity(student, pruned, examples[:12], names) < 1e-4
    if p >= 0.5:  # the layouts really change the output: the dense teacher does not match
        assert parity(teacher, pruned, examples[:12], names) > 1e-3


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_prune_and_recover_rewrite_the_sites_alike(pruned_tiny, arch):
    # The same pipeline: recover's re-export takes key_padding_mask where prune did, not the S×S attn_mask.
    from pathlib import Path

    from onnxprune.layouts import attention_nodes, load_layouts
    from onnxprune.model_io import load_model
    from onnxprune.recover import prune_with_layouts

    _, pruned, _ = pruned_tiny(arch, 0.5)
    dense = Path(pruned).parent / f"{arch}.onnx"

    def calls(model):
        return [([v.name if v is not None else "" for v in n.inputs], n.attributes["is_causal"].as_int())
                for n in attention_nodes(model.graph)]

    recovered = calls(prune_with_layouts(dense, load_layouts(pruned), {}))
    assert recovered == calls(load_model(pruned).model)
    assert len(recovered) == 2
    assert all(inputs[4:6] == ["", "attention_mask"] for inputs, _ in recovered)
    assert all(inputs[6].startswith("onnxprune.layout_rule.") for inputs, _ in recovered)  # the rules carry over
    assert {causal for _, causal in recovered} == {int(arch == "gpt2")}


def _config(**overrides):
    from onnxprune.recover import RecoverConfig

    settings = dict(steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=100)
    settings.update(overrides)
    return RecoverConfig(**settings)


@pytest.mark.parametrize("objective", ["embedding", "hidden", "hidden+attention"])
def test_distillation_lowers_the_loss(pruned_tiny, objective):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import distill, load_pretrained, masked_pair

    model_dir, pruned, examples = pruned_tiny("bert", 0.9)
    student, s_mods, teacher, t_mods = masked_pair(load_pretrained(model_dir), load_layouts(pruned))
    run = distill(student, s_mods, teacher, t_mods, examples, read_info(pruned).input_names, _config(objective=objective, steps=30),
                  log=lambda *a: None, show_progress=False)
    assert run["steps"] == 30 and run["stopped_by"] == "steps"
    assert np.mean(run["losses"][-5:]) < 0.7 * np.mean(run["losses"][:5])


def test_resume_continues_where_it_stopped(pruned_tiny, tmp_path):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import distill, load_pretrained, masked_pair

    model_dir, pruned, examples = pruned_tiny("bert", 0.5)
    layouts, names = load_layouts(pruned), read_info(pruned).input_names
    quiet = dict(log=lambda *a: None, show_progress=False)

    straight = masked_pair(load_pretrained(model_dir), layouts)
    distill(*straight, examples, names, _config(steps=8), **quiet)

    def interrupt_at_step_4(message):
        if message.startswith("step 4/"):
            raise KeyboardInterrupt

    checkpoint = str(tmp_path / "run.ckpt")
    first = masked_pair(load_pretrained(model_dir), layouts)
    with pytest.raises(KeyboardInterrupt):
        distill(*first, examples, names, _config(steps=8, checkpoint=checkpoint, checkpoint_every=1, log_every=1),
                log=interrupt_at_step_4, show_progress=False)
    second = masked_pair(load_pretrained(model_dir), layouts)  # a fresh process would start from the file
    run = distill(*second, examples, names, _config(steps=8, checkpoint=checkpoint), **quiet)
    assert run["resumed_from_step"] == 4 and run["steps"] == 8
    for a, b in zip(straight[0].parameters(), second[0].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_checkpoint_of_another_run_is_refused(pruned_tiny, tmp_path):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import distill, load_pretrained, masked_pair

    model_dir, pruned, examples = pruned_tiny("bert", 0.5)
    layouts, names = load_layouts(pruned), read_info(pruned).input_names
    checkpoint = str(tmp_path / "run.ckpt")
    distill(*masked_pair(load_pretrained(model_dir), layouts), examples, names, _config(steps=2, checkpoint=checkpoint),
            fingerprint="a", log=lambda *a: None, show_progress=False)
    with pytest.raises(OnnxpruneError, match="checkpoint of another run"):
        distill(*masked_pair(load_pretrained(model_dir), layouts), examples, names,
                _config(steps=4, checkpoint=checkpoint), fingerprint="b", log=lambda *a: None, show_progress=False)


def test_time_budget_stops_training(pruned_tiny):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import distill, load_pretrained, masked_pair

    model_dir, pruned, examples = pruned_tiny("bert", 0.5)
    run = distill(*masked_pair(load_pretrained(model_dir), load_layouts(pruned)), examples, read_info(pruned).input_names,
                  _config(steps=10_000, time_budget_s=2.0), log=lambda *a: None, show_progress=False)
    assert run["stopped_by"] == "time budget" and 0 < run["steps"] < 10_000


def test_validation_keeps_the_state_with_the_lowest_held_out_loss(pruned_tiny):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import _validation_split, distill, load_pretrained, masked_pair, validation_loss

    model_dir, pruned, examples = pruned_tiny("bert", 0.9)
    names = read_info(pruned).input_names
    pair = masked_pair(load_pretrained(model_dir), load_layouts(pruned))
    config = _config(steps=12, validate_every=3, validation_examples=8, objective="hidden")
    run = distill(*pair, examples, names, config, log=lambda *a: None, show_progress=False)
    steps, losses = zip(*run["validation"])
    assert steps == (0, 3, 6, 9, 12)
    assert run["best_step"] == steps[int(np.argmin(losses))]
    # The student ends in that state: its loss on the held-out inputs is the recorded minimum.
    _, held_out = _validation_split(len(examples), 8, config.seed)
    again = validation_loss("hidden", *pair, [examples[i] for i in held_out], names)
    assert again == pytest.approx(min(losses), rel=1e-5)


def test_a_diverging_run_ends_as_the_pruned_model(pruned_tiny):
    # A learning rate far too high wrecks the student; validation sees it and keeps step 0's state.
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import distill, load_pretrained, masked_pair

    model_dir, pruned, examples = pruned_tiny("bert", 0.5)
    student, s_mods, teacher, t_mods = masked_pair(load_pretrained(model_dir), load_layouts(pruned))
    run = distill(student, s_mods, teacher, t_mods, examples, read_info(pruned).input_names,
                  _config(steps=6, learning_rate=3.0, warmup_steps=1, validate_every=3, validation_examples=8),
                  log=lambda *a: None, show_progress=False)
    assert run["best_step"] == 0 and run["validation"][-1][1] > run["validation"][0][1]
    for a, b in zip(student.parameters(), teacher.parameters()):  # the teacher is the untouched copy
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_patience_stops_a_run_that_no_longer_improves(pruned_tiny):
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import distill, load_pretrained, masked_pair

    model_dir, pruned, examples = pruned_tiny("bert", 0.5)
    config = _config(steps=1000, learning_rate=3.0, warmup_steps=1, validate_every=2, validation_examples=8, patience=2)
    run = distill(*masked_pair(load_pretrained(model_dir), load_layouts(pruned)), examples, read_info(pruned).input_names, config,
                  log=lambda *a: None, show_progress=False)
    assert run["stopped_by"] == "no improvement" and run["best_step"] == 0 and run["steps"] == 4


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_recovered_model_is_a_pruned_onnx_matching_torch(pruned_tiny, tmp_path, ops_library, arch):
    import onnx

    from onnxprune.layouts import load_layouts
    from onnxprune.masked_attention import apply_layouts
    from onnxprune.model_io import read_info
    from onnxprune.recover import load_pretrained, parity, recover

    model_dir, pruned, examples = pruned_tiny(arch, 0.5)
    output = tmp_path / "recovered.onnx"
    # No validation: the last state is exported whatever it scores (the test is about the export).
    report = recover(model_dir, pruned, examples, output, _config(steps=6, validation_examples=0), log=lambda *a: None,
                     show_progress=False)
    before, after = load_layouts(pruned), load_layouts(output)
    assert after.block_size == before.block_size
    assert len(after.sites) == len(before.sites)
    for a, b in zip(before.sites.values(), after.sites.values()):
        np.testing.assert_array_equal(a.layout, b.layout)
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert metadata["onnxprune.sparsity"] == "0.5" and '"steps": 6' in metadata["onnxprune.recovered"]
    assert report.parity_before < 1e-4 and report.parity_after < 1e-4
    # The weights changed: the recovered file no longer equals the original masked model.
    original = load_pretrained(model_dir)
    apply_layouts(original, before)
    assert parity(original, output, examples[:8], read_info(output).input_names) > 1e-4


def test_cli_recover_with_npz_data(pruned_tiny, tmp_path, ops_library):
    from onnxprune.cli import main
    from onnxprune.data import pad_batch
    from onnxprune.model_io import read_info

    model_dir, pruned, examples = pruned_tiny("bert", 0.5)
    np.savez(tmp_path / "data.npz", **pad_batch(examples[:16], read_info(pruned).input_names))
    output = tmp_path / "out.onnx"
    code = main(["recover", model_dir, pruned, "--data", str(tmp_path / "data.npz"), "--steps", "3",
                 "--batch-size", "4", "-o", str(output), "--report", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0 and output.is_file() and (tmp_path / "out.onnx.ckpt").is_file()
    assert main(["recover", model_dir, str(tmp_path / "data.npz"), "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "x.onnx"), "--quiet"]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse: one line on stderr, exit 2, nothing written
        main(["recover", model_dir, pruned, "--data", str(tmp_path / "data.npz"), "--validation-examples", "-1",
              "-o", str(tmp_path / "y.onnx"), "--quiet"])
    assert refused.value.code == 2 and not (tmp_path / "y.onnx").exists()


@pytest.mark.parametrize("arch,expected", [("bert", ["input_ids", "attention_mask", "token_type_ids"]),
                                           ("gpt2", ["input_ids", "attention_mask"])])
def test_export_passes_token_types_only_to_models_with_a_table(pruned_tiny, arch, expected):
    # GPT-2 embeds token_type_ids with its word embeddings: a zero input would shift every position.
    from onnxprune.model_io import read_info

    _, pruned, _ = pruned_tiny(arch, 0.5)
    assert read_info(pruned).input_names == expected
