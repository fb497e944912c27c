"""One GRPO-shaped rollout batch, run exactly the way slime runs the recipe's plugins, without slime.

    python examples/cpu_rollout_batch.py --prompt-data DATA/telecom_train_tasks.jsonl --hf-checkpoint MODEL \
        --policy-url http://127.0.0.1:30000 [--num-prompts 2] [--n-samples-per-prompt 2] [--max-response-len 256]

Like slime: each prompt row becomes `--n-samples-per-prompt` deep copies sharing a `group_index`; all samples are
generated concurrently on one asyncio loop through `rollout.generate_with_tau.generate(args, sample,
sampling_params)`; then `reward.tau2_reward_shaping.tau2_reward_post_process(args, samples)` turns rewards into
advantages. Prints one line per sample and writes them to `--output` (JSONL). Exit code 1 if any sample breaks
slime's invariants (lengths, masks), is missing a reward, or failed (a server or simulator error).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import time
from pathlib import Path

from examples.slime_standin import Sample, slime_args, slime_sampling_params


def load_samples(path: Path, num_prompts: int, n_samples: int) -> list[Sample]:
    """slime's prompt dataset: `--input-key index --metadata-key metadata`, n deep copies per prompt."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:num_prompts]
    samples = []
    for group, row in enumerate(rows):
        prompt = Sample(group_index=group, prompt=row["index"], metadata=row["metadata"])
        for _ in range(n_samples):
            sample = copy.deepcopy(prompt)
            sample.index = len(samples)
            samples.append(sample)
    return samples


def check_sample(sample: Sample) -> list[str]:
    problems = []
    if sample.response_length <= 0:
        problems.append("empty response")
    if len(sample.loss_mask or []) != sample.response_length:
        problems.append(f"loss_mask {len(sample.loss_mask or [])} != response_length {sample.response_length}")
    if len(sample.rollout_log_probs or []) != sample.response_length:
        problems.append("rollout_log_probs length differs from response_length")
    if len(sample.tokens) <= sample.response_length:
        problems.append("no prompt tokens")
    if sample.reward is None:
        problems.append("no reward")
    if any(lp != 0.0 for lp, m in zip(sample.rollout_log_probs or [], sample.loss_mask or []) if m == 0):
        problems.append("a masked token carries a non-zero log-prob")
    return problems


async def generate_all(args, samples: list[Sample], max_response_len: int, temperature: float) -> list[Sample]:
    from rollout.generate_with_tau import close_clients, generate

    async def one(sample: Sample) -> Sample:
        params = slime_sampling_params(max_response_len)
        params["temperature"] = temperature
        return await generate(args, sample, params)

    try:
        return await asyncio.gather(*(one(sample) for sample in samples))
    finally:
        await close_clients()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-data", type=Path, required=True)
    parser.add_argument("--hf-checkpoint", required=True, help="model folder (slime builds the tokenizer from it)")
    parser.add_argument("--policy-url", required=True, help="server root, e.g. http://127.0.0.1:30000")
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--n-samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-response-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=None, help="per-sample JSONL")
    opts = parser.parse_args(argv)
    if not opts.prompt_data.exists():
        parser.error(f"no prompt data at {opts.prompt_data}; run examples/tau2_mock.py first")

    host, port = opts.policy_url.rsplit("//", 1)[-1].rsplit(":", 1)
    args = slime_args(
        opts.hf_checkpoint,
        int(port),
        sglang_router_ip=host,
        rollout_max_response_len=opts.max_response_len,
        n_samples_per_prompt=opts.n_samples_per_prompt,
    )
    samples = load_samples(opts.prompt_data, opts.num_prompts, opts.n_samples_per_prompt)
    started = time.perf_counter()
    samples = asyncio.run(generate_all(args, samples, opts.max_response_len, opts.temperature))
    wall = time.perf_counter() - started

    from reward.tau2_reward_shaping import tau2_reward_post_process

    raw_rewards, advantages = tau2_reward_post_process(args, samples)
    header = f"{'#':>2} {'grp':>3} {'status':<10} {'termination':<16} {'turns':>5} {'resp':>5} {'train':>5} "
    header += f"{'reward':>6} {'partial':>7} {'shaped':>6} {'adv':>7}  task"
    print(header)
    print("-" * len(header))
    broken = 0
    records = []
    for sample, raw, adv in zip(samples, raw_rewards, advantages):
        meta = sample.metadata
        problems = check_sample(sample)
        broken += bool(problems)
        print(
            f"{sample.index:>2} {sample.group_index:>3} {sample.status.name:<10} "
            f"{meta.get('termination_reason')!s:<16} {meta.get('turns', 0):>5} {sample.response_length:>5} "
            f"{sum(sample.loss_mask):>5} {sample.reward:>6.2f} {meta.get('partial_score', 0.0):>7.3f} "
            f"{raw:>6.3f} {adv:>7.3f}  {meta.get('task_id')}" + (f"  PROBLEMS: {problems}" if problems else "")
        )
        records.append(
            {
                "index": sample.index,
                "group_index": sample.group_index,
                "status": sample.status.name,
                "reward": sample.reward,
                "shaped_reward": raw,
                "advantage": adv,
                "response_length": sample.response_length,
                "trained_tokens": sum(sample.loss_mask),
                "remove_sample": sample.remove_sample,
                "problems": problems,
                "metadata": {k: v for k, v in meta.items() if k != "task"},
            }
        )
    failed = [s for s in samples if s.status.name == "FAILED"]
    for sample in failed[:3]:
        print(f"sample {sample.index} FAILED: {sample.metadata.get('failure')}")
    print(f"{len(samples)} samples in {wall:.1f} s; {broken} broke slime's invariants; {len(failed)} failed")
    if opts.output:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    return 1 if broken or failed else 0


if __name__ == "__main__":
    sys.exit(main())
