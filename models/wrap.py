"""A module that takes its inputs as named tensors and returns one tensor: the form that
``torch.onnx.export`` and ``onnxprune export``'s ``module:function`` recipes take."""

from __future__ import annotations

from collections.abc import Callable


def last_hidden_state(output):
    return output.last_hidden_state


def named_inputs(model, names: list[str], output: Callable = last_hidden_state, **fixed):
    """``model`` called with the inputs ``names`` (and the keyword arguments ``fixed``, such as
    ``use_cache=False``), returning ``output(model(...))``."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.eval()

        def call(self, **inputs):
            return output(self.model(**inputs, **fixed))

    # forward(self, input_ids, attention_mask, ...) with named parameters: torch.export matches
    # dynamic shapes by parameter name, and **kwargs would hide them.
    signature = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {signature}):\n    return self.call({', '.join(f'{n}={n}' for n in names)})", namespace)
    Wrapped.forward = namespace["forward"]
    return Wrapped().eval()
