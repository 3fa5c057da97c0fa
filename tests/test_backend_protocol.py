"""Both backend classes satisfy the Backend Protocol: every method, with the same signature."""
from __future__ import annotations

import inspect

import pytest

from shared.training.backend import Backend
from reasoning_mlx.backend import MLXBackend
from reasoning_torch.backend import TorchBackend

PROTOCOL_METHODS = sorted(name for name, value in vars(Backend).items()
                          if inspect.isfunction(value) and not name.startswith("_"))


def test_the_protocol_names_the_methods_the_driver_calls():
    assert {"load", "seed", "set_reference", "generate", "completion_logprobs", "sft_step", "grpo_step",
            "weights_are_finite", "save"} <= set(PROTOCOL_METHODS)


@pytest.mark.parametrize("backend_class", [TorchBackend, MLXBackend], ids=["torch", "mlx"])
@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_backend_method_matches_the_protocol(backend_class, method):
    assert hasattr(backend_class, method), f"{backend_class.__name__} lacks {method}"
    assert inspect.signature(getattr(backend_class, method)) == inspect.signature(getattr(Backend, method))


@pytest.mark.parametrize("backend_class", [TorchBackend, MLXBackend], ids=["torch", "mlx"])
def test_backend_has_the_protocol_attributes(backend_class):
    backend = backend_class()
    assert backend.name in ("torch", "mlx") and hasattr(backend, "tokenizer")
