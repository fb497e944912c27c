"""Human-readable views of evaluation results (the JSON written by eval/evaluate_tau2.py).

- `render_markdown(results)` -> the text of results.md: headline with the bootstrap interval, pass^k and pass@k,
  breakdowns by subtask / persona / termination, partial-credit components, truncated and failed episodes,
  episode statistics, configuration.
- `write_chart(results, path)`: results.png, the pass^k curve (pass@k dashed) and per-subtask pass@1 bars.
- `compare_table(named_results)` / `compare_main(paths)`: a side-by-side Markdown table of several runs (base vs SFT
  vs GRPO), with a warning when the runs are not comparable (domain, split, tasks, trials, user simulator, ...).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("pass_at_1", "avg_reward", "avg_partial_score", "pass_hat_k", "results")
# Settings that must agree for two runs to be compared.
COMPARABLE = (
    ("domain", lambda c: c.get("domain")),
    ("task split", lambda c: c.get("task_split")),
    ("solo mode", lambda c: c.get("solo_mode")),
    ("user simulator", lambda c: (c.get("user_sim") or {}).get("kind")),
    ("user model", lambda c: (c.get("user_sim") or {}).get("model")),
    ("max steps", lambda c: (c.get("episode") or {}).get("max_steps")),
    ("policy variant", lambda c: (c.get("episode") or {}).get("policy_variant")),
    ("tau2 version", lambda c: c.get("tau2_version")),
)


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ci_text(results: dict[str, Any]) -> str:
    ci = results.get("pass_at_1_ci")
    if not ci:
        return ""
    return f"[{pct(ci['low'])}, {pct(ci['high'])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _group_rows(groups: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            name,
            g["episodes"],
            g["tasks"],
            g["successes"],
            pct(g["pass_at_1"]),
            num(g["avg_reward"]),
            num(g["avg_partial_score"]),
        ]
        for name, g in groups.items()
    ]


GROUP_HEADER = ("group", "episodes", "tasks", "successes", "pass@1", "avg reward", "avg partial")


def model_label(results: dict[str, Any]) -> str:
    model = str((results.get("config") or {}).get("model") or "model")
    return Path(model.rstrip("/")).name or model


def render_markdown(results: dict[str, Any]) -> str:
    config = results.get("config") or {}
    counts = results["counts"]
    user = config.get("user_sim") or {}
    sampling = config.get("sampling") or {}
    episode = config.get("episode") or {}
    out = [f"# tau2 evaluation: {model_label(results)}", ""]
    out += [
        f"- model: `{config.get('model')}`",
        f"- domain / split: {config.get('domain')} / {config.get('task_split')}, {counts['tasks']} tasks x "
        f"{results.get('num_trials')} trials, {'solo' if config.get('solo_mode') else 'dual-control'} mode",
        f"- user simulator: {user.get('kind')} {user.get('model') or ''} (temperature {user.get('temperature')})",
        f"- sampling: temperature {sampling.get('temperature')}, top-p {sampling.get('top_p')}, episode token budget "
        f"{sampling.get('max_response_tokens')}, seed {sampling.get('seed')}",
        f"- limits: max steps {episode.get('max_steps')}, max errors {episode.get('max_errors')}, policy "
        f"{episode.get('policy_variant')}",
        f"- tau2 {config.get('tau2_version')}, configuration hash `{results.get('config_hash')}`",
    ]
    if not results.get("complete", True):
        out += ["", f"**Incomplete:** {results['recorded_episodes']} of {results['expected_episodes']} episodes."]
    failed_note = "excluded from the rates" if counts["exclude_failed"] else "counted as failures"
    out += ["", "## Headline", ""]
    out += _table(
        ("metric", "value"),
        [
            ["pass@1 (95% CI, task bootstrap)", f"{pct(results['pass_at_1'])} {ci_text(results)}"],
            ["successes / counted episodes", f"{counts['successes']} / {counts['counted_episodes']}"],
            ["avg reward", num(results["avg_reward"])],
            ["avg partial score (tau2 checks; truncated = 0)", num(results["avg_partial_score"])],
            [
                "avg partial, truncated episodes re-graded (not headline)",
                num(results.get("avg_partial_score_with_truncated_checks")),
            ],
            ["failed (infrastructure) episodes", f"{counts['failed_episodes']} ({failed_note})"],
            ["truncated episodes", counts["truncated_episodes"]],
        ],
    )
    ks = sorted(set(results["pass_hat_k"]) | set(results.get("pass_at_k") or {}), key=int)
    out += ["", "## pass^k (leaderboard, all k succeed) and pass@k (any of k succeeds)", ""]
    out += _table(
        ("k", "pass^k", "pass@k"),
        [[k, pct(results["pass_hat_k"].get(k)), pct((results.get("pass_at_k") or {}).get(k))] for k in ks],
    )
    for title, key in (("subtask", "by_subtask"), ("persona", "by_persona"), ("termination reason", "by_termination")):
        out += ["", f"## By {title}", ""]
        out += _table(GROUP_HEADER, _group_rows(results.get(key) or {}))
    components = results.get("partial_components") or {}
    if components:
        out += ["", "## Partial-credit components (mean fraction met)", ""]
        component_rows = [[name, num(c["mean"]), c["episodes"]] for name, c in components.items()]
        out += _table(("component", "mean", "episodes"), component_rows)
    truncated = results.get("truncated") or {}
    if truncated.get("episodes"):
        out += ["", "## Truncated episodes", "", truncated.get("note", ""), ""]
        out += _table(
            ("truncated", "re-graded", "avg partial (re-graded)", "would have succeeded"),
            [
                [
                    truncated["episodes"],
                    truncated["graded"],
                    num(truncated["avg_partial_score_from_truncated_checks"]),
                    truncated["would_have_succeeded"],
                ]
            ],
        )
    stats = results.get("episode_stats") or {}
    if stats:
        out += ["", "## Per episode (episodes that did not fail)", ""]
        out += _table(
            ("quantity", "mean", "median", "p90", "max"),
            [[name, *(num(s[key], 2) for key in ("mean", "median", "p90", "max"))] for name, s in stats.items()],
        )
    failed = results.get("failed") or {}
    if failed.get("episodes"):
        out += ["", "## Failed episodes (infrastructure)", ""]
        out += _table(("error", "episodes"), [[err.replace("|", "\\|"), n] for err, n in failed["by_error"].items()])
    out += ["", "Definitions: " + "; ".join(f"{k}: {v}" for k, v in (results.get("definitions") or {}).items()), ""]
    return "\n".join(out)


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = sorted(results["pass_hat_k"], key=int)
    if ks:
        left.plot([int(k) for k in ks], [results["pass_hat_k"][k] for k in ks], "o-", label="pass^k (all k succeed)")
        at_k = results.get("pass_at_k") or {}
        if at_k:
            left.plot([int(k) for k in ks], [at_k.get(k) for k in ks], "s--", label="pass@k (any of k)")
        left.set_xticks([int(k) for k in ks])
    left.set_ylim(0, 1.08)
    left.margins(x=0.1)
    left.set_xlabel("k")
    left.set_ylabel("rate")
    left.set_title(f"pass@1 {pct(results['pass_at_1'])} {ci_text(results)}")
    left.grid(alpha=0.3)
    left.legend(loc="best")
    groups = results.get("by_subtask") or {}
    names = list(groups)
    values = [groups[n]["pass_at_1"] or 0.0 for n in names]
    bars = right.bar(range(len(names)), values, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        right.annotate(
            f"n={groups[name]['episodes']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if results["pass_at_1"] is not None:
        right.axhline(results["pass_at_1"], color="gray", linestyle=":", label="overall")
        right.legend(loc="best")
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, rotation=15, fontsize=8)
    right.set_ylim(0, 1.12)
    right.set_title("pass@1 by subtask")
    fig.suptitle(
        f"{model_label(results)} on {(results.get('config') or {}).get('domain')} "
        f"{(results.get('config') or {}).get('task_split')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], markdown_path: Path, chart_path: Path) -> None:
    """results.md and results.png, each written to a temporary name first and then moved into place."""
    tmp_md = markdown_path.with_name(f".{markdown_path.name}.tmp")
    tmp_md.write_text(render_markdown(results), encoding="utf-8")
    tmp_md.replace(markdown_path)
    tmp_png = chart_path.with_name(f".{chart_path.stem}.tmp.png")
    write_chart(results, tmp_png)
    tmp_png.replace(chart_path)


# -------------------------------------------------------------------------------------------------------- compare


class ResultsFileError(ValueError):
    """A file that is not an evaluate_tau2.py results JSON."""


def load_results(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsFileError(f"no such results file: {file}") from None
    except (OSError, ValueError) as err:
        raise ResultsFileError(f"cannot read {file} as JSON: {err}") from None
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise ResultsFileError(f"{file} is not an evaluate_tau2.py results file (missing {', '.join(missing)})")
    return data


def comparability_warnings(named: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    notes = []
    for label, getter in COMPARABLE:
        values = {name: getter(r.get("config") or {}) for name, r in named}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            notes.append(f"{label} differs: " + ", ".join(f"{n}={v}" for n, v in values.items()))
    task_sets = {name: tuple(sorted(r.get("task_ids") or [])) for name, r in named}
    if len(set(task_sets.values())) > 1:
        notes.append("the task sets differ: " + ", ".join(f"{n}={len(t)} tasks" for n, t in task_sets.items()))
    return notes


def compare_table(named: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Side-by-side Markdown table: pass@1 with CI, pass^k, pass@k, reward, partial, per subtask, counts."""
    names = [name for name, _ in named]
    runs = [r for _, r in named]
    rows: list[list[Any]] = [
        ["model", *[model_label(r) for r in runs]],
        ["pass@1 [95% CI]", *[f"{pct(r['pass_at_1'])} {ci_text(r)}" for r in runs]],
    ]
    max_k = max((len(r["pass_hat_k"]) for r in runs), default=0)
    for k in range(1, max_k + 1):
        rows.append([f"pass^{k}", *[pct(r["pass_hat_k"].get(str(k))) for r in runs]])
    for k in range(2, max_k + 1):
        rows.append([f"pass@{k} (any success)", *[pct((r.get("pass_at_k") or {}).get(str(k))) for r in runs]])
    rows.append(["avg reward", *[num(r["avg_reward"]) for r in runs]])
    rows.append(["avg partial score", *[num(r["avg_partial_score"]) for r in runs]])
    subtasks = sorted({s for r in runs for s in (r.get("by_subtask") or {})})
    for subtask in subtasks:
        cells = []
        for r in runs:
            group = (r.get("by_subtask") or {}).get(subtask)
            cells.append(f"{pct(group['pass_at_1'])} (n={group['episodes']})" if group else "-")
        rows.append([f"pass@1 {subtask}", *cells])
    rows.append(["tasks x trials", *[f"{(r.get('counts') or {}).get('tasks')} x {r.get('num_trials')}" for r in runs]])
    rows.append(["failed episodes", *[(r.get("counts") or {}).get("failed_episodes") for r in runs]])
    rows.append(["user simulator", *[_user_label(r) for r in runs]])
    lines = _table(("", *names), rows)
    notes = comparability_warnings(named)
    if notes:
        lines += ["", "WARNING: these runs are not directly comparable:"] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def _user_label(results: dict[str, Any]) -> str:
    user = (results.get("config") or {}).get("user_sim") or {}
    return f"{user.get('kind')}:{user.get('model')}" if user.get("model") else str(user.get("kind"))


def compare_main(paths: Sequence[str]) -> int:
    """Print the comparison of result files; exit code 2 for a missing or malformed file."""
    try:
        named = [(Path(p).stem, load_results(p)) for p in paths]
    except ResultsFileError as err:
        print(f"evaluate_tau2.py: error: {err}", file=sys.stderr)
        return 2
    labels = [name for name, _ in named]
    if len(set(labels)) < len(labels):  # same file names in different folders: use the paths
        named = [(str(p), r) for p, (_, r) in zip(paths, named, strict=True)]
    print(compare_table(named))
    return 0
