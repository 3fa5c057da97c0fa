"""Reliability as a user meets it: kill -9 and Ctrl-C mid-run, resume, determinism, full disks, and
the KL reference a resumed GRPO run keeps. Real subprocesses, the real tiny model, real files."""
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_cli import ROOT, TINY_BUDGET, run_cli

pytestmark = pytest.mark.slow  # real training runs in subprocesses, killed and resumed

# 20 SFT steps and 6 GRPO steps, a resume point every 3 steps of each phase
BUDGET = ["--model", "tiny", "--num-samples", "640", "--sft-batch-size", "32", "--sft-lr", "3e-3",
          "--grpo-samples", "24", "--prompts-per-step", "4", "--group-size", "4", "--eval-samples", "16",
          "--ood-samples", "4", "--save-every", "3"]
TIMINGS = ("tokens_per_s", "rollout_s", "step_s", "peak_memory_gb")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"LOCAL_REASONING_CACHE": str(tmp_path_factory.mktemp("cache"))}


def train_command(backend: str, output: Path, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "train", *BUDGET, "--backend", backend, "--output-dir", str(output),
            *extra]


def stop_when(command: list[str], folder: Path, sig: int, env: dict) -> subprocess.CompletedProcess:
    """Start training, send `sig` as soon as `folder` (a resume point) lands, wait for the process."""
    import os

    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not folder.exists():
        assert process.poll() is None, f"finished before {folder.name} appeared: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def numbers(output: Path) -> list[dict]:
    """Every metrics record without its wall-clock timings: what must repeat exactly."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMINGS} for record in records]


def final_results(output: Path) -> dict:
    evaluation = json.loads((output / "eval.json").read_text())
    return {**evaluation["in_distribution"], **evaluation["out_of_distribution"]}


@pytest.fixture(scope="module", params=["torch", "mlx"])
def uninterrupted(request, tmp_path_factory, cache_env):
    output = tmp_path_factory.mktemp(f"uninterrupted_{request.param}")
    result = run_cli("train", *BUDGET, "--backend", request.param, "--output-dir", output, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, output


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert numbers(resumed) == numbers(reference)
    assert final_results(resumed) == final_results(reference)
    weights = next((reference / "reasoning_final").glob("*.safetensors")).name
    assert (resumed / "reasoning_final" / weights).read_bytes() == (reference / "reasoning_final" / weights).read_bytes()


def test_kill_9_mid_sft_and_mid_grpo_then_resume_gives_the_uninterrupted_run(uninterrupted, cache_env, tmp_path):
    backend, reference = uninterrupted
    killed = stop_when(train_command(backend, tmp_path), tmp_path / "checkpoints" / "sft-step-000006",
                       signal.SIGKILL, cache_env)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "sft_final").exists()
    killed = stop_when(train_command(backend, tmp_path, "--resume"), tmp_path / "checkpoints" / "grpo-step-000003",
                       signal.SIGKILL, cache_env)
    assert killed.returncode == -signal.SIGKILL and "resuming from" in killed.stderr
    assert not (tmp_path / "reasoning_final").exists()
    finished = run_cli("train", *BUDGET, "--backend", backend, "--output-dir", tmp_path, "--resume",
                       env_extra=cache_env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming from" in finished.stderr and "| after GRPO |" in finished.stdout
    assert_same_run(tmp_path, reference)
    assert not (tmp_path / "checkpoints").exists()  # a finished run keeps only its final checkpoints
    again = run_cli("train", "--resume", "--output-dir", tmp_path, env_extra=cache_env)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: the run in {tmp_path} has finished; there is nothing to resume"]


def test_dynamic_sampling_resumes_with_the_pass_rates_it_had(cache_env, tmp_path):
    """The pool of pass rates is part of where GRPO stands: a run killed mid-GRPO draws the same prompts after
    --resume as the uninterrupted run, and measures the same headroom once."""
    dynamic = ("--dynamic-sampling", "--headroom-samples", "2")
    reference = tmp_path / "reference"
    result = run_cli("train", *BUDGET, "--backend", "torch", *dynamic, "--output-dir", reference, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    grpo = [r for r in numbers(reference) if r["phase"] == "grpo"]
    assert all(r["sampled_groups"] >= 4 and "prompts_tried" in r for r in grpo)
    assert len([r for r in numbers(reference) if r.get("stage") == "headroom"]) == 1
    resumed = tmp_path / "resumed"
    killed = stop_when(train_command("torch", resumed, *dynamic), resumed / "checkpoints" / "grpo-step-000003",
                       signal.SIGKILL, cache_env)
    assert killed.returncode == -signal.SIGKILL
    # asking for the GGUF file only now is fine: it changes nothing the run computes
    finished = run_cli("train", "--resume", "--output-dir", resumed, "--export-gguf", env_extra=cache_env)
    assert finished.returncode == 0 and "resuming from" in finished.stderr, finished.stderr[-3000:]
    assert_same_run(resumed, reference)
    assert (resumed / "reasoning_final.gguf").is_file() and not (reference / "reasoning_final.gguf").exists()


def test_ctrl_c_saves_exits_130_and_the_same_command_continues(uninterrupted, cache_env, tmp_path):
    backend, reference = uninterrupted
    stopped = stop_when(train_command(backend, tmp_path), tmp_path / "checkpoints" / "sft-step-000003",
                        signal.SIGINT, cache_env)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(("stopped at SFT step", "stopped after SFT", "interrupted; continue with")), last
    assert f"--resume --output-dir {tmp_path}" in last
    again = run_cli("train", *BUDGET, "--backend", backend, "--output-dir", tmp_path, env_extra=cache_env)
    assert again.returncode == 0 and "resuming from" in again.stderr, again.stderr[-3000:]
    assert_same_run(tmp_path, reference)


def test_an_unfinished_run_is_not_overwritten_by_other_settings(cache_env, tmp_path):
    killed = stop_when(train_command("torch", tmp_path), tmp_path / "checkpoints" / "sft-step-000003",
                       signal.SIGKILL, cache_env)
    assert killed.returncode == -signal.SIGKILL
    other = run_cli("train", *BUDGET, "--backend", "torch", "--sft-lr", "1e-3", "--output-dir", tmp_path,
                    env_extra=cache_env)
    assert other.returncode == 1 and other.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds an unfinished run with other settings: continue it with "
        f"python cli.py train --resume --output-dir {tmp_path}, or choose another --output-dir"]
    changed = run_cli("train", "--resume", "--output-dir", tmp_path, "--sft-lr", "1e-3", env_extra=cache_env)
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"error: --sft-lr 0.001 differs from the run's 0.003 ({tmp_path}/run_config.json); "
        "--resume continues with the run's own settings"]
    wrong_backend = run_cli("train", "--resume", "--output-dir", tmp_path, "--backend", "mlx", env_extra=cache_env)
    assert wrong_backend.returncode == 2 and "resumes on the same backend" in wrong_backend.stderr
    assert (tmp_path / "checkpoints" / "sft-step-000003" / "model.safetensors").exists()
    nothing = run_cli("train", "--resume", "--output-dir", tmp_path / "empty", env_extra=cache_env)
    assert nothing.returncode == 1 and "holds no checkpoint to resume from" in nothing.stderr


def test_an_interrupted_sweep_continues_its_unfinished_row_and_keeps_the_finished_one(cache_env, tmp_path):
    budget = [a for a in TINY_BUDGET if a not in ("--num-samples", "96")]
    sweep = ["sweep", "--num-samples", "32,64", *budget, "--save-every", "1", "--output-dir", tmp_path]
    killed = stop_when([sys.executable, str(ROOT / "cli.py"), *map(str, sweep)],
                       tmp_path / "samples_64" / "checkpoints" / "sft-step-000001", signal.SIGKILL, cache_env)
    assert killed.returncode == -signal.SIGKILL
    assert [row["num_samples"] for row in json.loads((tmp_path / "sweep.json").read_text())["rows"]] == [32]
    finished_row = (tmp_path / "samples_32" / "metrics.jsonl").read_text()
    again = run_cli(*sweep, env_extra=cache_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: 32 SFT problems finished earlier" in again.stderr
    assert f"sweep: 64 SFT problems -> {tmp_path / 'samples_64'} (continued)" in again.stderr
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(row["num_samples"], row["continued"]) for row in rows] == [(32, False), (64, True)]
    assert (tmp_path / "samples_32" / "metrics.jsonl").read_text() == finished_row
    assert not (tmp_path / "samples_64" / "earlier_runs").exists()  # continued, not started again
    records = [json.loads(line) for line in (tmp_path / "samples_64" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record["phase"] == "sft"] == [1, 2]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_same_seed_same_backend_same_numbers(backend, cache_env, tmp_path):
    """LoRA included: its random initialisation is seeded too."""
    args = ["--mode", "sft", "--model", "tiny", "--backend", backend, "--finetune", "lora", "--lora-rank", "4",
            "--num-samples", "96", "--sft-batch-size", "32", "--eval-samples", "8", "--ood-samples", "0"]
    for name in ("a", "b"):
        result = run_cli("train", *args, "--output-dir", tmp_path / name, env_extra=cache_env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    first, second = (sorted((tmp_path / name / "sft_final").glob("adapter*.safetensors")) for name in "ab")
    assert first and [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_a_full_disk_stops_with_one_line_and_leaves_nothing_half_written(cache_env, tmp_path):
    """A 2 MB file-size limit: the kernel refuses the checkpoint's 4 MB weights file part-way (EFBIG)."""
    import os

    warm = run_cli("train", "--mode", "sft", *BUDGET, "--backend", "torch", "--num-samples", "32",
                   "--output-dir", tmp_path / "warm", env_extra=cache_env)  # tiny model built outside the limit
    assert warm.returncode == 0, warm.stderr[-2000:]
    sft = tmp_path / "warm" / "sft_final"
    before = {p.name: p.read_bytes() for p in sft.iterdir()}

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    output = tmp_path / "full"
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--mode", "grpo", *BUDGET,
                             "--backend", "torch", "--sft-checkpoint", str(sft), "--output-dir", str(output)],
                            cwd=ROOT, env={**os.environ, **cache_env}, capture_output=True, text=True, timeout=600,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: could not write checkpoint {output}/checkpoints/grpo-step-000003 (no space left to "
                    "write it); nothing half-written was left and earlier checkpoints are intact")
    # nothing half-written; the folder's lock file stays, as it does after every run
    leftovers = [p for p in output.rglob("*") if p.name.startswith(".") and p.name != ".run.lock"]
    assert leftovers == [] and not (output / "checkpoints" / "grpo-step-000003").exists()
    assert {p.name: p.read_bytes() for p in sft.iterdir()} == before

    def tiny_file_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    report = subprocess.run([sys.executable, str(ROOT / "cli.py"), "eval", "--checkpoint", str(sft), "--num-samples",
                             "2", "--ood-samples", "0", "--json", str(tmp_path / "eval.json")],
                            cwd=ROOT, env={**os.environ, **cache_env}, capture_output=True, text=True, timeout=600,
                            preexec_fn=tiny_file_limit)
    assert report.returncode == 1 and report.stderr.strip().splitlines() == [
        "error: no space left on the disk (File too large); free some and run the command again "
        "(a train run continues from its last checkpoint)"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_kl_reference_is_the_policy_grpo_started_from(backend, tiny_model_dir, tmp_path):
    """Full fine-tuning: after SFT steps, set_reference() makes the current weights the reference, and a
    resumed run gets the same reference back from the folder GRPO started from."""
    from shared.algorithms.padding import pack_batch
    from shared.models.prompts import prompt_ids, target_ids
    from shared.tasks.addition.data import Problem
    from shared.training.config import ModelConfig, SFTConfig

    def new_backend():
        if backend == "torch":
            from reasoning_torch.backend import TorchBackend
            return TorchBackend(device="cpu")
        from reasoning_mlx.backend import MLXBackend
        return MLXBackend()

    policy = new_backend()
    policy.load(tiny_model_dir, ModelConfig(name="tiny", finetune="full"), trainable=True)
    problems = [Problem((23, 15, 8)), Problem((1, 2, 3))]
    batch = pack_batch([prompt_ids(policy.tokenizer, p) for p in problems],
                       [target_ids(policy.tokenizer, p) for p in problems], 0)
    for _ in range(3):
        policy.sft_step(batch, 3e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    policy.save(tmp_path)
    policy.set_reference()
    start = policy.completion_logprobs(batch)
    np.testing.assert_array_equal(policy.completion_logprobs(batch, reference=True), start)
    policy.sft_step(batch, 3e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    assert not np.allclose(policy.completion_logprobs(batch), start, atol=1e-4)
    resumed = new_backend()
    resumed.load(tiny_model_dir, ModelConfig(name="tiny", finetune="full"), trainable=True)
    resumed.set_reference(tmp_path)
    np.testing.assert_allclose(resumed.completion_logprobs(batch, reference=True), start, atol=1e-6)
