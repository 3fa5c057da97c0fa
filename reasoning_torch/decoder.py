"""A lean Qwen2 / Llama forward for sampling: transformers' math without its per-call overhead.

Sampling calls the model once per generated token. On a small model that call is mostly Python
overhead (masks rebuilt, cache objects, hooks), so generation runs through this decoder instead:
the same weights as plain tensors (LoRA merged in for the rollout), q/k/v fused into one matrix,
a preallocated KV cache and a precomputed rotary table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: (H*D + 2*KV*D, hidden)
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor  # kept apart from up: stacking them would copy the largest matrices of the model
    up: torch.Tensor
    down: torch.Tensor


def linear_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a linear layer applies now: a PEFT LoRA layer's active adapters merged in."""
    base = getattr(module, "base_layer", module)
    weight = base.weight
    if hasattr(module, "get_delta_weight") and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def base_model(model):
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model) -> bool:
    """Whether the decoder computes what this model computes: Qwen2 or Llama blocks (q/k/v bias or none,
    no bias elsewhere), default RoPE, full attention, SiLU."""
    config = base_model(model).config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    plain_blocks = {"qwen2": not getattr(config, "use_sliding_window", False),
                    "llama": not getattr(config, "mlp_bias", False) and getattr(config, "pretraining_tp", 1) == 1}
    return (plain_blocks.get(config.model_type, False) and config.hidden_act == "silu"
            and rope.get("rope_type", rope.get("type", "default")) == "default"
            and not any(getattr(getattr(m, "base_layer", m), "bias", None) is not None
                        for layer in base_model(model).model.layers
                        for m in (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)))


def rope_theta(config) -> float:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)


class LeanDecoder:
    """Prefill, then a few tokens per row at a time, with a KV cache of `capacity` slots per row.

    Each row keeps its own count of filled slots (its left padding included), so rows may keep
    different numbers of the tokens a call ran (speculative decoding): `commit(counts)` keeps the
    first counts[b] of row b's new tokens, and the next call writes over the rest.
    """

    parallel = True  # rows may commit different numbers of tokens

    def __init__(self, model, padding: torch.Tensor, capacity: int):
        base = base_model(model)
        config = base.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = base.model.embed_tokens.weight
        self.norm = base.model.norm.weight
        self.lm_head = linear_weight(base.lm_head)[0]
        self.layers = [self._layer(layer) for layer in base.model.layers]
        dtype, device = self.embed.dtype, self.embed.device
        shape = (len(padding), self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.padding = padding  # (B,) slots before each row's first token, never attended to
        self.filled = torch.zeros_like(padding)
        self.running = 0
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        inv_freq = 1.0 / rope_theta(config) ** exponents
        freqs = torch.arange(capacity, dtype=torch.float, device=device)[:, None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _layer(layer) -> LayerWeights:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [linear_weight(m) for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
        biases = [b for _, b in projections]
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv=torch.cat([w for w, _ in projections]),
            qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
            out=linear_weight(attention.o_proj)[0],
            post_norm=layer.post_attention_layernorm.weight,
            gate=linear_weight(mlp.gate_proj)[0], up=linear_weight(mlp.up_proj)[0],
            down=linear_weight(mlp.down_proj)[0])

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # in float32 as transformers does, whatever the weights' dtype
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def __call__(self, ids: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """Next-token logits after each row's tokens so far and `ids` (B, T): (B, V) after the last of
        them, or (B, T, V) after each with `every_position`. Commit them before the next call."""
        batch, steps = ids.shape
        slots = self.filled[:, None] + torch.arange(steps, device=ids.device)  # (B, T)
        end = int(slots.max()) + 1
        keys = torch.arange(end, device=ids.device)[None, None, :]
        # a query sees its row's real keys up to itself; a padding query sees itself, so no row is all -inf
        allowed = ((keys <= slots[..., None]) & (keys >= self.padding[:, None, None])) | (keys == slots[..., None])
        positions = (slots - self.padding[:, None]).clamp(min=0)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        written = slots[:, None, :, None].expand(batch, self.kv_heads, steps, self.head_dim)  # cache slots
        heads, kv_heads, half = self.heads, self.kv_heads, self.head_dim // 2
        x = F.embedding(ids, self.embed)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self.rms_norm(x, layer.input_norm), layer.qkv, layer.qkv_bias)
            qkv = qkv.view(batch, steps, heads + 2 * kv_heads, self.head_dim)
            qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # RoPE on q and k at once
            q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
            cache_dtype = self.keys[index].dtype  # under CUDA autocast k and v come in bf16
            self.keys[index].scatter_(2, written, k.to(cache_dtype))
            self.values[index].scatter_(2, written, v.transpose(1, 2).to(cache_dtype))
            attended = self.attend(q, self.keys[index][:, :, :end], self.values[index][:, :, :end], allowed)
            x = x + F.linear(attended, layer.out)
            normed = self.rms_norm(x, layer.post_norm)
            x = x + F.linear(F.silu(F.linear(normed, layer.gate)) * F.linear(normed, layer.up), layer.down)
        self.running = steps
        return F.linear(self.rms_norm(x if every_position else x[:, -1], self.norm), self.lm_head)

    def commit(self, counts: torch.Tensor | None = None) -> None:
        """Keep the first counts[b] of the tokens the last call ran for row b (default: all)."""
        self.filled = self.filled + (self.running if counts is None else counts)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows of the batch only."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.padding, self.filled = self.padding[rows], self.filled[rows]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: q (B, H, Tq, D), k and v (B, KV, Tk, D); allowed (B, Tq, Tk)."""
        batch, heads, steps, dim = q.shape
        group = heads // self.kv_heads  # query head h reads key/value head h // group, as repeat_kv lays them out
        scores = (q.reshape(batch, self.kv_heads, group * steps, dim) @ k.transpose(-1, -2)) * dim ** -0.5
        scores = scores.view(batch, self.kv_heads, group, steps, -1).masked_fill(~allowed[:, None, None], float("-inf"))
        weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        out = weights.view(batch, self.kv_heads, group * steps, -1) @ v
        return out.view(batch, heads, steps, dim).transpose(1, 2).reshape(batch, steps, heads * dim)
