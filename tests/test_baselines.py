"""eval/baselines.py: the model beside the shortcut baselines, and the verdict, on hand-made episodes."""

from __future__ import annotations

import pytest

from eval.baselines import policy_summary, shortcut_check
from eval.metrics import EpisodeRow

# Six tasks: s1-s3 are "service" tasks the shortcuts solve (s3 only the shotgun), m1-m3 "mms" tasks none solves.
SERVICE, MMS = ["s1", "s2", "s3"], ["m1", "m2", "m3"]


def row(task: str, success: bool, transferred: bool = False) -> EpisodeRow:
    return EpisodeRow(
        task_id=task,
        trial=0,
        subtask="service_issue" if task.startswith("s") else "mms_issue",
        status="completed",
        termination_reason="user_stop",
        reward=1.0 if success else 0.0,
        transferred=transferred,
    )


def policies() -> dict[str, dict]:
    return {
        "gold": policy_summary([row(t, True) for t in SERVICE + MMS]),
        "always_transfer": policy_summary([row(t, t in ("s1", "s2"), True) for t in SERVICE + MMS]),
        "shotgun": policy_summary([row(t, t in SERVICE) for t in SERVICE + MMS]),
        "do_nothing": policy_summary([row(t, False) for t in SERVICE + MMS]),
    }


SHORTCUTS = ("always_transfer", "shotgun", "do_nothing")


def test_policy_summary():
    summary = policies()["always_transfer"]
    assert summary["pass_at_1"] == pytest.approx(2 / 6) and summary["transfer_rate"] == 1.0
    assert summary["solved_task_ids"] == ["s1", "s2"]
    assert summary["by_subtask"]["service_issue"]["pass_at_1"] == pytest.approx(2 / 3)


def test_a_model_that_only_matches_the_shortcuts_is_called_out():
    model = [row(t, t in SERVICE, transferred=True) for t in SERVICE + MMS]
    check = shortcut_check(model, policies(), SHORTCUTS)
    assert check["best_shortcut"] == "shotgun" and check["best_shortcut_pass_at_1"] == pytest.approx(0.5)
    assert check["shortcut_resistant_tasks"] == 3 and check["shortcut_solvable_tasks"] == 3
    assert check["model_on_shortcut_resistant_tasks"]["successes"] == 0
    assert check["beats_shortcuts"] is False and check["beats_best_shortcut_overall"] is False
    assert check["verdict"].startswith("DOES NOT BEAT THE SHORTCUTS where they fail: 0/3 episodes")
    assert check["by_subtask"]["mms_issue"] == {
        "model": 0.0,
        "best_shortcut": "always_transfer",  # all tie at 0: the first listed
        "best_shortcut_pass_at_1": 0.0,
        "model_beats_best_shortcut": False,
    }


def test_a_model_that_solves_what_no_shortcut_does_beats_them():
    model = [row(t, t in ("s1", "m1", "m2", "m3")) for t in SERVICE + MMS]
    check = shortcut_check(model, policies(), SHORTCUTS)
    assert check["beats_shortcuts"] is True and check["beats_best_shortcut_overall"] is True
    assert check["model_on_shortcut_resistant_tasks"]["pass_at_1"] == 1.0
    assert check["verdict"].startswith("beats the shortcuts: pass@1 66.7% vs 50.0% for the best shortcut (shotgun)")
    assert check["by_subtask"]["mms_issue"]["model_beats_best_shortcut"] is True
    assert check["by_subtask"]["service_issue"]["model_beats_best_shortcut"] is False


def test_below_the_best_shortcut_overall_even_with_a_hard_task_solved():
    model = [row(t, t == "m1") for t in SERVICE + MMS]
    check = shortcut_check(model, policies(), SHORTCUTS)
    assert check["beats_shortcuts"] is False
    assert check["verdict"].startswith("BELOW THE BEST SHORTCUT overall (pass@1 16.7% vs 50.0%")


def test_no_verdict_when_every_task_is_solvable_by_a_shortcut_or_no_shortcut_ran():
    model = [row(t, True) for t in SERVICE]
    check = shortcut_check(model, policies(), SHORTCUTS)
    assert check["beats_shortcuts"] is None and "every task here is solved by a shortcut" in check["verdict"]
    assert shortcut_check(model, {"gold": policies()["gold"]}, SHORTCUTS)["beats_shortcuts"] is None
