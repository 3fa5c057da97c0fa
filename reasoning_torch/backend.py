"""The PyTorch backend: transformers + peft behind shared.backend.Backend."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

from shared.backend import GRPOBatch, TokenBatch
from shared.config import GRPOConfig, ModelConfig
from shared.grpo import policy_drift
from shared.prompts import stop_token_ids
from reasoning_torch.generate import generate
from reasoning_torch.losses import grpo_loss, sft_loss, to_tensors, token_logprobs
from reasoning_torch.model import load_model, pick_device, save_model
from reasoning_torch.optimizer import load_optimizer_state, make_optimizer, save_optimizer_state


class TorchBackend:
    name = "torch"

    def __init__(self, micro_batch_size: int = 64, device: str | None = None):
        self.device = torch.device(device) if device else pick_device()
        self.micro_batch_size = micro_batch_size
        self.model = self.tokenizer = self.optimizer = self.reference = None
        self.saved_optimizer_state: dict[str, torch.Tensor] = {}

    def load(self, model_path: Path, model: ModelConfig, trainable: bool = True) -> None:
        self.model, self.tokenizer = load_model(model_path, model, self.device, trainable)
        self.optimizer = self.reference = None
        self.saved_optimizer_state = load_optimizer_state(Path(model_path)) if trainable else {}

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_reference(self, folder: Path | None = None) -> None:
        if hasattr(self.model, "disable_adapter"):
            return
        if folder is None:
            self.reference = copy.deepcopy(self.model)
        else:
            self.reference, _ = load_model(folder, ModelConfig(finetune="full"), self.device, trainable=False)
        self.reference.eval().requires_grad_(False)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int | None = None) -> list[list[int]]:
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            rows = generate(self.model, prompts, max_new_tokens, temperature,
                            stop_token_ids(self.tokenizer), self.tokenizer.pad_token_id, generator)
        self.model.train(was_training)
        return rows

    @torch.no_grad()
    def completion_logprobs(self, batch: TokenBatch, temperature: float = 1.0,
                            reference: bool = False) -> np.ndarray:
        model = self.reference_model() if reference else self.model
        chunks = []
        with self.autocast():
            for rows in self.micro_batches(batch):
                chunks.append(token_logprobs(model, to_tensors(rows, self.device), temperature).float().cpu())
        return torch.cat(chunks).numpy()

    def reference_model(self):
        """The starting policy for the KL term: LoRA disabled, or a frozen copy of full weights."""
        if hasattr(self.model, "disable_adapter"):
            return _AdapterDisabled(self.model)
        if self.reference is None:
            self.set_reference()
        return self.reference

    def micro_batches(self, batch: TokenBatch):
        for start in range(0, len(batch), self.micro_batch_size):
            yield batch.rows(slice(start, start + self.micro_batch_size))

    def optimizer_step(self, lr: float, max_grad_norm: float, weight_decay: float) -> float:
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, lr, weight_decay, self.saved_optimizer_state)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def weights_are_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad)

    def sft_step(self, batch: TokenBatch, lr: float, max_grad_norm: float, weight_decay: float) -> dict:
        total_tokens = int(batch.completion_mask.sum())
        loss = 0.0
        for rows in self.micro_batches(batch):
            with self.autocast():
                part = sft_loss(self.model, to_tensors(rows, self.device), total_tokens)
            part.backward()
            loss += float(part.detach())
        return {"loss": loss, "grad_norm": self.optimizer_step(lr, max_grad_norm, weight_decay)}

    def grpo_step(self, batch: GRPOBatch, lr: float, settings: GRPOConfig) -> dict:
        tokens = batch.tokens
        totals = {"total_sequences": len(tokens), "total_tokens": int(tokens.completion_mask.sum()),
                  "max_completion_tokens": settings.max_new_tokens}
        loss, new_parts = 0.0, []
        for start in range(0, len(tokens), self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            tensors = to_tensors(tokens.rows(rows), self.device)
            with self.autocast():
                new = token_logprobs(self.model, tensors, settings.temperature)
            old = new.detach() if batch.old_logprobs is None else torch.from_numpy(batch.old_logprobs[rows]).to(new)
            ref = None if batch.ref_logprobs is None else torch.from_numpy(batch.ref_logprobs[rows]).to(new)
            advantages = torch.from_numpy(batch.advantages[rows]).to(new)
            part = grpo_loss(new, old, advantages, tensors["completion_mask"], settings, ref, **totals)
            part.backward()
            loss += float(part.detach())
            new_parts.append(new.detach().float().cpu().numpy())
        stats = {"loss": loss, **policy_drift(np.concatenate(new_parts), batch.old_logprobs, batch.ref_logprobs,
                                              tokens.completion_mask, settings.epsilon)}
        stats["grad_norm"] = self.optimizer_step(lr, settings.max_grad_norm, settings.weight_decay)
        return stats

    def save(self, folder: Path) -> None:
        save_model(self.model, self.tokenizer, folder)
        if self.optimizer is not None:
            save_optimizer_state(self.model, self.optimizer, folder)


class _AdapterDisabled:
    """Calls a PEFT model with its adapters switched off: the base model is the reference."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)
