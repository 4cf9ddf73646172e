#!/usr/bin/env bash
# The CUDA path on one GPU (issue 19), in order, stopping at the first failure:
#   1. the CUDA tests (pytest -m cuda: solvers and their host syncs, gradients against the
#      unrolled reference, bf16/fp16/bf16_until/compile steps, GPU <-> CPU checkpoints,
#      torchrun, peak memory);
#   2. bench/solvers.py on the device against TorchDEQ, state 64 x 64 x 32 x 32;
#   3. the default and Shakespeare recipes for a fixed number of steps in fp32, bf16 and
#      with bf16_until: ms/step and samples/s;
# then one summary table with the card's name. About 8 minutes on an H100-class card.
#
#   bash bench/gpu.sh                 # installs with the README's command if .venv is missing
#   STEPS=100 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev,bench]'; }
py=.venv/bin/python
out="${OUT:-$(mktemp -d)}"
steps="${STEPS:-60}"
card="$($py -c 'import torch; print(torch.cuda.get_device_name(0))')"
echo "== $card; results in $out"

echo "== 1. CUDA tests"
$py -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py | tee "$out/cuda-tests.txt"

echo "== 2. solvers, train step and memory against TorchDEQ"
DEQ_BENCH_CHANNELS=64 DEQ_BENCH_SIZE=32 $py bench/solvers.py --device cuda --batch 64 \
    --threads 0 | tee "$out/solvers.txt"

echo "== 3. recipes, $steps steps each"
run() {   # name recipe precision-overrides...
    local name=$1 recipe=$2; shift 2
    $py -m deqctl train "$recipe" runtime.device=cuda "train.max_steps=$steps" \
        "train.log_every=$((steps / 3))" "$@" --out "$out/$name" --plain > "$out/$name.log"
}
for recipe in mnist:configs/mnist-deq.yaml shakespeare:configs/shakespeare-deq.yaml; do
    name=${recipe%%:*}; path=${recipe#*:}
    run "$name-fp32" "$path"
    run "$name-bf16" "$path" runtime.precision=bf16
    run "$name-bf16_until" "$path" deq.forward.bf16_until=1e-2
done

echo "== summary ($card)"
$py - "$out" "$card" <<'PY'
import json, sys
from pathlib import Path
out, card = Path(sys.argv[1]), sys.argv[2]
print(f"| {card} | ms/step | samples/s | test loss | test metric |")
print("|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"][-1]
    ms = 1000 * (tr[-1]["wall_s"] - tr[0]["wall_s"]) / (tr[-1]["step"] - tr[0]["step"])
    metric = test.get("accuracy", test.get("bpc"))
    print(f"| {run.name} | {ms:.1f} | {tr[-1]['samples_per_s']:.0f} | {test['loss']:.4f} | "
          f"{metric:.4f} |")
PY
grep -E "ratio|PASS|MISS" "$out/solvers.txt" || true
