"""The tau2 episode engine and slime's custom generate function.

- slime's plugins (their dotted paths are the launcher's): generate_with_tau.generate, rollout_log.log_rollout /
  log_eval_rollout;
- playing an episode: engine (the loop, the policy's agents), episode (the one factory every caller starts episodes
  with), user_sim (tau2's LLM user), scripted (the scripted customer and the scripted policies: gold, shortcuts);
- tokens and tools: token_record (token-in-token-out bookkeeping, load_tokenizer), tool_format, tool_schemas;
- tau2: tau2_setup (quiet import), task_store;
- HTTP: clients/ (policy server, chat models, the one retry policy);
- knobs: settings (every TAU2_* variable), budgets (token budgets and time bounds);
- SFT: sft_format; command-line tools: cli.
"""
