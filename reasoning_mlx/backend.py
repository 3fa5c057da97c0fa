"""The MLX backend: mlx + mlx-lm behind shared.training.backend.Backend."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from shared.algorithms.drafts import NgramDrafter
from shared.algorithms.grpo import policy_drift
from shared.algorithms.padding import TokenBatch, prefix_blocks, rows_per_pass
from shared.models.prompts import stop_token_ids
from shared.runtime.memory import available_bytes
from shared.training.backend import GRPOBatch
from shared.training.config import GRPOConfig, ModelConfig, SFTConfig
from reasoning_mlx.batching import leading_padding, right_padded, roll_rows
from reasoning_mlx.distributed import all_sum, join_group, sum_gradients
from reasoning_mlx.generate import generate
from reasoning_mlx.losses import grpo_loss, prefix_logprobs, token_logprobs
from reasoning_mlx.model import LoadedModel, load_model, save_model, set_lora_scale
from reasoning_mlx.optimizer import load_optimizer_state, make_optimizer, save_optimizer_state, write_optimizer_file


class MLXBackend:
    name = "mlx"

    def __init__(self, micro_batch_size: int = 64, shared_prefix: bool = True, speculative: bool = True):
        self.micro_batch_size = micro_batch_size
        self.drafter = NgramDrafter() if speculative else None  # remembers completions across calls
        self.generation_stats: dict = {}
        self.shared_prefix = shared_prefix  # False: every row carries its prompt (the reference the tests compare to)
        self.rank, self.world_size = join_group()
        self.loaded: LoadedModel | None = None
        self.model = self.tokenizer = self.optimizer = self.reference_weights = None
        self.recomputes = False  # gradient checkpointing
        self.saved_optimizer_state: dict[str, mx.array] = {}

    def load(self, model_path: Path, model: ModelConfig, trainable: bool = True) -> None:
        self.loaded = load_model(model_path, model, trainable)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.recomputes = trainable and model.gradient_checkpointing  # a cached pass keeps what it would recompute
        self.optimizer = None
        self.reference_weights = None if self.loaded.lora else self.model.trainable_parameters()
        self.saved_optimizer_state = load_optimizer_state(Path(model_path)) if trainable else {}

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return np.array(values, dtype=np.float64)
        return all_sum(values)

    def close(self) -> None:
        """mx.distributed has no call to leave a group (init, the collectives, nothing to close)."""

    def set_reference(self, folder: Path | None = None) -> None:
        if self.loaded.lora:
            return
        self.reference_weights = (self.model.trainable_parameters() if folder is None else
                                  load_model(folder, ModelConfig(finetune="full"), trainable=False).model.parameters())

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int | None = None) -> list[list[int]]:
        return generate(self.model, prompts, max_new_tokens, temperature, stop_token_ids(self.tokenizer),
                        self.tokenizer.pad_token_id, seed, self.drafter, self.generation_stats)

    def completion_logprobs(self, batch: TokenBatch, temperature: float = 1.0,
                            reference: bool = False) -> np.ndarray:
        logprobs = np.zeros(batch.input_ids.shape, dtype=np.float32)
        with self.reference_policy() if reference else nullcontext():
            for rows, columns, inputs in self.logprob_parts(batch):
                logprobs[rows, columns] = np.array(self.part_logprobs(inputs, temperature))
        logprobs[batch.completion_mask == 0] = 0.0
        return logprobs

    def logprob_parts(self, batch: TokenBatch):
        """(rows, columns, inputs) for each micro-batch, where part_logprobs(inputs) are the log-probs of
        batch[rows, columns]: each distinct prompt run once (shared_prefix), or each row with its own
        copy of its prompt, rolled to start at column 0 (mlx-lm models take no attention mask)."""
        if self.prefix_once:
            for block in prefix_blocks(batch, self.rows_per_pass(batch)):
                yield block.rows, block.columns, tuple(map(mx.array, (block.prompts, block.prompt_of_row,
                                                                      block.completions)))
            return
        shifts = leading_padding(batch.attention_mask)
        ids, width = roll_rows(batch.input_ids, shifts), batch.input_ids.shape[1]
        for rows in self.row_slices(batch):
            rolled_back = (np.arange(width)[None] - shifts[rows, None]) % width
            yield np.arange(len(batch))[rows], slice(None), (mx.array(ids[rows]), mx.array(rolled_back))

    @property
    def prefix_once(self) -> bool:
        return self.shared_prefix and not self.recomputes

    def part_logprobs(self, inputs: tuple, temperature: float) -> mx.array:
        if self.prefix_once:
            return prefix_logprobs(self.model, *inputs, temperature)
        ids, rolled_back = inputs
        return mx.take_along_axis(token_logprobs(self.model, ids, temperature), rolled_back, axis=1)

    @contextmanager
    def reference_policy(self):
        """The starting policy for the KL term: LoRA scaled to 0, or the starting full weights."""
        if self.loaded.lora:
            previous = set_lora_scale(self.model, 0.0)
            try:
                yield
            finally:
                set_lora_scale(self.model, previous)
            return
        current = self.model.trainable_parameters()
        self.model.update(self.reference_weights)
        try:
            yield
        finally:
            self.model.update(current)

    def rows_per_pass(self, batch: TokenBatch) -> int:
        return self.sequences_per_pass(batch.input_ids.shape[1], self.loaded.config["vocab_size"])

    def row_slices(self, batch: TokenBatch):
        """One slice of rows per micro-batch."""
        rows = self.rows_per_pass(batch)
        for start in range(0, len(batch), rows):
            yield slice(start, start + rows)

    def accumulate(self, loss_fn, inputs) -> tuple[float, dict, list[np.ndarray]]:
        """Summed loss and gradients over micro-batches, each evaluated before the next (bounded memory).

        `loss_fn` returns (loss, per-token log-probs); the log-probs come back as numpy for statistics.
        """
        value_and_grad = nn.value_and_grad(self.model, loss_fn)
        total, gradients, logprobs = 0.0, None, []
        for part in inputs:
            (loss, part_logprobs), grads = value_and_grad(*part)
            gradients = grads if gradients is None else tree_map(mx.add, gradients, grads)
            mx.eval(loss, gradients, part_logprobs)
            total += loss.item()
            logprobs.append(np.array(part_logprobs))
        return total, gradients, logprobs

    def apply_gradients(self, gradients: dict, lr: float, settings: SFTConfig | GRPOConfig) -> float:
        """Clip `gradients`, step AdamW with them; returns the norm before clipping."""
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, lr, settings.weight_decay, self.saved_optimizer_state)
        self.optimizer.learning_rate = lr
        self.optimizer.weight_decay = settings.weight_decay
        if self.world_size > 1:
            gradients = sum_gradients(gradients)
        gradients, grad_norm = optim.clip_grad_norm(gradients, settings.max_grad_norm)
        self.optimizer.update(self.model, gradients)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return grad_norm.item()

    def weights_are_finite(self) -> bool:
        return all(mx.isfinite(value).all().item() for _, value in tree_flatten(self.model.trainable_parameters()))

    def sequences_per_pass(self, columns: int, vocab_size: int) -> int:
        return rows_per_pass(self.micro_batch_size, columns, vocab_size)

    def available_memory(self) -> int | None:
        if mx.metal.is_available():  # unified memory: what Metal recommends a process keeps in use
            return mx.metal.device_info()["max_recommended_working_set_size"]
        return available_bytes()

    def peak_memory(self) -> int:
        return mx.get_peak_memory()

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def sft_step(self, batch: TokenBatch, lr: float, settings: SFTConfig, total_tokens: int | None = None) -> dict:
        _, ids, mask = right_padded(batch)
        total_tokens = total_tokens or int(mask.sum())

        def loss_fn(ids_part, mask_part):
            logprobs = token_logprobs(self.model, ids_part) * mask_part
            return -logprobs.sum() / total_tokens, logprobs

        inputs = ((mx.array(ids[rows]), mx.array(mask[rows])) for rows in self.row_slices(batch))
        loss, gradients, _ = self.accumulate(loss_fn, inputs)
        return {"loss": loss, "grad_norm": self.apply_gradients(gradients, lr, settings)}

    def grpo_step(self, batch: GRPOBatch, lr: float, settings: GRPOConfig) -> dict:
        if batch.tokens is None:  # a data-parallel process whose groups have no signal: its zero gradient
            zeros = tree_map(mx.zeros_like, self.model.trainable_parameters())
            return {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0,
                    "grad_norm": self.apply_gradients(zeros, lr, settings)}
        tokens, totals = batch.tokens, batch.loss_totals(settings.max_new_tokens)

        def loss_fn(inputs, mask_part, old_part, ref_part, advantages_part):
            new = self.part_logprobs(inputs, settings.temperature) * mask_part
            old_part = mx.stop_gradient(new) if old_part is None else old_part
            return grpo_loss(new, old_part, advantages_part, mask_part, settings, ref_part, **totals), new

        def given(array, rows, columns):
            return None if array is None else mx.array(array[rows][:, columns].astype(np.float32))

        parts = list(self.logprob_parts(tokens))
        loss, gradients, new_parts = self.accumulate(loss_fn, (
            (inputs, *(given(a, rows, columns) for a in (tokens.completion_mask, batch.old_logprobs,
                                                          batch.ref_logprobs)),
             mx.array(batch.advantages[rows], dtype=mx.float32)) for rows, columns, inputs in parts))
        new = np.zeros(tokens.input_ids.shape, dtype=np.float32)
        for (rows, columns, _), part_new in zip(parts, new_parts):
            new[rows, columns] = part_new
        stats = {"loss": loss, **policy_drift(new, batch.old_logprobs, batch.ref_logprobs, tokens.completion_mask,
                                              settings.epsilon)}
        stats["grad_norm"] = self.apply_gradients(gradients, lr, settings)
        return stats

    def save(self, folder: Path) -> None:
        save_model(self.loaded, folder)
        if self.optimizer is not None:
            save_optimizer_state(self.optimizer, folder)
        elif self.saved_optimizer_state:  # loaded and not stepped since (GRPO steps without signal): passed on
            write_optimizer_file(self.saved_optimizer_state, folder)
