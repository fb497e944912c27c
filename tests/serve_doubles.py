"""Run the policy and user test doubles in their own process, so that load tests measure only the harness.

    python tests/serve_doubles.py --policy-text T --policy-delay 0.05 --user-text U --user-delay 0.4

Prints one JSON line {"policy_url": ..., "user_base_url": ...} when both listen; stops when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_helpers import real_tokenizer
from fake_openai_server import FakeOpenAIServer, text_reply
from scripted_policy_server import Fault, ScriptedPolicyServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy-text", default="Could you restart your phone?")
    parser.add_argument("--policy-delay", type=float, default=0.0)
    parser.add_argument("--user-text", default="It still says no service.")
    parser.add_argument("--user-delay", type=float, default=0.0)
    args = parser.parse_args()
    policy_reply = Fault(delay_s=args.policy_delay, text=args.policy_text)
    policy = ScriptedPolicyServer(real_tokenizer(), lambda prompt, params: policy_reply, decode_prompt=False)
    user = FakeOpenAIServer(default=text_reply(args.user_text, delay_s=args.user_delay))
    policy_url = policy.start()
    user.start()
    print(json.dumps({"policy_url": policy_url, "user_base_url": user.base_url}), flush=True)
    try:
        sys.stdin.read()  # the parent closes stdin (or dies) to stop us
    finally:
        user.stop()
        policy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
