"""The CLI as a user runs it: real subprocesses, real tiny model, real files."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the CLI in subprocesses, most of them training

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, env_extra=None, stdin=None, timeout=600):
    env = {**os.environ, "LOCAL_REASONING_CACHE": os.environ.get("LOCAL_REASONING_CACHE", ""), **(env_extra or {})}
    env = {k: v for k, v in env.items() if v != ""}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"LOCAL_REASONING_CACHE": str(tmp_path_factory.mktemp("cache"))}


TINY_BUDGET = ["--model", "tiny", "--backend", "torch", "--num-samples", "96", "--sft-batch-size", "32",
               "--sft-lr", "3e-3", "--grpo-samples", "4", "--prompts-per-step", "2", "--group-size", "2",
               "--eval-samples", "8", "--ood-samples", "4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_env):
    output = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--mode", "full", *TINY_BUDGET, "--output-dir", output, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_train_full_writes_checkpoints_metrics_and_eval(trained_run):
    output, result = trained_run
    assert "| before SFT |" in result.stdout and "| after GRPO |" in result.stdout
    for stage in ("sft_final", "reasoning_final"):
        folder = output / stage
        assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
        assert (folder / "run_config.json").exists() and (folder / "chat_template.jinja").exists()
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    sft_steps = [l for l in lines if l["phase"] == "sft"]
    grpo_steps = [l for l in lines if l["phase"] == "grpo"]
    assert len(sft_steps) == 3 and len(grpo_steps) == 2  # 96 / 32 SFT steps; 4 prompts / 2 per step
    assert {"loss", "lr", "tokens_per_s"} <= set(sft_steps[0])
    assert {"reward", "reward_correctness", "reward_step_validity", "loss", "kl"} <= set(grpo_steps[0])
    # each step and evaluation says the most memory its phase took: the process's resident memory on CPU
    measured = [l for l in lines if l["phase"] in ("sft", "grpo", "eval")]
    assert all(0.1 < l["peak_memory_gb"] < 20 for l in measured), [l.get("peak_memory_gb") for l in measured]
    evaluation = json.loads((output / "eval.json").read_text())
    assert {name: r["num_problems"] for name, r in evaluation["out_of_distribution"].items()} == {
        "two_operands": 4, "four_operands": 4, "three_digit": 4}
    report = (output / "report.md").read_text()
    assert "| after GRPO |" in report and "| three digit |" in report and "## Samples after GRPO" in report
    peaks = re.findall(r"^\| (SFT|GRPO|evaluation after GRPO) \| (\d+\.\d\d) \|$", report, re.MULTILINE)
    assert [name for name, _ in peaks] == ["SFT", "GRPO", "evaluation after GRPO"]
    assert float(dict(peaks)["SFT"]) == pytest.approx(max(l["peak_memory_gb"] for l in sft_steps), abs=0.006)
    plots = sorted((output / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["accuracy.png", "loss.png", "rewards.png"]
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{plot.name}" in report
    assert set(evaluation["in_distribution"]) == {"before_sft", "after_sft", "after_grpo"}
    assert evaluation["in_distribution"]["after_sft"]["num_problems"] == 8
    for stage in evaluation["in_distribution"].values():  # each problem's result, in order, for paired tests
        assert len(stage["solved"]) == 8 and stage["solved"].count("1") / 8 == stage["accuracy"]
    sft, grpo = (evaluation["in_distribution"][stage]["solved"] for stage in ("after_sft", "after_grpo"))
    paired = evaluation["grpo_vs_sft"]
    assert paired["gained"] == sum(a > b for a, b in zip(grpo, sft))
    assert paired["lost"] == sum(a < b for a, b in zip(grpo, sft))
    assert "after GRPO vs after SFT on the same 8 problems" in report and "McNemar p" in result.stdout
    # no terminal here: progress comes as log lines, with the step, the loss or reward and the time left
    assert re.search(r" INFO SFT 3/3 steps \(100%\), loss [\d.]+, tokens/s \d+, elapsed \d+s, remaining 0s",
                     result.stderr), result.stderr[-3000:]
    assert re.search(r" INFO GRPO 1/2 steps \(50%\), reward [\d.]+, correct [\d.]+, tokens/s \d+", result.stderr)


def test_checkpoint_round_trips_through_plain_transformers(trained_run):
    """No code of ours: AutoTokenizer + AutoModelForCausalLM + the saved chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.training.config import ModelConfig
    from reasoning_torch.backend import TorchBackend

    folder = trained_run[0] / "reasoning_final"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Calculate 23 + 15 + 8"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    plain = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    ours = TorchBackend(device="cpu")
    ours.load(folder, ModelConfig(name=str(folder)), trainable=False)
    mine = ours.generate([ids["input_ids"][0].tolist()], 40, 0.0)[0]
    assert plain[: len(mine)] == mine
    with torch.no_grad():
        reloaded = model(**ids).logits
        assert torch.allclose(reloaded, ours.model(**ids).logits, atol=1e-5)


