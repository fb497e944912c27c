"""bench/episode_lengths.py on a few tasks: both scripted agents succeed, the table holds their numbers, and the
budgets of rollout/budgets.py leave the measured episodes room (no timing is asserted)."""

from __future__ import annotations

from bench import episode_lengths
from rollout import budgets


def test_both_agents_succeed_and_fit_the_budgets(tmp_path, capsys):
    out = tmp_path / "lengths.json"
    assert episode_lengths.main(["--split", "train,test", "--limit", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| gold | 6 | 6/6 |" in printed and "| teacher-like | 6 | 6/6 |" in printed
    import json

    rows = json.loads(out.read_text())
    for agent in ("gold", "teacher-like"):
        for row in rows[agent]:
            assert row["status"] == "completed" and row["success"]
            assert row["prompt"] + row["response"] == row["total"] <= budgets.CONTEXT_TOKENS
            assert row["response"] * 3 <= budgets.EPISODE_TOKENS
            assert row["turn_sampled_max"] * 10 <= budgets.TURN_TOKENS
    gold = {r["task_id"]: r for r in rows["gold"]}
    for row in rows["teacher-like"]:  # the teacher-like path adds look-ups, questions and explanations
        assert row["response"] > gold[row["task_id"]]["response"] and row["turns"] > gold[row["task_id"]]["turns"]
