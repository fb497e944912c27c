"""Human-readable views of evaluation results (the JSON written by eval/evaluate_tau2.py).

- `render_markdown(results)` -> the text of results.md: headline with the bootstrap interval, the model beside the
  shortcut baselines (per subtask, transfer rate, verdict), pass^k and pass@k, tau2's own metrics on the tau2
  Results file, breakdowns by subtask / persona / termination, partial-credit components, truncated and failed
  episodes, episode statistics, configuration. The recipe's extra metrics are labelled as such.
- `write_chart(results, path)`: results.png, the pass^k curve (pass@k dashed) and per-subtask pass@1 bars with the
  shortcut baselines marked.
- `compare_table(named_results)` / `compare_main(paths, output)`: a side-by-side Markdown table of several runs
  (base vs SFT vs GRPO, or a run of `tau2 run`: its Results JSON is read as is), with each run's shortcut baselines
  and a warning when the runs are not comparable (domain, split, tasks, trials, user simulator, ...); with `output`
  also written as Markdown with a chart.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.tau2_results import is_tau2_results

REQUIRED_KEYS = ("pass_at_1", "avg_reward", "avg_partial_score", "pass_hat_k", "results")


def _user_kind(config: dict[str, Any]) -> str | None:
    kind = (config.get("user_sim") or {}).get("kind")
    return "llm" if kind in ("llm", "gemini") else kind


def _user_model(config: dict[str, Any]) -> str | None:
    """The user model without a litellm provider prefix (tau2 runs name it 'openai/NAME' or 'gemini/NAME')."""
    model = (config.get("user_sim") or {}).get("model")
    if model and model.split("/", 1)[0] in ("openai", "gemini") and "/" in model:
        return model.split("/", 1)[1]
    return model


# Settings that must agree for two runs to be compared (a file lists those it does not record in `not_recorded`).
COMPARABLE = (
    ("domain", lambda c: c.get("domain")),
    ("task split", lambda c: c.get("task_split")),
    ("solo mode", lambda c: c.get("solo_mode")),
    ("user simulator", _user_kind),
    ("user model", _user_model),
    ("max steps", lambda c: (c.get("episode") or {}).get("max_steps")),
    ("policy variant", lambda c: (c.get("episode") or {}).get("policy_variant")),
    ("tau2 version", lambda c: c.get("tau2_version")),
)
BASELINE_LABELS = {
    "gold": "gold (ceiling)",
    "always_transfer": "always-transfer",
    "shotgun": "shotgun",
    "do_nothing": "do-nothing",
}


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
            pct(g.get("transfer_rate")),
        ]
        for name, g in groups.items()
    ]


GROUP_HEADER = ("group", "episodes", "tasks", "successes", "pass@1", "avg reward", "avg partial", "transfer rate")


def baseline_section(results: dict[str, Any]) -> list[str]:
    """The model beside the shortcut baselines: pass@1 overall and per subtask, transfer rate, and the verdict."""
    baselines = results.get("baselines") or {}
    policies = baselines.get("policies") or {}
    if not policies:
        return []
    names = list(policies)
    subtasks = sorted(set(results.get("by_subtask") or {}) | {s for p in policies.values() for s in p["by_subtask"]})
    check = baselines.get("shortcut_check") or {}

    def cell(group: dict[str, Any] | None) -> str:
        return f"{pct(group['pass_at_1'])} ({group['successes']}/{group['episodes']})" if group else "-"

    model_overall = {
        "pass_at_1": results["pass_at_1"],
        "successes": results["counts"]["successes"],
        "episodes": results["counts"]["counted_episodes"],
    }
    rows = [["all tasks", cell(model_overall), *[cell(policies[n]) for n in names]]]
    for subtask in subtasks:
        model_group = (results.get("by_subtask") or {}).get(subtask)
        rows.append([subtask, cell(model_group), *[cell(policies[n]["by_subtask"].get(subtask)) for n in names]])
    transfers = [pct(policies[n]["transfer_rate"]) for n in names]
    rows.append(["transfer rate", pct(results.get("transfer_rate")), *transfers])
    user = baselines.get("user_sim") or {}
    user_text = f"{user.get('kind')} {user.get('model') or ''}".strip()
    out = ["", f"## Beside the shortcut baselines ({user_text} user simulator)", ""]
    out += [
        f"Scripted policies (no LLM) on the same tasks with the same user simulator and limits "
        f"({baselines.get('trials')} trial(s) per task): the gold ceiling, always-transfer, shotgun (transfer on "
        "'No Service', else every phone fix by name), do-nothing. pass@1 (successes / episodes):",
        "",
    ]
    out += _table(("", "model", *[BASELINE_LABELS.get(n, n) for n in names]), rows)
    resistant = check.get("model_on_shortcut_resistant_tasks") or {}
    out += [
        "",
        f"On the {check.get('shortcut_resistant_tasks')} tasks no shortcut solves, the model scores "
        f"{pct(resistant.get('pass_at_1'))} ({resistant.get('successes')}/{resistant.get('episodes')}); unneeded "
        f"transfers (tasks whose gold does not transfer): {pct(results.get('unneeded_transfer_rate'))}.",
        "",
        f"**Verdict: {check.get('verdict')}**",
    ]
    if not baselines.get("complete", True):
        out += ["", "(baselines incomplete: re-run the same command to finish them)"]
    return out


def tau2_section(results: dict[str, Any]) -> list[str]:
    """tau2's own metric names and compute_metrics on the tau2 Results file."""
    computed = results.get("tau2_metrics")
    info = results.get("tau2_results") or {}
    if not info:
        return []
    out = ["", "## tau2's own metrics", ""]
    agreement = "agrees with" if info.get("agrees_with_summary") else "DIFFERS from"
    out += [
        f"`{info.get('path')}` is this run as tau2's `Results` ({info.get('simulations')} simulations): open it with "
        f"`tau2 view --file` or `tau2 evaluate-trajs`. tau2's `compute_metrics` on it {agreement} the summary above.",
        "",
    ]
    rows = [[key, num(value, 4)] for key, value in (computed or {}).items() if key != "avg_agent_cost"]
    return out + _table(("tau2 metric", "value"), rows)


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
            ["transfer rate (recipe)", pct(results.get("transfer_rate"))],
            ["avg partial score (recipe; tau2 checks, truncated = 0)", num(results["avg_partial_score"])],
            [
                "avg partial, truncated episodes re-graded (not headline)",
                num(results.get("avg_partial_score_with_truncated_checks")),
            ],
            ["failed (infrastructure) episodes", f"{counts['failed_episodes']} ({failed_note})"],
            ["truncated episodes", counts["truncated_episodes"]],
        ],
    )
    out += baseline_section(results)
    ks = sorted(set(results["pass_hat_k"]) | set(results.get("pass_at_k") or {}), key=int)
    out += ["", "## pass^k (tau2's pass_hat_k: all k succeed) and pass@k (recipe: any of k succeeds)", ""]
    out += _table(
        ("k", "pass^k", "pass@k"),
        [[k, pct(results["pass_hat_k"].get(k)), pct((results.get("pass_at_k") or {}).get(k))] for k in ks],
    )
    out += tau2_section(results)
    for title, key in (("subtask", "by_subtask"), ("persona", "by_persona"), ("termination reason", "by_termination")):
        out += ["", f"## By {title}", ""]
        out += _table(GROUP_HEADER, _group_rows(results.get(key) or {}))
    components = results.get("partial_components") or {}
    if components:
        out += ["", "## Partial-credit components (recipe; mean fraction met)", ""]
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
        right.axhline(results["pass_at_1"], color="tab:blue", linestyle=":", label="model, all tasks")
    _shortcut_markers(right, list(range(len(names))), names, results)
    if results["pass_at_1"] is not None or (results.get("baselines") or {}).get("policies"):
        right.legend(loc="best", fontsize=7)
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, rotation=15, fontsize=8)
    right.set_ylim(0, 1.12)
    right.set_title("pass@1 by subtask (marks: shortcut baselines)")
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
    """An evaluate_tau2.py results JSON, or a tau2 `Results` JSON (from `tau2 run`) summarized the same way."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsFileError(f"no such results file: {file}") from None
    except (OSError, ValueError) as err:
        raise ResultsFileError(f"cannot read {file} as JSON: {err}") from None
    if is_tau2_results(data):
        from eval.tau2_results import load_tau2_run

        try:
            return load_tau2_run(file, data)
        except Exception as err:  # pydantic's validation error names the field
            first = " ".join(str(err).strip().splitlines()[:3])
            raise ResultsFileError(f"{file} looks like a tau2 Results file but does not load: {first}") from None
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise ResultsFileError(
            f"{file} is neither an evaluate_tau2.py results file (missing {', '.join(missing)}) nor a tau2 Results "
            "file (info, tasks, simulations)"
        )
    return data


def _not_recorded(results: dict[str, Any]) -> list[str]:
    return list((results.get("config") or {}).get("not_recorded") or [])


def comparability_warnings(named: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """What differs between the runs (a setting a file does not record, such as a tau2 run's split, is skipped)."""
    notes = []
    for label, getter in COMPARABLE:
        values = {name: getter(r.get("config") or {}) for name, r in named}
        recorded = [v for v, (_, r) in zip(values.values(), named) if label not in _not_recorded(r)]
        if len({json.dumps(v, sort_keys=True, default=str) for v in recorded}) > 1:
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
    rows.append(["avg partial score (recipe)", *[num(r["avg_partial_score"]) for r in runs]])
    rows.append(["transfer rate", *[pct(r.get("transfer_rate")) for r in runs]])
    subtasks = sorted({s for r in runs for s in (r.get("by_subtask") or {})})
    for subtask in subtasks:
        cells = []
        for r in runs:
            group = (r.get("by_subtask") or {}).get(subtask)
            cells.append(f"{pct(group['pass_at_1'])} (n={group['episodes']})" if group else "-")
        rows.append([f"pass@1 {subtask}", *cells])
    baseline_names = list(dict.fromkeys(n for r in runs for n in ((r.get("baselines") or {}).get("policies") or {})))
    for policy in baseline_names:
        cells = []
        for r in runs:
            p = ((r.get("baselines") or {}).get("policies") or {}).get(policy)
            cells.append(f"{pct(p['pass_at_1'])} ({p['successes']}/{p['episodes']})" if p else "-")
        rows.append([f"baseline {BASELINE_LABELS.get(policy, policy)} pass@1", *cells])
    if baseline_names:
        rows.append(["beats the shortcuts", *[_verdict_cell(r) for r in runs]])
    rows.append(["tasks x trials", *[f"{(r.get('counts') or {}).get('tasks')} x {r.get('num_trials')}" for r in runs]])
    rows.append(["failed episodes", *[(r.get("counts") or {}).get("failed_episodes") for r in runs]])
    rows.append(["user simulator", *[_user_label(r) for r in runs]])
    rows.append(["source", *[r.get("source", "evaluate_tau2.py") for r in runs]])
    lines = _table(("", *names), rows)
    notes = comparability_warnings(named)
    if notes:
        lines += ["", "WARNING: these runs are not directly comparable:"] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def _verdict_cell(results: dict[str, Any]) -> str:
    check = (results.get("baselines") or {}).get("shortcut_check")
    if not check:
        return "- (no baselines in this file)"
    beats = check.get("beats_shortcuts")
    return {True: "yes", False: "NO"}.get(beats, "undecided") + f" (best shortcut: {check.get('best_shortcut')})"


def _user_label(results: dict[str, Any]) -> str:
    user = (results.get("config") or {}).get("user_sim") or {}
    return f"{user.get('kind')}:{user.get('model')}" if user.get("model") else str(user.get("kind"))


def _shortcut_markers(ax: Any, centers: Sequence[float], groups: Sequence[str], run: dict[str, Any]) -> None:
    """Short horizontal marks at each shortcut baseline's pass@1 per group ("all tasks" first)."""
    policies = (run.get("baselines") or {}).get("policies") or {}
    styles = {
        "gold": ("k", "-"),
        "always_transfer": ("tab:red", "--"),
        "shotgun": ("tab:orange", "-."),
        "do_nothing": ("tab:gray", ":"),
    }
    for name, policy in policies.items():
        color, style = styles.get(name, ("tab:purple", "--"))
        for i, (center, group) in enumerate(zip(centers, groups, strict=True)):
            value = (
                policy["pass_at_1"]
                if group == "all tasks"
                else (policy["by_subtask"].get(group) or {}).get("pass_at_1")
            )
            if value is not None:
                label = BASELINE_LABELS.get(name, name) if i == 0 else None
                ax.hlines(value, center - 0.45, center + 0.45, colors=color, linestyles=style, label=label)


def write_compare_chart(named: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    """pass^k curves of every run, and pass@1 overall and per subtask side by side with the shortcut baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in named:
        ks = sorted(run["pass_hat_k"], key=int)
        left.plot([int(k) for k in ks], [run["pass_hat_k"][k] for k in ks], "o-", label=name)
    left.set_ylim(0, 1.08)
    left.set_xlabel("k")
    left.set_ylabel("pass^k")
    left.set_title("pass^k (all k trials succeed)")
    left.grid(alpha=0.3)
    left.legend(loc="best", fontsize=8)
    groups = ["all tasks", *sorted({s for _, run in named for s in (run.get("by_subtask") or {})})]
    width = 0.8 / max(1, len(named))
    for j, (name, run) in enumerate(named):
        values = [
            run["pass_at_1"] if g == "all tasks" else ((run.get("by_subtask") or {}).get(g) or {}).get("pass_at_1")
            for g in groups
        ]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        right.bar(xs, [v or 0.0 for v in values], width=width, label=name)
    with_baselines = next((run for _, run in named if (run.get("baselines") or {}).get("policies")), None)
    if with_baselines is not None:
        _shortcut_markers(right, list(range(len(groups))), groups, with_baselines)
    right.set_xticks(range(len(groups)))
    right.set_xticklabels(groups, rotation=15, fontsize=8)
    right.set_ylim(0, 1.12)
    right.set_title("pass@1 beside the shortcut baselines")
    right.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_main(paths: Sequence[str], output: str | Path | None = None) -> int:
    """Print the comparison of result files (and with `output`, write it as Markdown plus a chart beside it);
    exit code 2 for a missing or malformed file."""
    try:
        named = [(Path(p).stem, load_results(p)) for p in paths]
    except ResultsFileError as err:
        print(f"evaluate_tau2.py: error: {err}", file=sys.stderr)
        return 2
    labels = [name for name, _ in named]
    if len(set(labels)) < len(labels):  # same file names in different folders: use the paths
        named = [(str(p), r) for p, (_, r) in zip(paths, named, strict=True)]
    table = compare_table(named)
    print(table)
    if output is not None:
        markdown = Path(output).with_suffix(".md")
        chart = markdown.with_suffix(".png")
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(f"# tau2 comparison\n\n![pass^k and pass@1]({chart.name})\n\n{table}\n", encoding="utf-8")
        write_compare_chart(named, chart)
        print(f"written: {markdown} and {chart}", file=sys.stderr)
    return 0
