"""What a run leaves to look at: W&B offline runs, pass@k and the reward breakdown, the report's plots."""
import json

import pytest

from shared.tasks.addition.data import Problem, reasoning_target
from shared.tasks.addition.rewards import ADDITION_REWARDS
from shared.training.evaluation import pass_at_k, score_completions
from shared.training.report import global_steps, write_plots
from test_cli import TINY_BUDGET, run_cli

PROBLEM = Problem((23, 15, 8))
RIGHT = reasoning_target(PROBLEM)
WRONG_ANSWER = RIGHT.rsplit("\n", 1)[0] + "\n47"


def test_pass_at_k_counts_a_problem_solved_by_any_sample():
    other = Problem((1, 2, 3))
    assert pass_at_k(ADDITION_REWARDS, [PROBLEM, other], [[WRONG_ANSWER, RIGHT], [WRONG_ANSWER, "6"]]) == 0.5
    assert pass_at_k(ADDITION_REWARDS, [PROBLEM], [[WRONG_ANSWER, WRONG_ANSWER]]) == 0.0


def test_reward_breakdown_averages_each_component():
    result = score_completions(ADDITION_REWARDS, [PROBLEM, PROBLEM], [RIGHT, WRONG_ANSWER], [10, 12])
    assert result.reward_components["correctness"] == 0.5 and result.reward_components["format"] == 1.0
    assert result.reward == pytest.approx((1.6 + 0.6) / 2)  # all weights, then all but correctness
    assert result.mean_completion_tokens == 11


def test_plots_follow_the_phases_present(tmp_path):
    sft = [{"phase": "sft", "step": i, "loss": 1.0 / i} for i in range(1, 41)]
    evals = [{"phase": "eval", "stage": "after_sft", "accuracy": 0.5, "format_compliance": 1.0}]
    assert global_steps(sft + evals) == list(range(1, 41)) + [40]
    assert [p.name for p in write_plots(sft + evals, tmp_path, {"correctness": 1.0})] == ["loss.png", "accuracy.png"]


@pytest.mark.slow  # a training run
def test_wandb_offline_run_holds_metrics_config_and_sample_tables(tmp_path):
    pytest.importorskip("wandb")
    result = run_cli("train", *TINY_BUDGET, "--wandb-project", "local-reasoning-test", "--output-dir", tmp_path,
                     env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"sft/loss", b"grpo/reward_correctness", b"grpo/kl", b"grpo/completion_tokens",
                b"eval/after_grpo/accuracy", b"eval/after_grpo/format_compliance", b"num_samples", b"group_size"):
        assert key in history, key
    tables = {path.name.rsplit("_", 2)[0]: json.loads(path.read_text())
              for path in (runs[0] / "files" / "media" / "table" / "samples").glob("*.table.json")}
    assert {"before_sft", "after_sft", "after_grpo", "ood_three_digit"} <= set(tables)
    assert tables["after_grpo"]["columns"] == ["prompt", "completion", "correct"]
    assert len(tables["after_grpo"]["data"]) == 5 and tables["after_grpo"]["data"][0][0].startswith("Calculate ")


@pytest.mark.slow  # two training runs
def test_sweep_writes_the_results_table_per_sample_count(tmp_path):
    budget = [a for a in TINY_BUDGET if a not in ("--num-samples", "96")]
    result = run_cli("sweep", "--num-samples", "64,32", *budget, "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["num_samples"] for row in rows] == [32, 64]
    assert all(0 <= row["sft_accuracy"] <= 1 and 0 <= row["grpo_accuracy"] <= 1 for row in rows)
    table = (tmp_path / "sweep.md").read_text()
    assert "| 32 samples |" in table and "| 64 samples |" in table and "| 32 samples |" in result.stdout
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for count in (32, 64):
        run = tmp_path / f"samples_{count}"
        assert json.loads((run / "run_config.json").read_text())["sft"]["num_samples"] == count
        assert (run / "reasoning_final" / "model.safetensors").exists() and (run / "report.md").exists()
    assert all(row["grpo_vs_sft"]["problems"] == 8 and row["minutes"] > 0 for row in rows)
    assert "McNemar p" in table
    again = run_cli("sweep", "--num-samples", "32", *budget, "--output-dir", tmp_path)  # the same folder: no run
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: 32 SFT problems finished earlier" in again.stderr and "SFT 0/" not in again.stderr
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows  # every finished row of the folder
    assert not (tmp_path / "samples_32" / "earlier_runs").exists()
    changed = run_cli("sweep", "--num-samples", "32,48", *budget, "--grpo-lr", "1e-3", "--output-dir", tmp_path)
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'samples_32'} finished with other settings: grpo.lr 5e-05 (this command: 0.001); "
        "use another --output-dir, or move that folder away"]
    assert not (tmp_path / "samples_48").exists()
    bad = run_cli("sweep", "--num-samples", "100,lots", "--model", "tiny")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --num-samples takes whole numbers separated by commas, like 100,500,1000; got '100,lots'"]


def test_the_accuracy_plot_draws_points_not_lines_between_evaluations():
    from shared.training.report import accuracy_figure

    evaluations = [(0, {"phase": "eval", "stage": "before_sft", "accuracy": 0.0, "format_compliance": 0.0,
                        "num_problems": 1000}),
                   (250, {"phase": "eval", "stage": "sft", "step": 250, "accuracy": 0.1, "format_compliance": 0.9,
                          "num_problems": 200}),
                   (500, {"phase": "eval", "stage": "after_sft", "accuracy": 0.9, "format_compliance": 1.0,
                          "num_problems": 1000})]
    lines = accuracy_figure(evaluations, None).axes[0].get_lines()
    assert len(lines) == 4 and all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in lines)
    assert [line.get_label() for line in lines] == ["accuracy (1000 problems)", "accuracy along the run (200 problems)",
                                                    "format (1000 problems)", "format along the run (200 problems)"]


def test_mcnemar_p_values_and_the_paired_comparison():
    from shared.training.evaluation import mcnemar_p_value, paired_comparison

    assert mcnemar_p_value(10, 0) == 2 / 2**10  # every discordant problem one way: twice the one-sided tail
    assert mcnemar_p_value(30, 15) == pytest.approx(0.035698, abs=1e-6)  # binomial(45, 1/2), two-sided
    assert mcnemar_p_value(15, 30) == mcnemar_p_value(30, 15) and mcnemar_p_value(5, 5) == mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(300, 250) == pytest.approx(0.0366, abs=5e-4)  # large counts stay exact
    assert paired_comparison("1100", "1011") == {"problems": 4, "difference": 0.25, "gained": 2, "lost": 1,
                                                 "p_value": 1.0}
    with pytest.raises(ValueError, match="the same problems"):
        paired_comparison("110", "1011")
