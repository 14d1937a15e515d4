#!/usr/bin/env bash
# The embedded demo's training and evaluation on GPUs: bf16 mixed precision, DDP over every visible GPU
# (configs/trainer/ddp.yaml), the seconds of each stage, and the combined table at the end.
# It needs the synthetic data, the pretrained vision tower and the exported tiny model under outputs/shapes/
# (the first three steps of `make demo`; a CPU does them in about 4 minutes) and writes everything else under OUT.
#   bash benchmarks/gpu_demo.sh [OUT]          (default OUT: outputs/gpu_demo)
# PYTHON, ACCELERATOR (gpu), PRECISION (bf16-mixed) and EXTRA (more flags for every command) override.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_demo}
PY=${PYTHON:-python}
read -r -a EXTRA <<< "${EXTRA:-}"
RUN=(--trainer.accelerator "${ACCELERATOR:-gpu}" --trainer.precision "${PRECISION:-bf16-mixed}"
     --trainer.logger false)
F0="$OUT/base/hf_model"
declare -A SECONDS_OF

stage() {  # stage NAME COMMAND...: run it, keep its log, time it
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1 || { tail -n 40 "$OUT/$name.log"; echo "== $name failed"; exit 1; }
    SECONDS_OF[$name]=$((SECONDS - start))
    echo "== $name: ${SECONDS_OF[$name]} s"
}

mkdir -p "$OUT"
begin=$SECONDS
stage base "$PY" main.py fit -c configs/shapes/base.yaml -c configs/trainer/ddp.yaml "${RUN[@]}" \
    --trainer.default_root_dir "$OUT/base" "${EXTRA[@]}"
stage predict "$PY" main.py predict -c configs/shapes/base.yaml "${RUN[@]}" \
    --model.init_args.model.name_or_path "$F0" --data.init_args.predict_file train.jsonl \
    --data.init_args.predict_answerable false --model.init_args.output_dir "$OUT/base/train_predictions" \
    --trainer.default_root_dir "$OUT/base" "${EXTRA[@]}"
for objective in sft dpo; do
    args=(--trainer.default_root_dir "$OUT/$objective" --model.init_args.model.name_or_path "$F0")
    if [ "$objective" = dpo ]; then
        args+=(--data.init_args.rejected_predictions "$OUT/base/train_predictions/predictions.jsonl")
    fi
    stage "$objective" "$PY" main.py fit -c "configs/shapes/$objective.yaml" -c configs/trainer/ddp.yaml \
        "${RUN[@]}" "${args[@]}" "${EXTRA[@]}"
done
for objective in sft dpo; do
    stage "test_$objective" "$PY" main.py test -c "configs/shapes/$objective.yaml" "${RUN[@]}" \
        --trainer.default_root_dir "$OUT/$objective" --model.init_args.model.name_or_path "$F0" \
        --ckpt_path "$OUT/$objective/checkpoints/last.ckpt" "${EXTRA[@]}"
done
"$PY" -m metrics.combine --out "$OUT/demo" --run "sft=$OUT/sft" --run "dpo=$OUT/dpo" --seconds $((SECONDS - begin))
for name in base predict sft dpo test_sft test_dpo; do echo "$name ${SECONDS_OF[$name]} s"; done