def test_eval_and_infer_commands(trained_run, cache_env, tmp_path):
    folder = trained_run[0] / "reasoning_final"
    report = tmp_path / "eval.json"
    result = run_cli("eval", "--checkpoint", folder, "--num-samples", "5", "--ood-samples", "3",
                     "--samples", "2", "--json", report, "--compare", trained_run[0] / "sft_final",
                     env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    sets = json.loads(report.read_text())
    assert list(sets) == ["in_distribution", "two_operands", "four_operands", "three_digit"]
    assert sets["in_distribution"]["num_problems"] == 5 and sets["three_digit"]["num_problems"] == 3
    sampled = sets["in_distribution"]
    assert sampled["k"] == 2 and 0 <= sampled["mean_at_k"] <= sampled["pass_at_k"] <= 1
    assert 0 <= sampled["maj_at_k"] <= sampled["pass_at_k"]
    assert (f"in distribution, 5 problems: greedy {sampled['accuracy']:.1%}, mean@2 {sampled['mean_at_k']:.1%}, "
            f"maj@2 {sampled['maj_at_k']:.1%}, pass@2 {sampled['pass_at_k']:.1%} (temperature 1)") in result.stdout
    assert set(sets["four_operands"]["reward_components"]) == {"correctness", "format", "steps", "verification",
                                                               "step_validity"}
    assert "| three digit |" in result.stdout and "pass@k" in result.stdout
    compared = sets["three_digit"]["compared_with"]  # the same problems, scored with the other checkpoint
    assert compared["checkpoint"] == str(trained_run[0] / "sft_final") and len(compared["solved"]) == 3
    assert compared["paired"]["gained"] == sum(a > b for a, b in zip(sets["three_digit"]["solved"], compared["solved"]))
    assert f"three digit: {folder} vs {trained_run[0] / 'sft_final'} on the same 3 problems" in result.stdout
    missing = run_cli("eval", "--checkpoint", folder, "--compare", tmp_path / "nothing", env_extra=cache_env)
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    operands = [int(n) for n in sets["three_digit"]["samples"][0]["prompt"].removeprefix("Calculate ").split(" + ")]
    assert len(operands) == 3 and all(100 <= n <= 999 for n in operands)
    demo = run_cli("infer", "--checkpoint", folder, env_extra=cache_env)
    assert demo.returncode == 0 and "Problem: Calculate 23 + 15 + 8" in demo.stdout
    batch = run_cli("infer", "--checkpoint", folder, "--batch", "--num-samples", "3", env_extra=cache_env)
    assert batch.returncode == 0 and "accuracy: " in batch.stdout


def test_interactive_mode_survives_bad_input(trained_run, cache_env):
    folder = trained_run[0] / "reasoning_final"
    result = run_cli("infer", "--checkpoint", folder, "--interactive",
                     stdin="hello\n" + "9" * 5000 + " + 1\n\n2 + 3\nquit\nhello again\n", env_extra=cache_env)
    assert result.returncode == 0
    assert result.stdout.count("error: enter a sum of whole numbers") == 3  # words, too long, empty; none after quit
    assert "Traceback" not in result.stdout + result.stderr


def test_grpo_mode_from_an_sft_checkpoint_ends_in_a_gguf_file(trained_run, cache_env, tmp_path):
    result = run_cli("train", "--mode", "grpo", *TINY_BUDGET, "--sft-checkpoint", trained_run[0] / "sft_final",
                     "--output-dir", tmp_path, "--export-gguf", "q8_0", env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(json.loads((tmp_path / "eval.json").read_text())["in_distribution"]) == {"after_sft", "after_grpo"}
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "reasoning_final.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert "FROM ./reasoning_final.gguf" in (tmp_path / "Modelfile").read_text()
    assert "reasoning_final.gguf (qwen2, q8_0" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--num-samples", "-5"], "--num-samples"),
    (["train", "--sft-lr", "0"], "--sft-lr"),
    (["train", "--mode", "dance"], "--mode"),
    (["train", "--group-size", "1"], "--group-size"),
    (["train", "--mode", "grpo", "--model", "tiny"], "--sft-checkpoint"),
    (["train", "--loss-variant", "ppo"], "--loss-variant"),
    (["train", "--no-such-flag"], "no-such-flag"),
    (["train", "--save-every", "-1"], "--save-every"),
    (["train", "--grpo-lr", "-1e-5"], "--grpo-lr"),
    (["train", "--eval-samples", "0"], "--eval-samples"),
    (["infer", "--checkpoint", "x", "--interactive", "--batch"], "--interactive"),
    # counts beyond the problem sets they draw from, refused before any work with the largest that works
    (["train", "--model", "tiny", "--ood-samples", "246"], "--ood-samples 246 is more than the held-out "
                                                           "two-operand problems allow: at most 245"),
    (["train", "--model", "tiny", "--num-samples", "460893"], "at most 460892"),
    (["train", "--model", "tiny", "--grpo-samples", "460893"], "--grpo-samples 460893"),
    (["train", "--model", "tiny", "--eval-samples", "24258"], "--eval-samples 24258"),
    (["train", "--model", "tiny", "--eval-every-samples", "24258"], "--eval-every-samples 24258"),
    (["sweep", "--model", "tiny", "--num-samples", "100,460893"], "--num-samples 460893"),
    (["eval", "--checkpoint", "x", "--ood-samples", "300"], "--ood-samples 300"),
    (["eval", "--checkpoint", "x", "--num-samples", "24258"], "at most 24257"),
    (["infer", "--checkpoint", "x", "--batch", "--num-samples", "24258"], "at most 24257"),
    (["train", "--model", "tiny", "--finetune", "lora", "--lora-rank", "65"], "--lora-rank 65 is more than 64, "
                                                                             "the smaller side of k_proj"),
])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path):
    result = run_cli(*args, "--output-dir", tmp_path / "run") if args[0] in ("train", "sweep") else run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()  # nothing started


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(trained_run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, message in [
        (["train", "--model", "tiny", "--output-dir", a_file], f"error: --output-dir {a_file} is a file; give a folder"),
        (["sweep", "--num-samples", "8", "--model", "tiny", "--output-dir", a_file / "sub"],
         f"error: --output-dir {a_file / 'sub'} cannot be a folder: {a_file} is a file"),
        (["eval", "--checkpoint", trained_run[0] / "sft_final", "--json", tmp_path],
         f"error: --json {tmp_path} is a folder; give a file"),
        (["convert", trained_run[0] / "sft_final", "--to", "mlx", "--output", a_file / "x"],
         f"error: --output {a_file / 'x'} cannot be a folder: {a_file} is a file"),
        # root passes every permission check, and still cannot create anything under /proc
        (["eval", "--checkpoint", trained_run[0] / "sft_final", "--json", "/proc/nope/e.json"],
         "error: --json /proc/nope/e.json cannot be written (No such file or directory)"),
        (["convert", trained_run[0] / "sft_final", "--to", "mlx", "--output", "/proc/nope"],
         "error: --output /proc/nope cannot be written (No such file or directory)"),
        (["train", "--model", "tiny", "--output-dir", "/proc/forbidden"],
         "error: --output-dir /proc/forbidden cannot be written (No such file or directory)"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == message, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and " INFO " not in result.stderr  # refused before any work


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_completes(cache_env, tmp_path):
    command = [sys.executable, str(ROOT / "cli.py"), "train", *TINY_BUDGET, "--output-dir", str(tmp_path)]
    first = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **cache_env}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists():  # the first run is writing
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    began = time.monotonic()
    second = run_cli("train", *TINY_BUDGET, "--output-dir", tmp_path, env_extra=cache_env)
    assert time.monotonic() - began < 30 and first.poll() is None
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"error: {tmp_path} is in use by another run (process {first.pid}); wait for it to finish, "
        "or choose another --output-dir"]
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert "| after GRPO |" in stdout and json.loads((tmp_path / "run_status.json").read_text()) == {"finished": True}
    assert set(json.loads((tmp_path / "eval.json").read_text())["in_distribution"]) == {
        "before_sft", "after_sft", "after_grpo"}
    assert not (tmp_path / "earlier_runs").exists()  # the second run moved nothing
    again = run_cli("infer", "--checkpoint", tmp_path / "reasoning_final", env_extra=cache_env)
    assert again.returncode == 0


def test_counts_at_their_limits_run_and_a_completion_past_the_context_is_refused(trained_run, cache_env):
    folder = trained_run[0] / "reasoning_final"
    at_limit = run_cli("eval", "--checkpoint", folder, "--num-samples", "2", "--ood-samples", "245",
                       "--max-new-tokens", "4", env_extra=cache_env)
    assert at_limit.returncode == 0, at_limit.stderr[-2000:]
    too_long = run_cli("eval", "--checkpoint", folder, "--num-samples", "2", "--max-new-tokens", "600",
                       env_extra=cache_env)
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr
    assert too_long.stderr.strip().splitlines()[-1].startswith(
        "error: --max-new-tokens 600 runs past the model's 512 positions")


def test_grpo_takes_the_model_and_fine_tuning_of_its_checkpoint(trained_run, cache_env, tmp_path):
    """No --model: the tiny run's checkpoint says tiny, full fine-tuning, and the tiny preset."""
    budget = [a for a in TINY_BUDGET if a != "tiny" and a != "--model"]
    result = run_cli("train", "--mode", "grpo", *budget, "--sft-checkpoint", trained_run[0] / "sft_final",
                     "--output-dir", tmp_path, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["model"]["name"] == "tiny" and config["model"]["finetune"] == "full"
    assert config["grpo"]["lr"] == 5e-5 and config["sft"]["num_samples"] == 96  # the tiny preset; the SFT run's
    assert (tmp_path / "reasoning_final" / "model.safetensors").exists()
    assert not (tmp_path / "reasoning_final" / "adapter_config.json").exists()
    other = run_cli("train", "--mode", "grpo", "--model", "smollm2", "--sft-checkpoint", trained_run[0] / "sft_final",
                    "--output-dir", tmp_path / "other", env_extra=cache_env)
    assert other.returncode == 2 and not (tmp_path / "other").exists()
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"error: --model smollm2 contradicts {trained_run[0] / 'sft_final'}, whose name is 'tiny'")


def test_running_out_of_memory_is_one_line(trained_run, cache_env, tmp_path):
    """G = 5,000 completions per prompt, under an 8 GB address-space limit: the rollout's cache cannot be had."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    env = {**os.environ, **cache_env}
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--mode", "grpo", "--sft-checkpoint",
                             str(trained_run[0] / "sft_final"), "--group-size", "5000", "--grpo-samples", "16",
                             "--prompts-per-step", "16", "--eval-samples", "4", "--ood-samples", "0",
                             "--backend", "torch", "--output-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit_memory)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: out of memory (")


def test_grpo_into_the_sft_runs_folder_keeps_the_sft_records(cache_env, tmp_path):
    """The seed's workflow: SFT, then GRPO from output/sft_final into the same folder."""
    budget = [a for a in TINY_BUDGET if a != "tiny" and a != "--model"]
    sft = run_cli("train", "--model", "tiny", "--mode", "sft", *budget, "--output-dir", tmp_path, env_extra=cache_env)
    assert sft.returncode == 0, sft.stderr[-2000:]
    sft_records = (tmp_path / "metrics.jsonl").read_text()
    sft_evaluations = json.loads((tmp_path / "eval.json").read_text())
    grpo = run_cli("train", "--mode", "grpo", *budget, "--sft-checkpoint", tmp_path / "sft_final",
                   "--output-dir", tmp_path, env_extra=cache_env)
    assert grpo.returncode == 0, grpo.stderr[-2000:]
    assert (tmp_path / "metrics.jsonl").read_text().startswith(sft_records)  # continued, not truncated
    phases = [json.loads(line)["phase"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("sft") == 3 and phases.count("grpo") == 2
    evaluations = json.loads((tmp_path / "eval.json").read_text())
    assert set(evaluations["in_distribution"]) == {"before_sft", "after_sft", "after_grpo"}
    assert evaluations["in_distribution"]["before_sft"] == sft_evaluations["in_distribution"]["before_sft"]
    assert "| before SFT |" in (tmp_path / "report.md").read_text()
    [earlier] = (tmp_path / "earlier_runs").iterdir()  # the SFT run's own files, as it wrote them
    assert json.loads((earlier / "eval.json").read_text()) == sft_evaluations
    assert json.loads((earlier / "run_config.json").read_text())["mode"] == "sft"
    assert (earlier / "metrics.jsonl").read_text() == sft_records


@pytest.mark.parametrize("command", ["infer", "eval"])
def test_missing_checkpoint_fails_cleanly(command, tmp_path):
    result = run_cli(command, "--checkpoint", tmp_path / "nope")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {str(tmp_path / 'nope')!r} does not exist (train one with: python cli.py train)"]


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:8] + b"\xff" * 64 + data[72:], "corrupted"),
    (lambda data: b"", "truncated"),
])
def test_damaged_weights_fail_cleanly(trained_run, tmp_path, damage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run[0] / "sft_final", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    for command in (["eval", "--checkpoint", broken], ["train", "--mode", "grpo", *TINY_BUDGET, "--sft-checkpoint",
                                                      broken, "--output-dir", tmp_path / "out"]):
        result = run_cli(*command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_empty_checkpoint_folder_fails_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("eval", "--checkpoint", tmp_path / "empty")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} is not a model folder: no config.json or adapter_config.json"]


def test_pickled_weights_are_never_loaded(trained_run, cache_env, tmp_path):
    """A folder whose only weights are a pickle that would run code when unpickled: refused unread."""
    import pickle
    import shutil

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pickle_ran",))

    folder = tmp_path / "pickled"
    shutil.copytree(trained_run[0] / "sft_final", folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    for backend in ("torch", "mlx"):
        for command in (["eval", "--checkpoint", folder, "--backend", backend],
                        ["train", *TINY_BUDGET, "--backend", backend, "--model", folder,
                         "--output-dir", tmp_path / "out"]):
            result = run_cli(*command, env_extra=cache_env)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
            assert result.stderr.strip().splitlines()[-1] == f"error: {folder} holds no .safetensors weights"
    assert not (tmp_path / "pickle_ran").exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the payload is live: it does run when unpickled
    assert (tmp_path / "pickle_ran").exists()


def test_remote_code_runs_only_when_asked(cache_env, tmp_path):
    """A model folder that names its own code (auto_map): ignored unless --trust-remote-code."""
    import shutil
    sys.path.insert(0, str(ROOT))
    from shared.models.tiny_model import write_tiny_model

    folder = write_tiny_model(tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote_code_ran"
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model\n")
    budget = ["--mode", "sft", "--model", folder, "--num-samples", "32", "--sft-batch-size", "32",
              "--eval-samples", "2", "--ood-samples", "0"]
    for backend in ("torch", "mlx"):
        result = run_cli("train", *budget, "--backend", backend, "--output-dir", tmp_path / backend,
                         env_extra=cache_env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    trusted = run_cli("train", *budget, "--backend", "torch", "--trust-remote-code", "--output-dir",
                      tmp_path / "trusted", env_extra=cache_env)
    assert trusted.returncode == 0 and marker.exists()
    shutil.rmtree(tmp_path / "custom")


def test_an_mlx_adapter_on_the_torch_backend_names_the_fix(mlx_lora_run, cache_env, tmp_path):
    sft = mlx_lora_run / "sft_final"
    result = run_cli("train", "--mode", "grpo", *TINY_BUDGET, "--sft-checkpoint", sft, "--output-dir", tmp_path,
                     env_extra=cache_env)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: {sft} is an mlx-lm LoRA adapter: use --backend mlx, or python cli.py convert {sft} --to torch")


def test_a_hub_model_without_network_fails_at_once(tmp_path):
    """No HF_HUB_OFFLINE, no network: one attempt, one line; no rounds of retries first."""
    result = run_cli("train", "--model", "no-such-org/no-such-model", "--backend", "torch", "--output-dir", tmp_path)
    assert result.returncode == 1 and "Retry" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not load model 'no-such-org/no-such-model'")


def test_unreachable_hub_model_says_so_in_one_line(tmp_path):
    result = run_cli("train", "--model", "no-such-org/no-such-model", "--backend", "torch", "--output-dir", tmp_path,
                     env_extra={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not load model 'no-such-org/no-such-model'")
    assert "--model tiny" in lines[-1] and "Traceback" not in result.stderr


MLX_LORA_BUDGET = [a if a != "torch" else "mlx" for a in TINY_BUDGET] + ["--finetune", "lora", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def mlx_lora_run(tmp_path_factory, cache_env):
    output = tmp_path_factory.mktemp("mlx_run")
    result = run_cli("train", "--mode", "full", *MLX_LORA_BUDGET, "--output-dir", output, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_mlx_lora_run_writes_mlx_lm_adapters(mlx_lora_run):
    for stage in ("sft_final", "reasoning_final"):
        files = {p.name for p in (mlx_lora_run / stage).iterdir()}
        assert {"adapters.safetensors", "adapter_config.json", "run_config.json", "tokenizer.json"} <= files
    assert json.loads((mlx_lora_run / "run_config.json").read_text())["backend"] == "mlx"


def test_eval_runs_an_mlx_lora_checkpoint(mlx_lora_run, cache_env):
    result = run_cli("eval", "--checkpoint", mlx_lora_run / "reasoning_final", "--num-samples", "3",
                     env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| " in result.stdout


def test_mlx_grpo_from_an_mlx_lora_checkpoint(mlx_lora_run, cache_env, tmp_path):
    result = run_cli("train", "--mode", "grpo", *MLX_LORA_BUDGET, "--sft-checkpoint", mlx_lora_run / "sft_final",
                     "--output-dir", tmp_path, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "reasoning_final" / "adapters.safetensors").exists()


def test_mlx_runs_a_pytorch_full_checkpoint(trained_run, cache_env):
    folder = trained_run[0] / "reasoning_final"
    torch_answers = run_cli("infer", "--checkpoint", folder, "--backend", "torch", env_extra=cache_env)
    mlx_answers = run_cli("infer", "--checkpoint", folder, "--backend", "mlx", env_extra=cache_env)
    assert mlx_answers.returncode == 0, mlx_answers.stderr[-2000:]
    assert mlx_answers.stdout == torch_answers.stdout  # greedy: the same text from the same weights


def test_unreachable_hub_model_on_mlx_says_so_in_one_line(tmp_path):
    result = run_cli("train", "--model", "no-such-org/no-such-model", "--backend", "mlx", "--output-dir", tmp_path,
                     env_extra={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not load model 'no-such-org/no-such-model'")
    assert "Traceback" not in result.stderr


def test_missing_backend_packages_name_the_install_command(tmp_path):
    """With mlx unimportable (as on a machine without it), --backend mlx says how to install it."""
    code = ("import sys; sys.modules['mlx'] = None; import cli; "
            f"sys.argv = ['cli.py', 'train', '--backend', 'mlx', '--model', 'tiny', '--output-dir', {str(tmp_path)!r}]; "
            "sys.exit(cli.main())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the mlx backend needs packages that are missing: "
        "pip install -e '.[mlx]'  (Linux: pip install 'mlx[cpu]' mlx-lm)"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_diverging_sft_stops_with_one_line_and_saves_nothing(backend, cache_env, tmp_path):
    """lr 1e30 turns the weights to inf within a step or two: a NaN fault injected through the real loop."""
    budget = [a if a != "torch" else backend for a in TINY_BUDGET]
    result = run_cli("train", *budget, "--sft-lr", "1e30", "--output-dir", tmp_path, env_extra=cache_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: SFT diverged at step" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "sft_final").exists()


def poisoned_copy(folder: Path, target: Path) -> Path:
    """The checkpoint with every weight set to inf, as a diverged update leaves it."""
    import shutil

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    shutil.copytree(folder, target)
    weights = target / "model.safetensors"
    with safe_open(str(weights), "np") as handle:
        metadata = handle.metadata()
        tensors = {name: np.full_like(handle.get_tensor(name), np.inf) for name in handle.keys()}
    save_file(tensors, str(weights), metadata=metadata)
    return target


def test_a_grpo_run_that_samples_from_diverged_weights_stops_and_keeps_its_input(trained_run, cache_env, tmp_path):
    sft = poisoned_copy(trained_run[0] / "sft_final", tmp_path / "sft_final")
    before = {p.name: p.read_bytes() for p in sft.iterdir()}
    output = tmp_path / "grpo"
    result = run_cli("train", "--mode", "grpo", *TINY_BUDGET, "--sft-checkpoint", sft, "--output-dir", output,
                     env_extra=cache_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: GRPO diverged at step 1 (the model's next-token probabilities are not finite)")
    assert not (output / "reasoning_final").exists()
    assert {p.name: p.read_bytes() for p in sft.iterdir()} == before

@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_a_diverging_grpo_update_stops_at_its_step(backend_name, tiny_model_dir, monkeypatch):
    """lr 1e30 on an update that has a gradient: the untrained model's samples all score 0, so the
    rewards alternate within each group here, and every row trains."""
    import shared.training.loops as training
    from shared.runtime.errors import DivergedError
    from shared.tasks.addition.data import generate_problems
    from shared.tasks.addition.rewards import ADDITION_REWARDS
    from shared.training.config import GRPOConfig, ModelConfig
    from backends import make_backend

    monkeypatch.setattr(training, "score_group", lambda texts, problem, rewards: (
        [float(i % 2) for i in range(len(texts))], [training.reward_components(rewards, t, problem) for t in texts]))
    backend = make_backend(backend_name)
    backend.load(tiny_model_dir, ModelConfig(name="tiny", finetune="full"), trainable=True)
    settings = GRPOConfig(num_prompts=4, group_size=2, prompts_per_step=2, lr=1e30, max_new_tokens=16, save_every=0)
    records = []
    # Adam's first step moves each weight by about lr: 1e30 is still finite, the next step's sampling is not
    with pytest.raises(DivergedError, match=r"^GRPO diverged at step [12] ") as stopped:
        for _ in training.train_grpo(backend, generate_problems(4, 0, held_out=False), settings, 0, records.append,
                                     rewards=ADDITION_REWARDS):
            pass
    step = int(str(stopped.value).split()[4])
    assert [r["step"] for r in records] == list(range(1, step))  # nothing ran or was logged after it
