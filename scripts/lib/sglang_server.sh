# shellcheck shell=bash
# Start an sglang OpenAI-compatible server (python -m sglang.launch_server) for scripts/serve_user_sim.sh and
# scripts/serve_policy.sh. Source after lib/common.sh, set the globals below, then call launch_sglang_server.
#
# Globals read: MODEL_PATH, SERVED_MODEL_NAME, HOST, PORT, SERVE_GPUS, TP, MEM_FRACTION, CONTEXT_LENGTH,
# TOOL_CALL_PARSER, DETACH, LOG_FILE, PID_FILE, READY_TIMEOUT, and PASSTHROUGH_ARGS (extra sglang flags).
# Function read: print_ready_exports (defined by the calling script; prints what to export once the server is up).

check_sglang_inputs() {
  check_hf_dir "$MODEL_PATH" "model" \
    "Download or convert it first (hf download Qwen/Qwen3-4B-Instruct-2507 --local-dir /root/Qwen3-4B-Instruct-2507, or scripts/convert_megatron_to_hf.sh)"
  if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("sglang") is None)' 2>/dev/null; then
    input_problem "sglang is not importable by $PYTHON; run this inside slime's container (or set PYTHON)"
  fi
  [[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$PORT'"
  check_positive_int TP "$TP"
  check_positive_int READY_TIMEOUT "$READY_TIMEOUT"
  check_flag01 DETACH "$DETACH"
  require_gpu_ids "$SERVE_GPUS" "sglang on SERVE_GPUS"
  local listed
  listed="$(printf '%s' "$SERVE_GPUS" | tr ',' '\n' | grep -c . || true)"
  if ((listed < TP)); then
    input_problem "TP=$TP needs $TP GPU(s) but SERVE_GPUS='$SERVE_GPUS' lists $listed"
  fi
  if ! is_dry_run && http_ok "http://$HOST:$PORT/v1/models"; then
    input_problem "a server already answers at http://$HOST:$PORT; stop it or choose another PORT"
  fi
}

sglang_command() {
  SGLANG_CMD=(
    env "CUDA_VISIBLE_DEVICES=$SERVE_GPUS"
    "$PYTHON" -m sglang.launch_server
    --model-path "$MODEL_PATH"
    --served-model-name "$SERVED_MODEL_NAME"
    --host "$HOST"
    --port "$PORT"
    --tp-size "$TP"
    --mem-fraction-static "$MEM_FRACTION"
  )
  if [[ -n "$CONTEXT_LENGTH" ]]; then
    SGLANG_CMD+=(--context-length "$CONTEXT_LENGTH")
  fi
  if [[ -n "$TOOL_CALL_PARSER" ]]; then
    SGLANG_CMD+=(--tool-call-parser "$TOOL_CALL_PARSER")
  fi
  SGLANG_CMD+=("${PASSTHROUGH_ARGS[@]}")
}

launch_sglang_server() {
  sglang_command
  if is_dry_run; then
    run_cmd "${SGLANG_CMD[@]}"
    if [[ "$DETACH" == 1 ]]; then
      log "DETACH=1: a real run starts it in the background (log $LOG_FILE, pid in $PID_FILE) and waits until it answers"
    fi
    log "once it is up, export:"
    print_ready_exports >&2
    return 0
  fi
  if [[ "$DETACH" != 1 ]]; then
    log "once the server logs 'The server is fired up', export in the shell that trains or evaluates:"
    print_ready_exports >&2
    run_cmd "${SGLANG_CMD[@]}"
    return $?
  fi
  mkdir -p "$(dirname "$LOG_FILE")"
  log "+ $(format_cmd "${SGLANG_CMD[@]}") >$LOG_FILE 2>&1 &"
  nohup "${SGLANG_CMD[@]}" >"$LOG_FILE" 2>&1 &
  local pid=$! waited=0
  printf '%s\n' "$pid" >"$PID_FILE"
  log "started pid $pid; waiting up to ${READY_TIMEOUT}s for http://$HOST:$PORT/v1/models"
  until http_ok "http://$HOST:$PORT/v1/models"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$LOG_FILE" >&2 || true
      die "the server exited during start-up; its log is $LOG_FILE (last lines above)"
    fi
    if ((waited >= READY_TIMEOUT)); then
      die "the server (pid $pid) did not answer within ${READY_TIMEOUT}s; see $LOG_FILE, stop it with: kill \$(cat $PID_FILE)"
    fi
    sleep 2
    waited=$((waited + 2))
  done
  log "ready after ~${waited}s (pid $pid in $PID_FILE, log $LOG_FILE; stop it with: kill \$(cat $PID_FILE))"
  # stdout carries only the exports, so `eval "$(DETACH=1 bash scripts/serve_....sh)"` works
  print_ready_exports
}
