"""HTTP clients of the episode engine: the policy server (token-in-token-out) and chat models (user simulator,
teacher)."""
