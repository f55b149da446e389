"""Greedy tokens from Optimum's ``ORTModelForCausalLM`` on model directories that onnxprune
exported (``--task text-generation-with-past``) or pruned: the check that Optimum's own client
drives our files, as README's "Use the pruned model from Optimum" does. Runs in an environment
with optimum-onnx 0.1.0, which needs transformers < 4.58, and onnxprune (`make client` builds one,
.venv-client):

    .venv-client/bin/python tools/optimum_generate.py DIR [DIR ...] --prompt "Once upon a time" \\
        --max-new-tokens 32

Prints one JSON object, ``{"token_ids": [[...], ...]}``: each directory's new tokens, in order
(one process for all, as loading torch and Optimum takes longer than generating). Each session
registers the custom-op library (``--library``, by default ``onnxprune.library_path()``), so a
pruned model runs onnxprune's kernel; generation ignores end tokens, so each gives
``--max-new-tokens``. tests/test_generate.py runs it when ``ONNXPRUNE_OPTIMUM_PYTHON`` names such
an environment's python.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dirs", nargs="+", metavar="DIR", help="model.onnx, config.json and tokenizer files")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--library", help="the custom-op library (default: onnxprune.library_path())")
    args = p.parse_args()
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    if args.library is None:
        import onnxprune

        args.library = onnxprune.library_path()
    token_ids = []
    for folder in args.model_dirs:
        options = ort.SessionOptions()
        options.register_custom_ops_library(args.library)
        model = ORTModelForCausalLM.from_pretrained(folder, session_options=options)
        inputs = AutoTokenizer.from_pretrained(folder)(args.prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        token_ids.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    print(json.dumps({"token_ids": token_ids}))


if __name__ == "__main__":
    main()
