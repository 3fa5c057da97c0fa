"""Your own task through the CLI, as a user runs it: a JSONL file, a reward file, Countdown, and bad files."""
import json
import re
import time

import pytest

from shared.training.resume import PERIODIC_FOLDER

from tests.test_cli import cache_env, run_cli  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

TINY = ["--model", "tiny", "--backend", "torch", "--sft-batch-size", "16", "--sft-lr", "3e-3", "--prompts-per-step",
        "2", "--group-size", "2", "--eval-samples", "6", "--ood-samples", "3", "--no-wandb"]


def write_task(folder):
    """Reversing words: its own wording and trace, train and test lines, some lines without a completion."""
    lines = []
    for n in range(80):
        words = ["red", "sun", "cat", "map", "fog", "ink"][n % 6], ["one", "two", "six"][n % 3]
        line = {"prompt": f"Reverse: {words[0]} {words[1]} {n}", "answer": f"{n} {words[1]} {words[0]}",
                "split": "test" if n % 10 == 0 else "train"}
        if n % 4:  # one training line in four is for GRPO only
            line["completion"] = f"<think>\nlast first: {n}, {words[1]}, {words[0]}\n</think>\n{line['answer']}"
        lines.append(line)
    lines += [{"prompt": f"Reverse: a b {n}", "answer": f"{n} b a", "split": "short"} for n in range(4)]
    path = folder / "reverse.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


REWARDS = ("import pathlib\n"
           "with open(pathlib.Path(__file__).with_suffix('.log'), 'a') as log:  # runs each time the file loads\n"
           "    log.write('loaded\\n')\n"
           "def mentions_number(completion, example):\n"
           "    return float(example['prompt'].split()[-1] in completion)\n"
           "REWARDS = {'mentions_number': (mentions_number, 0.3)}\n")


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, cache_env):  # noqa: F811
    folder = tmp_path_factory.mktemp("task")
    task, rewards = write_task(folder), folder / "rewards.py"
    rewards.write_text(REWARDS)
    output = folder / "out"
    result = run_cli("train", "--task", task, "--reward-file", rewards, "--mode", "full", "--num-samples", "48",
                     "--grpo-samples", "4", *TINY, "--output-dir", output, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, task, output, result


def test_a_jsonl_task_with_a_reward_file_trains_end_to_end(file_run):
    folder, task, output, result = file_run
    assert "| after GRPO |" in result.stdout and "mentions number" in result.stdout
    assert (folder / "rewards.log").read_text() == "loaded\n"  # the task and its reward file loaded once a run
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in records if r["phase"] == "grpo"]
    assert len(grpo) == 2 and all("reward_mentions_number" in r for r in grpo)
    assert len([r for r in records if r["phase"] == "sft"]) == 3  # 48 lines with a completion, 16 a step
    evaluation = json.loads((output / "eval.json").read_text())
    assert evaluation["in_distribution"]["after_sft"]["num_problems"] == 6  # of the file's 8 test lines
    assert list(evaluation["out_of_distribution"]) == ["short"]
    assert set(evaluation["in_distribution"]["after_grpo"]["reward_components"]) == {
        "correctness", "format", "mentions_number"}
    config = json.loads((output / "reasoning_final" / "run_config.json").read_text())
    assert config["task"]["name"] == str(task) and len(config["task"]["sha256"]) == 64
    assert config["task"]["reward_file"] == str(folder / "rewards.py")
    assert config["grpo"]["reward_weights"] == {"correctness": 1.0, "format": 0.2, "mentions_number": 0.3}
    assert f"task `{task}`" in (output / "report.md").read_text()


