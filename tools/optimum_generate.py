"""Greedy tokens from Optimum's ``ORTModelForCausalLM`` on a model directory that onnxprune
exported (``--task text-generation-with-past``) or pruned: the check that Optimum's client drives
our files. Runs in its own environment, as optimum-onnx 0.1.0 needs transformers < 4.58:

    python -m venv optimum-venv && optimum-venv/bin/pip install "optimum-onnx==0.1.0" "transformers<4.58"
    optimum-venv/bin/python tools/optimum_generate.py MODEL_DIR --library libonnxprune_ops.so \\
        --prompt-ids 5 17 42 --max-new-tokens 32

Prints one JSON object: ``{"token_ids": [...]}`` (the new tokens). The library is registered in
the session options, so a pruned model runs onnxprune's kernel. tests/test_generate.py runs it
when ``ONNXPRUNE_OPTIMUM_PYTHON`` names such an environment's python.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--library", help="libonnxprune_ops.so (needed for a pruned model)")
    p.add_argument("--prompt-ids", type=int, nargs="+", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    if args.library:
        options.register_custom_ops_library(args.library)
    model = ORTModelForCausalLM.from_pretrained(args.model_dir, session_options=options, use_cache=True,
                                                use_io_binding=False)
    ids = torch.tensor([args.prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    print(json.dumps({"token_ids": out[0, len(args.prompt_ids):].tolist()}))


if __name__ == "__main__":
    main()
