#!/usr/bin/env bash
# GRPO on tau2 telecom with SkyRL: Qwen3-4B-Instruct-2507, the recipe's episode engine as SkyRL's environment
# (integrations/skyrl/env.py), the recipe's shaped reward, tau2's test split as SkyRL's evaluation set.
#
#   bash integrations/skyrl/run_tau2_telecom.sh [--dry-run] [--help] [-- extra SkyRL key=value overrides]
#
# Knobs (environment variables, defaults in brackets):
#   PYTHON            the Python with SkyRL installed (skyrl[fsdp] on a GPU node)            [python3]
#   DATA_DIR          train.parquet / validation.parquet from tau2_dataset.py, made when missing [/root/data/tau2_telecom]
#   TRAIN_SET         train (tau2's train split) or full (telecom's generated set minus the test split) [train]
#   MODEL_PATH        the policy to train (HF name or folder)                                [Qwen/Qwen3-4B-Instruct-2507]
#   NUM_GPUS          GPUs of the node, shared by the policy, its reference and the vLLM engines [8]
#   TRAIN_BATCH_SIZE  tasks per step                                                         [16]
#   N_SAMPLES         episodes per task (the GRPO group)                                     [4]
#   MAX_TURNS         policy turns per episode; then it ends truncated and is judged         [30]
#   REWARD            shaped (success + alpha * partial credit) or tau2 (tau2's 0/1 reward)  [shaped]
#   LOGGER            console or wandb (wandb reads WANDB_API_KEY)                           [console]
#   CONFIG            the SkyRL settings the knobs override                                  [integrations/skyrl/tau2_telecom.yaml]
#
# The user simulator is set as for slime: TAU2_USER_KIND / TAU2_USER_MODEL / TAU2_USER_BASE_URL (a local one:
# bash scripts/serve_user_sim.sh on GPUs that training does not use), its key in TAU2_USER_API_KEY or OPENAI_API_KEY.
# Every TAU2_* variable (TAU2_REWARD_ALPHA, TAU2_MAX_STEPS, ...) reaches the environment: the Ray cluster that
# main_tau2 starts inherits this shell's environment (export them before `ray start` if you start Ray yourself).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../../scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/common.sh"
parse_common_args "$@"

DATA_DIR="$(abs_path "${DATA_DIR:-/root/data/tau2_telecom}")"
TRAIN_SET="${TRAIN_SET:-train}"
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen3-4B-Instruct-2507}"
NUM_GPUS="${NUM_GPUS:-8}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-16}"
N_SAMPLES="${N_SAMPLES:-4}"
MAX_TURNS="${MAX_TURNS:-30}"
REWARD="${REWARD:-shaped}"
LOGGER="${LOGGER:-console}"
CONFIG="$(abs_path "${CONFIG:-$RECIPE_ROOT/integrations/skyrl/tau2_telecom.yaml}")"

for knob in NUM_GPUS TRAIN_BATCH_SIZE N_SAMPLES MAX_TURNS; do
  check_positive_int "$knob" "${!knob}"
done
case "$TRAIN_SET" in train | full) ;; *) die "TRAIN_SET must be train or full, got '$TRAIN_SET'" ;; esac
case "$REWARD" in shaped | tau2) ;; *) die "REWARD must be shaped or tau2, got '$REWARD'" ;; esac
case "$LOGGER" in console | wandb) ;; *) die "LOGGER must be console or wandb, got '$LOGGER'" ;; esac

check_file "$CONFIG" "CONFIG" "Point CONFIG at a SkyRL settings file such as integrations/skyrl/tau2_telecom.yaml"
check_recipe_module integrations/skyrl/env.py "The recipe checkout at $RECIPE_ROOT is incomplete"
if ! is_dry_run && ! "$PYTHON" -c 'import skyrl, skyrl_gym' >/dev/null 2>&1; then
  input_problem "PYTHON=$PYTHON cannot import skyrl and skyrl_gym: install SkyRL with its GPU extra (pip install 'skyrl[fsdp]'), then the recipe (PYTHON=$PYTHON bash scripts/install.sh)"
fi
check_user_simulator
require_gpus "$NUM_GPUS" "SkyRL GRPO (NUM_GPUS=$NUM_GPUS)"
finish_input_checks

# One env worker per episode in flight: a step holds its thread while the user simulator answers.
IN_FLIGHT=$((TRAIN_BATCH_SIZE * N_SAMPLES))
ENV_WORKERS=$((IN_FLIGHT > 128 ? IN_FLIGHT : 128))

run_cd "$RECIPE_ROOT"
if [[ -s "$DATA_DIR/train.parquet" && -s "$DATA_DIR/validation.parquet" ]]; then
  log "using the tau2 data in $DATA_DIR (delete it to write it again)"
else
  run_cmd "$PYTHON" integrations/skyrl/tau2_dataset.py --output_dir "$DATA_DIR" --domain telecom --train-set "$TRAIN_SET"
fi
run_cmd env "PYTHONPATH=$RECIPE_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m integrations.skyrl.main_tau2 \
  --config "$CONFIG" \
  "data.train_data=['$DATA_DIR/train.parquet']" \
  "data.val_data=['$DATA_DIR/validation.parquet']" \
  "trainer.policy.model.path=$MODEL_PATH" \
  "trainer.placement.policy_num_gpus_per_node=$NUM_GPUS" \
  "trainer.placement.ref_num_gpus_per_node=$NUM_GPUS" \
  "generator.inference_engine.num_engines=$NUM_GPUS" \
  "trainer.train_batch_size=$TRAIN_BATCH_SIZE" \
  "trainer.policy_mini_batch_size=$TRAIN_BATCH_SIZE" \
  "generator.n_samples_per_prompt=$N_SAMPLES" \
  "generator.max_turns=$MAX_TURNS" \
  "environment.skyrl_gym.max_env_workers=$ENV_WORKERS" \
  "environment.skyrl_gym.tau2_telecom.reward=$REWARD" \
  "trainer.logger=$LOGGER" \
  "${PASSTHROUGH_ARGS[@]}"
