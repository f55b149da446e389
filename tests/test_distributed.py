"""Sharded calibration (onnxprune.distributed): in process and on a local Ray instance of 2 CPUs,
the statistics equal one ordinary calibrate() over all the data, also when an actor is killed."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cli_models
import text_models
from onnxprune.calibrate import calibrate
from onnxprune.cli import main
from onnxprune.data import Dataset, chunked, load_tokenizer, tokenize
from onnxprune.distributed import ShardSpec, calibrate_sharded
from onnxprune.errors import OnnxpruneError
from onnxprune.stats import Stats

MAX_LENGTH = 64
INPUTS = ("input_ids", "attention_mask")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (start-up costs seconds): 2 CPUs, workers importing
    the same onnxprune and test modules as this process."""
    ray = pytest.importorskip("ray")
    import onnxprune

    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(Path(onnxprune.__file__).resolve().parent.parent), str(here)])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The text model, its tokenizer, 48 texts (some chunked at 64 tokens) and the statistics of
    one ordinary calibrate() over all of them."""
    root = tmp_path_factory.mktemp("distributed")
    model = text_models.text_encoder(root / "model.onnx")
    tokenizer = text_models.tokenizer(root)
    texts = text_models.sentences(48, seed=1)
    examples = tokenize(texts, load_tokenizer(tokenizer), MAX_LENGTH)
    assert len(examples) > len(texts)  # long texts were chunked
    whole = calibrate(str(model), Dataset(examples, INPUTS), granularity=16, max_length=MAX_LENGTH, batch_size=5,
                      show_progress=False)
    spec = ShardSpec(str(model), INPUTS, tokenizer.read_text(), granularity=16, max_length=MAX_LENGTH, batch_size=4)
    return {"root": root, "model": model, "tokenizer": tokenizer, "texts": texts, "whole": whole, "spec": spec}


def assert_equal_stats(a: Stats, b: Stats) -> None:
    """Counts and lengths exactly; sums up to the order of floating-point additions."""
    assert (a.granularity, a.max_length, a.model_sha256, a.sites, a.num_samples) == (
        b.granularity, b.max_length, b.model_sha256, b.sites, b.num_samples)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    for site in a.sites:
        np.testing.assert_array_equal(a.counts[site], b.counts[site])
        np.testing.assert_allclose(a.sums[site], b.sums[site], rtol=1e-9, atol=0)


def test_shards_in_process_equal_one_run(corpus):
    stats = calibrate_sharded(corpus["spec"], chunked(corpus["texts"], 7), show_progress=False)
    assert_equal_stats(stats, corpus["whole"])


def test_shards_on_ray_equal_one_run(corpus, ray_local):
    stats = calibrate_sharded(corpus["spec"], chunked(corpus["texts"], 5), workers=2, show_progress=False)
    assert_equal_stats(stats, corpus["whole"])


class HoldShard:
    """A task hook: the first attempt at shard ``index`` writes its process id to ``marker`` and
    waits (to be killed); a rerun finds the marker and goes on."""

    def __init__(self, index: int, marker: Path):
        self.index, self.marker = index, marker

    def __call__(self, index: int) -> None:
        if index != self.index or self.marker.exists():
            return
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(self.marker)
        time.sleep(120)


def test_killed_actor_reruns_its_shard(corpus, ray_local, tmp_path):
    marker = tmp_path / "held.pid"
    killed = []

    def kill_when_held():
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            pid = int(marker.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_held, daemon=True)
    killer.start()
    stats = calibrate_sharded(corpus["spec"], chunked(corpus["texts"], 5), workers=2, show_progress=False,
                              before_shard=HoldShard(3, marker))
    killer.join(timeout=5)
    assert killed, "shard 3 was never held, so no actor was killed"
    assert_equal_stats(stats, corpus["whole"])


def test_cli_workers_equal_in_process(corpus, ray_local, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(corpus["texts"])))
    common = ["calibrate", str(corpus["model"]), "--data", str(data), "--text-field", "body", "--tokenizer",
              str(corpus["tokenizer"]), "--max-length", str(MAX_LENGTH), "--shard-size", "6", "-q"]
    assert main([*common, "-o", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--workers", "2", "-o", str(tmp_path / "two.safetensors")]) == 0
    one, two = Stats.load(tmp_path / "one.safetensors"), Stats.load(tmp_path / "two.safetensors")
    assert_equal_stats(one, corpus["whole"])
    assert_equal_stats(two, one)


def test_worker_errors_are_one_line(ray_local, tmp_path, capsys):
    model = cli_models.save(cli_models.attention_encoder(), tmp_path / "encoder.onnx")
    data = cli_models.npz_inputs(tmp_path / "inputs.npz", seq_len=40)
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(model), "--data", str(data), "--max-length", "32", "--workers", "2",
                 "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "more than --max-length 32" in err
    assert not out.exists()


def test_workers_without_ray_explain_the_extra(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(OnnxpruneError, match=r"pip install 'onnxprune\[distributed\]'"):
        calibrate_sharded(corpus["spec"], chunked(corpus["texts"], 5), workers=2, show_progress=False)


def test_ray_address_needs_workers(corpus, tmp_path, capsys):
    assert main(["calibrate", str(corpus["model"]), "--data", str(tmp_path / "x.txt"), "--ray-address", "auto",
                 "-o", str(tmp_path / "s.safetensors")]) == 2
    assert "--ray-address needs --workers" in capsys.readouterr().err


def test_a_model_workers_refuse_is_one_line(ray_local, tmp_path, capsys):
    model = cli_models.save(cli_models.mlp(), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "inputs.npz", X=np.zeros((4, cli_models.HIDDEN), np.float32))
    assert main(["calibrate", str(model), "--data", str(tmp_path / "inputs.npz"), "--workers", "1",
                 "-o", str(tmp_path / "s.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no attention site found" in err



def test_more_workers_than_cpus_is_refused(corpus, ray_local):
    with pytest.raises(OnnxpruneError, match=r"--workers 3 × --threads 1 needs 3 CPUs; the Ray cluster has 2"):
        calibrate_sharded(corpus["spec"], chunked(corpus["texts"], 5), workers=3, show_progress=False)
