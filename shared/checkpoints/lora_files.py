"""LoRA adapters as files: PEFT's and mlx-lm's layouts read into one library-independent form and written back.

LoRA is held in PEFT's orientation: A is (r, in) and B is (out, r), the update scale * B @ A.
mlx-lm keeps lora_a = A.T (in, r) and lora_b = B.T (r, out); its `scale` is PEFT's alpha / r.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.checkpoints.layouts import ADAPTER_CONFIG_FILE, MLX_ADAPTER_WEIGHTS_FILE, PEFT_WEIGHTS_FILE, read_json
from shared.checkpoints.tensor_files import Tensor, read_tensors, write_tensors
from shared.runtime.errors import UserError

PEFT_PREFIX = "base_model.model."
LAYER_PATH = re.compile(r"^(?P<stack>.*\.layers)\.(?P<index>\d+)\.(?P<inner>.+)$")


@dataclass
class LoraAdapter:
    """A LoRA adapter independent of library: factors by module path, in PEFT's orientation."""
    base: str
    rank: int
    scale: float
    dropout: float
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # path -> (A (r,in), B (out,r))

    def module_names(self) -> list[str]:
        """The adapted modules inside a layer, e.g. 'self_attn.q_proj'."""
        return sorted({split_layer_path(path)[2] for path in self.factors})

    def layer_indices(self) -> list[int]:
        return sorted({split_layer_path(path)[1] for path in self.factors})

    def is_grid(self) -> bool:
        """Every adapted layer adapts the same modules (what layer selection + targets can express)."""
        return len(self.factors) == len(self.module_names()) * len(self.layer_indices())


def split_layer_path(path: str) -> tuple[str, int, str]:
    """'model.layers.3.self_attn.q_proj' -> ('model.layers', 3, 'self_attn.q_proj')."""
    match = LAYER_PATH.match(path)
    if not match:
        raise UserError(f"LoRA on {path!r} (outside the transformer layers) is not supported")
    return match["stack"], int(match["index"]), match["inner"]


def read_adapter(folder: Path, layout: str) -> LoraAdapter:
    return read_peft_adapter(folder) if layout == "peft" else read_mlx_adapter(folder)


def read_peft_adapter(folder: Path) -> LoraAdapter:
    config = read_json(Path(folder) / ADAPTER_CONFIG_FILE)
    unsupported = {"peft_type": config.get("peft_type", "LORA") != "LORA", "use_dora": config.get("use_dora"),
                   "bias": config.get("bias", "none") != "none", "modules_to_save": config.get("modules_to_save"),
                   "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")}
    if any(unsupported.values()):
        raise UserError(f"{folder}: PEFT adapters with {', '.join(k for k, v in unsupported.items() if v)} "
                        "cannot be converted (only plain LoRA)")
    rank = int(config["r"])
    scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    tensors, _ = read_tensors(Path(folder) / PEFT_WEIGHTS_FILE)
    factors: dict[str, list] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if not match:
            raise UserError(f"{folder}: unexpected tensor {name!r} in a PEFT LoRA adapter")
        factors.setdefault(match[1], [None, None])["AB".index(match[2])] = tensor
    return LoraAdapter(config.get("base_model_name_or_path") or "", rank, scale, float(config.get("lora_dropout", 0.0)),
                       complete_factors(factors, folder))


def read_mlx_adapter(folder: Path) -> LoraAdapter:
    config = read_json(Path(folder) / ADAPTER_CONFIG_FILE)
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{folder}: mlx-lm {config['fine_tune_type']} adapters cannot be converted (only LoRA)")
    lora = config["lora_parameters"]
    tensors, _ = read_tensors(Path(folder) / MLX_ADAPTER_WEIGHTS_FILE)
    factors: dict[str, list] = {}
    for name, tensor in tensors.items():
        path, leaf = name.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b"):
            raise UserError(f"{folder}: unexpected tensor {name!r} in an mlx-lm LoRA adapter")
        factors.setdefault(path, [None, None])[0 if leaf == "lora_a" else 1] = tensor.T
    return LoraAdapter(config.get("model") or "", int(lora["rank"]), float(lora["scale"]),
                       float(lora.get("dropout", 0.0)), complete_factors(factors, folder))


def complete_factors(factors: dict[str, list], folder: Path) -> dict[str, tuple[Tensor, Tensor]]:
    for path, pair in factors.items():
        if None in pair:
            raise UserError(f"{folder}: {path} has only one of its two LoRA factors")
    if not factors:
        raise UserError(f"{folder}: the adapter holds no LoRA weights")
    return {path: (a, b) for path, (a, b) in sorted(factors.items())}


def write_peft_adapter(adapter: LoraAdapter, folder: Path, num_layers: int) -> None:
    """adapter_model.safetensors + adapter_config.json, as `PeftModel.from_pretrained` reads them."""
    tensors = {}
    for path, (a, b) in adapter.factors.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    write_tensors(Path(folder) / PEFT_WEIGHTS_FILE, tensors, {"format": "pt"})
    layers = adapter.layer_indices()
    if adapter.is_grid():
        inner = adapter.module_names()
        leaves = [name.rsplit(".", 1)[-1] for name in inner]
        targets = sorted(leaves) if len(set(leaves)) == len(leaves) else inner
        selection = None if layers == list(range(num_layers)) else layers
    else:  # irregular: name every adapted module exactly
        targets, selection = sorted(adapter.factors), None
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapter.base,
              "r": adapter.rank, "lora_alpha": adapter.scale * adapter.rank, "lora_dropout": adapter.dropout,
              "target_modules": targets, "layers_to_transform": selection,
              "layers_pattern": "layers" if selection else None, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    (Path(folder) / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def write_mlx_adapter(adapter: LoraAdapter, folder: Path, num_layers: int) -> None:
    """adapters.safetensors + adapter_config.json, as `mlx_lm.load(base, adapter_path=...)` reads them."""
    tensors = {}
    for path, (a, b) in adapter.factors.items():
        tensors[f"{path}.lora_a"] = a.T
        tensors[f"{path}.lora_b"] = b.T
    write_tensors(Path(folder) / MLX_ADAPTER_WEIGHTS_FILE, tensors, {"format": "mlx"})
    layers = adapter.layer_indices()
    if adapter.is_grid() and layers == list(range(num_layers - len(layers), num_layers)):
        adapted, keys = len(layers), adapter.module_names()  # mlx-lm adapts the last `num_layers` layers
    else:  # keys that are full paths match outside the per-layer loop, so any selection loads exactly
        adapted, keys = 0, sorted(adapter.factors)
    config = {"fine_tune_type": "lora", "model": adapter.base, "num_layers": adapted,
              "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout,
                                  "keys": keys}}
    (Path(folder) / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
