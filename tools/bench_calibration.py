"""Peak memory and time of ``calibrate`` against a plain ONNX Runtime forward pass of the dense
model, on the same inputs, one subprocess per case (so each peak RSS is its own), interleaved.

The model is a random-init Llama with SmolLM2-135M's exact shapes (30 layers, hidden 576, 9 query
/ 3 KV heads, head 64, intermediate 1536, vocab 49152, rope theta 100000, 8192 positions),
saved as a transformers directory and exported with ``onnxprune.export``: random weights cost
the same memory and time as the real ones.

    python tools/bench_calibration.py                      # 1024 2048 4096 8192, 2 threads
    python tools/bench_calibration.py --lengths 1024 --documents 2
    python tools/bench_calibration.py --model other.onnx   # any exported model

Each case reports the peak resident memory (``ru_maxrss``) and the wall time from loading the
model to the end (``calibrate`` includes its rewrite; the forward pass its session), and the
load average, since the machine may be shared. Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's onnxprune, not an installed one
DEFAULT_FOLDER = ROOT / "out" / "bench_calibration"

SMOLLM2_SHAPES = dict(
    num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def smollm2_shaped(folder: Path) -> Path:
    """The exported random-init SmolLM2-shaped model (built on first use)."""
    onnx_path = folder / "smollm2-shaped.onnx"
    if onnx_path.exists():
        return onnx_path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnxprune.export import export

    model_dir = folder / "smollm2-shaped"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)).save_pretrained(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    export(model_dir, onnx_path, seq_len=64)
    return onnx_path


def inputs(length: int, documents: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(3, 49152, size=length).astype(np.int64) for _ in range(documents)]


def run_case(mode: str, model: str, length: int, documents: int, threads: int) -> dict:
    """One case in this process; returns its measurements."""
    start = time.perf_counter()
    if mode == "forward":
        from onnxprune.data import Dataset
        from onnxprune.model_io import read_info
        from onnxprune.runtime import session

        names = read_info(model).input_names
        sess = session(model, threads=threads, with_library=False)
        for feeds in Dataset(inputs(length, documents), names).batches(1):
            sess.run(None, feeds)
    else:
        from onnxprune.calibrate import calibrate
        from onnxprune.data import Dataset
        from onnxprune.model_io import load_model

        loaded = load_model(model)
        stats = calibrate(loaded, Dataset(inputs(length, documents), loaded.info.input_names), max_length=length,
                          threads=threads, show_progress=False)
        assert stats.num_samples == documents
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"mode": mode, "length": length, "documents": documents, "seconds": seconds, "peak_bytes": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported .onnx (default: the SmolLM2-shaped random Llama)")
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER), help="where the default model is built")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--documents", type=int, default=1, help="inputs per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["forward", "calibrate"], choices=["forward", "calibrate"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--case", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)  # one subprocess
    args = parser.parse_args(argv)
    model = args.model or str(smollm2_shaped(Path(args.folder)))
    if args.case:
        result = run_case(args.case[0], model, int(args.case[1]), args.documents, args.threads)
        print(json.dumps(result))
        return
    results = []
    print(f"{'length':>6} {'mode':>9} {'peak GB':>8} {'seconds':>8} {'load':>5}")
    for length in args.lengths:
        for mode in args.modes:  # interleaved: both modes see the same load
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--model", model, "--documents", str(args.documents),
                   "--threads", str(args.threads), "--case", mode, str(length)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                result = {"mode": mode, "length": length, "documents": args.documents, "failed": done.returncode,
                          "stderr": done.stderr[-400:]}
                print(f"{length:>6} {mode:>9} failed (exit {done.returncode}; {done.stderr.strip()[-120:]})")
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{length:>6} {mode:>9} {result['peak_bytes'] / 1e9:>8.2f} {result['seconds']:>8.1f} {load:>5.1f}")
            result["load_average"] = load
            results.append(result)
            sys.stdout.flush()
    by = {(r["length"], r["mode"]): r for r in results if "seconds" in r}
    for length in args.lengths:
        fwd, cal = by.get((length, "forward")), by.get((length, "calibrate"))
        if fwd and cal:
            print(f"{length}: calibrate/forward peak {cal['peak_bytes'] / fwd['peak_bytes']:.2f}x, "
                  f"speed {fwd['seconds'] / cal['seconds']:.2f}x of the forward pass")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
