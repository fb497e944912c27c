# shellcheck shell=bash
# Megatron architecture flags for Qwen3-4B-Instruct-2507 (the same values as slime's scripts/models file).
# Source it, then pass "${MODEL_ARGS[@]}" to slime's train.py / train_async.py and to the converters in tools/.
# The Instruct-2507 release uses rotary base 5,000,000 (Qwen3-4B uses 1,000,000).

# shellcheck disable=SC2034 # read by the scripts that source this file
MODEL_ARGS=(
  --swiglu
  --num-layers 36
  --hidden-size 2560
  --ffn-hidden-size 9728
  --num-attention-heads 32
  --group-query-attention
  --num-query-groups 8
  --use-rotary-position-embeddings
  --disable-bias-linear
  --normalization RMSNorm
  --norm-epsilon 1e-6
  --rotary-base 5000000
  --vocab-size 151936
  --kv-channels 128
  --qk-layernorm
)
