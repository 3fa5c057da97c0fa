"""Pure helpers both backends rely on: padding layouts, checkpoint kinds, config fields for other readers."""
import numpy as np

from shared.algorithms.grpo import policy_drift
from shared.algorithms.padding import pack_batch
from shared.checkpoints.layouts import checkpoint_kind, rope_fields_for_older_readers
from shared.models.hardware import backend_for_checkpoint, is_installed
from reasoning_mlx.batching import leading_padding, roll_rows


def test_rolling_by_the_leading_padding_right_pads_every_row_and_rolls_back():
    batch = pack_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    shifts = leading_padding(batch.attention_mask)
    np.testing.assert_array_equal(shifts, [0, 2])
    rolled = roll_rows(batch.input_ids, shifts)
    np.testing.assert_array_equal(rolled, [[5, 6, 7, 1, 2, 0], [8, 3, 4, 9, 0, 0]])
    np.testing.assert_array_equal(roll_rows(batch.completion_mask, shifts), [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(roll_rows(rolled, -shifts), batch.input_ids)


def test_rope_theta_is_restored_for_readers_of_the_top_level_field():
    assert rope_fields_for_older_readers({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) == {
        "rope_theta": 1e4}
    assert rope_fields_for_older_readers({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e6}}) == {}
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    assert rope_fields_for_older_readers({"rope_parameters": yarn}) == {"rope_theta": 1e6, "rope_scaling": yarn}


def test_checkpoint_kinds_pick_the_backend_that_reads_them(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "adapter_config.json").write_text("{}")
    (tmp_path / "mlx" / "adapters.safetensors").write_bytes(b"")
    assert [checkpoint_kind(tmp_path / k) for k in ("full", "peft", "mlx")] == ["full", "peft", "mlx_lora"]
    if is_installed("torch") and is_installed("mlx"):
        assert backend_for_checkpoint("auto", "peft") == "torch"
        assert backend_for_checkpoint("auto", "mlx_lora") == "mlx"
        assert backend_for_checkpoint("torch", "mlx_lora") == "torch"  # an explicit choice wins (and errors later)


def test_policy_drift_counts_clipped_tokens_and_kl_over_completion_tokens():
    new = np.log(np.array([[0.5, 0.5, 0.9]]))
    old = np.log(np.array([[0.5, 0.3, 0.1]]))
    mask = np.array([[1.0, 1.0, 0.0]])
    drift = policy_drift(new, old, new, mask, epsilon=0.2)
    assert drift == {"clip_fraction": 0.5, "kl": 0.0}  # 0.5/0.3 is outside 1 ± 0.2; the masked token is not counted
    assert policy_drift(new, None, None, mask, 0.2) == {"clip_fraction": 0.0, "kl": 0.0}
