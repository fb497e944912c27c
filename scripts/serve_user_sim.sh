#!/usr/bin/env bash
# Serve the tau2 user simulator locally: an sglang OpenAI-compatible server WITH a tool-call parser. The telecom
# user acts on its phone through tools; without a parser sglang returns those calls as plain text and the user
# simulator never touches the device.
#
#   bash scripts/serve_user_sim.sh [--dry-run] [--help] [-- extra sglang.launch_server flags]
#   eval "$(DETACH=1 bash scripts/serve_user_sim.sh)"     # start in the background, then export TAU2_USER_*
#
# Knobs (environment variables, defaults in brackets):
#   USER_SIM_MODEL     Hugging Face model folder                       [/root/Qwen3-4B-Instruct-2507]
#   SERVED_MODEL_NAME  model name clients send (TAU2_USER_MODEL)       [basename of USER_SIM_MODEL]
#   HOST / PORT        listen address                                  [127.0.0.1 / 30001]
#   SERVE_GPUS         GPU indices for the server (its CUDA_VISIBLE_DEVICES); keep them apart from training
#                                                                      [$CUDA_VISIBLE_DEVICES, else 0]
#   TP                 tensor parallel size                            [number of SERVE_GPUS]
#   MEM_FRACTION       sglang --mem-fraction-static                    [0.85]
#   CONTEXT_LENGTH     max context (empty = the model's)               [32768]
#   TOOL_CALL_PARSER   sglang --tool-call-parser; qwen25 for Qwen models, empty disables it (not for telecom) [qwen25]
#   DETACH             1 = run in the background, wait until it answers, print the exports on stdout [0]
#   LOG_FILE           server log when DETACH=1                        [/tmp/tau2_user_sim_${PORT}.log]
#   PID_FILE           server pid when DETACH=1 (stop: kill "$(cat PID_FILE)") [/tmp/tau2_user_sim_${PORT}.pid]
#   READY_TIMEOUT      seconds to wait for the server when DETACH=1    [900]
#   PYTHON             Python with sglang                              [python3]
#
# Then, in the shell that runs scripts/run_grpo.sh or scripts/run_eval.sh:
#   export TAU2_USER_KIND=llm TAU2_USER_MODEL=<SERVED_MODEL_NAME> TAU2_USER_BASE_URL=http://HOST:PORT/v1
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/sglang_server.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/sglang_server.sh"
parse_common_args "$@"

USER_SIM_MODEL="${USER_SIM_MODEL:-/root/Qwen3-4B-Instruct-2507}"
MODEL_PATH="$(abs_path "${USER_SIM_MODEL%/}")"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-$(basename "$MODEL_PATH")}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-30001}"
SERVE_GPUS="${SERVE_GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
TP="${TP:-$(printf '%s' "$SERVE_GPUS" | tr ',' '\n' | grep -c .)}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
CONTEXT_LENGTH="${CONTEXT_LENGTH-32768}"
TOOL_CALL_PARSER="${TOOL_CALL_PARSER-qwen25}"
DETACH="${DETACH:-0}"
LOG_FILE="${LOG_FILE:-/tmp/tau2_user_sim_${PORT}.log}"
PID_FILE="${PID_FILE:-/tmp/tau2_user_sim_${PORT}.pid}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"

print_ready_exports() {
  printf 'export TAU2_USER_KIND=llm\n'
  printf 'export TAU2_USER_MODEL=%q\n' "$SERVED_MODEL_NAME"
  printf 'export TAU2_USER_BASE_URL=%q\n' "http://$HOST:$PORT/v1"
}

check_sglang_inputs
if [[ -z "$TOOL_CALL_PARSER" ]]; then
  warn "TOOL_CALL_PARSER is empty: the user's device tool calls will come back as text (telecom needs them)"
fi
finish_input_checks
launch_sglang_server
