"""SkyRL training on tau2 with the recipe's episode engine as the environment (SkyRL's main_base, plus the tau2
environments and their tool schemas).

    python -m integrations.skyrl.main_tau2 [--config FILE] [key=value ...]

FILE defaults to integrations/skyrl/tau2_telecom.yaml; key=value follow SkyRL's override syntax
(trainer.train_batch_size=32, environment.skyrl_gym.tau2_telecom.reward=tau2, ...). Run it from the recipe's root
with the root on PYTHONPATH, so that Ray's workers import the environment (run_tau2_telecom.sh does both).
"""

from __future__ import annotations

import sys
from typing import Any

from integrations.skyrl.config import load_config


def run_experiment(cfg: Any) -> None:
    """The training run, in a Ray worker: the tau2 environments are registered where SkyRL's generator makes them."""
    from skyrl.train.entrypoints.main_base import BasePPOExp

    from integrations.skyrl.env import register_tau2_envs

    register_tau2_envs()
    BasePPOExp(cfg).run()


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    import ray
    from skyrl.train.utils import validate_cfg
    from skyrl.train.utils.utils import initialize_ray

    validate_cfg(cfg)
    initialize_ray(cfg)
    ray.get(ray.remote(num_cpus=1)(run_experiment).remote(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