def test_infer_and_eval_take_the_checkpoints_task(file_run, cache_env):  # noqa: F811
    folder, task, output, _ = file_run
    result = run_cli("infer", "--checkpoint", output / "reasoning_final", "--batch", "--num-samples", "3",
                     env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Reverse: red one 0 = 0 one red: got" in result.stdout and "accuracy: " in result.stdout
    result = run_cli("infer", "--checkpoint", output / "reasoning_final", "--interactive", env_extra=cache_env,
                     stdin="Reverse: fog two 7\nquit\n")
    assert result.returncode == 0 and result.stdout.startswith("Type a prompt")
    result = run_cli("eval", "--checkpoint", output / "sft_final", "--num-samples", "4", "--ood-samples", "2",
                     env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| short |" in result.stdout and "mentions number" in result.stdout


def test_grpo_from_a_checkpoint_continues_its_task(file_run, cache_env):  # noqa: F811
    folder, task, output, _ = file_run
    result = run_cli("train", "--mode", "grpo", "--sft-checkpoint", output / "sft_final", "--grpo-samples", "2",
                     "--backend", "mlx", "--prompts-per-step", "2", "--group-size", "2", "--eval-samples", "4",
                     "--ood-samples", "0", "--no-wandb", "--output-dir", folder / "grpo", env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((folder / "grpo" / "run_config.json").read_text())
    assert config["task"]["name"] == str(task) and config["backend"] == "mlx"
    assert "reward_mentions_number" in (folder / "grpo" / "metrics.jsonl").read_text()


def test_countdown_trains_on_the_tiny_model(tmp_path, cache_env):  # noqa: F811
    result = run_cli("train", "--model", "tiny", "--task", "countdown", "--mode", "sft", "--num-samples", "512",
                     "--eval-samples", "20", "--output-dir", tmp_path / "out", "--no-wandb", env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| after SFT |" in result.stdout and "numbers once" in result.stdout
    evaluation = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert evaluation["in_distribution"]["after_sft"]["num_problems"] == 20
    assert "Using the numbers" in evaluation["in_distribution"]["after_sft"]["samples"][0]["prompt"]


def test_a_reward_that_fails_mid_grpo_saves_a_resume_point_and_continues_once_fixed(tmp_path, cache_env):  # noqa
    task, rewards = write_task(tmp_path), tmp_path / "rewards.py"
    # the evaluations before and after SFT call it 2 x 4 times, each GRPO step 2 prompts x 2 completions
    rewards.write_text("calls = 0\ndef flaky(completion, example):\n    global calls\n    calls += 1\n"
                       "    if calls > 12:\n        raise ValueError('flaky broke')\n    return 1.0\n"
                       "REWARDS = {'flaky': (flaky, 0.1)}\n")
    output = tmp_path / "out"
    command = ["train", "--task", task, "--reward-file", rewards, "--mode", "full", "--num-samples", "16",
               "--grpo-samples", "6", *TINY, "--eval-samples", "4", "--ood-samples", "0", "--output-dir", output]
    result = run_cli(*command, env_extra=cache_env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith(
        "error: reward 'flaky' raised ValueError: flaky broke on line ")
    assert f"saved {output}/{PERIODIC_FOLDER}/grpo-step-000001; fix it, then continue with: python cli.py train " \
           f"--resume --output-dir {output}" in lines[-1]
    rewards.write_text("def flaky(completion, example):\n    return 1.0\nREWARDS = {'flaky': (flaky, 0.1)}\n")
    result = run_cli("train", "--resume", "--output-dir", output, env_extra=cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "grpo"]
    assert steps == [1, 2, 3]


def bad_files(folder):
    good = write_task(folder)
    cases = {
        "missing task": (["--task", folder / "nope.jsonl"], r"--task .*nope.jsonl: no such file"),
        "empty": (["--task", folder / "empty.jsonl"], r"is empty"),
        "not json": (["--task", folder / "broken.jsonl"], r"line 2 is not JSON"),
        "no answer": (["--task", folder / "noanswer.jsonl"], r"line 1 has no 'answer'"),
        "no training": (["--task", folder / "testonly.jsonl"], r"has no training lines"),
        "reward import": (["--task", good, "--reward-file", folder / "r1.py"],
                          r"does not import: ModuleNotFoundError: No module named .nowhere. \(line 1\)"),
        "reward entry": (["--task", good, "--reward-file", folder / "r2.py"], r"REWARDS\['x'\] must be"),
        "missing reward": (["--reward-file", folder / "r3.py"], r"--reward-file .*r3.py: no such file"),
    }
    (folder / "empty.jsonl").write_text("\n")
    (folder / "broken.jsonl").write_text('{"prompt": "a", "answer": 1}\n{"prompt": \n')
    (folder / "noanswer.jsonl").write_text('{"prompt": "a"}\n')
    (folder / "testonly.jsonl").write_text('{"prompt": "a", "answer": 1, "split": "test"}\n')
    (folder / "r1.py").write_text("from nowhere import nothing\n")
    (folder / "r2.py").write_text("REWARDS = {'x': (len,)}\n")
    return cases


def test_bad_task_and_reward_files_exit_2_at_once_with_one_line(tmp_path, cache_env):  # noqa: F811
    for name, (flags, message) in bad_files(tmp_path).items():
        started = time.perf_counter()
        result = run_cli("train", "--model", "tiny", *flags, "--output-dir", tmp_path / "out", env_extra=cache_env)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert time.perf_counter() - started < 30, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert re.search(message, lines[0]), (name, lines[0])
        assert not (tmp_path / "out").exists(), name


def write_long_task(folder, bom: bool = False):
    """40 lines whose prompts are about 10,000 tokens, the answer at the end: far past the tiny model's 512
    positions. Saved with a byte-order mark when asked, as some Windows editors write JSONL."""
    lines = [{"prompt": " ".join(["x"] * 5000) + f" {n} {n % 9}", "answer": n % 9,
              "completion": f"<think>{n % 9}</think>\n{n % 9}", "split": "test" if n % 10 == 0 else "train"}
             for n in range(40)]
    path = folder / "long.jsonl"
    path.write_text(("\ufeff" if bom else "") + "\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def test_prompts_past_the_model_are_one_line_before_any_work_and_truncate_trains(tmp_path, cache_env):  # noqa: F811
    task, output = write_long_task(tmp_path, bom=True), tmp_path / "out"
    began = time.monotonic()
    refused = run_cli("train", "--task", task, "--mode", "sft", "--num-samples", "16", *TINY, "--output-dir", output,
                      env_extra=cache_env)
    assert time.monotonic() - began < 30
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: line \d+ of {re.escape(str(task))} is 10,0\d\d tokens \(prompt 10,0\d\d \+ "
                        r"completion \d\), more than the model's 512 positions for SFT; 15 more SFT problems too: "
                        r"--truncate cuts prompts from the left to fit", line), line
    assert not output.exists()
    trained = run_cli("train", "--task", task, "--mode", "sft", "--num-samples", "16", *TINY, "--output-dir", output,
                      "--truncate", env_extra=cache_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert re.search(r"--truncate: 16 of 16 SFT problems had their prompts cut from the left to fit the model's 512 "
                     r"positions \(the longest was 10,0\d\d tokens\)", trained.stderr)
    samples = json.loads((output / "eval.json").read_text())["in_distribution"]["after_sft"]["samples"]
    assert all(s["prompt"].endswith(f" {n} {n % 9}") and len(s["prompt"]) < 2000 for s, n in zip(samples, (0, 10)))
    short = run_cli("eval", "--checkpoint", output / "sft_final", "--num-samples", "2", "--ood-samples", "0",
                    "--max-new-tokens", "8", "--max-seq-len", "64", "--truncate", env_extra=cache_env)
    assert short.returncode == 0 and "cut from the left to fit --max-seq-len 64" in short.stderr, short.stderr[-2000:]
