#!/usr/bin/env bash
# Every GPU check in one short run, for a machine with one CUDA GPU (run from the repository root):
#   1. the CUDA tests (tests/test_cuda.py and the CUDA sampler test),
#   2. the benchmark suite on the GPU (meta-step grid against learn2learn, per-sample gradients, memory),
#   3. short MAML Omniglot 5w1s training runs on the paper preset, with the meta-step replayed as a CUDA graph
#      (train.cuda_graph=true) and eager, whose step times give the extrapolated time of the paper's 60,000
#      iterations,
#   4. distributed training's throughput on this GPU (scripts/benchmark_distributed.py; NCCL with 2 GPUs).
# Results go under $OUT (default gpu_out/): log.txt, pytest.txt, bench/results.{json,md}, bench/meta_step.png,
# train-cuda_graph.tar.gz, train-eager.tar.gz, distributed.json. Each stage has its own time limit, so one slow stage cannot eat the others' time.
#
# STAGES picks stages (default: environment tests benchmark training distributed). Two more, for a lease with a
# plan:
#   miniimagenet  the MAML mini-ImageNet 5w1s meta-step (synthetic data of the real shape): benchmark drivers and
#                 a short graphed training run for its per-iteration time (MINI_SECONDS); out: mini-bench/, mini-train.tar.gz
#   cells         table cells at their full schedule through scripts/reproduce.py with train.cuda_graph=true, one
#                 after another (CELLS="table:cell ...", CELL_SECONDS each at most, stopped with SIGINT, which saves
#                 a checkpoint to resume elsewhere); first a graphed and an eager run of the first CHECK_ITERATIONS
#                 of the first cell from the same seed, compared step by step. out: cells-check.txt, cell-<cell>.tar.gz
#                 (run folder with its checkpoints)
#
# Optional inputs (for a machine without internet and without this project installed; made here by
# scripts/prepare_gpu_bundle.sh):
#   .gpu/site/  extra pure-Python packages put first on PYTHONPATH (omegaconf, opacus, learn2learn's MAML)
#   .gpu/data/  a data root holding omniglot/images_background.zip and images_evaluation.zip
#
#   OUT=/tmp/gpu bash scripts/gpu_checks.sh
set -u
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -d .gpu/data ]] && export META_DATA_ROOT="${META_DATA_ROOT:-$PWD/.gpu/data}"
export META_CACHE_DIR="${META_CACHE_DIR:-/tmp/meta-cache}"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
stage() { printf '\n==== %s (%s) ====\n' "$1" "$(date -u +%T)" | tee -a "$LOG"; }
STAGES=" ${STAGES:-environment tests benchmark training distributed} "
want() { [[ "$STAGES" == *" $1 "* ]]; }

if want environment; then
stage "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '|',
torch.cuda.get_device_name(0), '| cudnn', torch.backends.cudnn.version(),
'| tf32 conv', torch.backends.cudnn.allow_tf32, '| tf32 matmul', torch.backends.cuda.matmul.allow_tf32)"
    "$PY" -c "import learn2learn, omegaconf; print('learn2learn', learn2learn.__version__, learn2learn.__file__)"
    "$PY" -c "from meta.data.omniglot import load_omniglot
for split in ('train', 'val', 'test'): print(split, len(load_omniglot(None, split).names), 'classes')"
} 2>&1 | tee -a "$LOG"
fi

if want tests; then
stage "CUDA tests"
timeout "${TEST_SECONDS:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_data.py::test_sampler_on_cuda" \
    2>&1 | tee "$OUT/pytest.txt" | tail -n 25 | tee -a "$LOG"
fi

if want benchmark; then
stage "benchmark"
# The per-task loops (loop, loop_autograd) take 0.1-2.6 s per meta-step on a GPU, 1.1-1.6x learn2learn's time
# (experiments/benchmarks/h100); leaving them out lets the whole grid fit in a few minutes (set DRIVERS= for all).
# BENCH_ONLY picks settings (benchmark.py --only), BENCH_ARGS adds flags (e.g. --skip-memory).
timeout "${BENCH_SECONDS:-240}" "$PY" scripts/benchmark.py --device cuda --repeats 3 --out "$OUT/bench" \
    --drivers "${DRIVERS-auto,vmap,vmap_autograd,functorch,vmap+cudagraph,learn2learn}" \
    ${BENCH_ONLY:+--only "$BENCH_ONLY"} ${BENCH_ARGS:-} \
    2>&1 | tee -a "$LOG"
fi

train() {  # train NAME SECONDS ITERATIONS [key=value ...]: a paper-preset run, its log lines and files
    local name=$1 seconds=$2 iterations=$3 run=/tmp/gpu-train-$1
    shift 3
    stage "training ($name): MAML Omniglot 5w1s, paper preset, $iterations iterations $*"
    rm -rf "$run"
    timeout -s INT "$seconds" "$PY" scripts/train_maml.py preset=maml_omniglot_5w1s device=cuda \
        train.iterations="$iterations" train.val_every=1000 train.checkpoint_every=1000 out_dir="$run" "$@" \
        2>&1 | tr '\r' '\n' | grep -vP '^\s*\d+%\|' | tee -a "$LOG"
    tail -n 3 "$run/metrics.jsonl" 2>/dev/null | tee -a "$LOG"
    tar czf "$OUT/train-$name.tar.gz" -C "$run" --exclude='*.pt' . 2>/dev/null
}
if want training; then
# the meta-step replayed as a CUDA graph, then the eager step for the same-machine ratio of steps per second
train cuda_graph "${TRAIN_SECONDS:-100}" "${TRAIN_ITERATIONS:-3000}" train.cuda_graph=true driver=vmap_autograd
train eager "${EAGER_SECONDS:-60}" "${EAGER_ITERATIONS:-1000}"
fi

if want miniimagenet; then
stage "mini-ImageNet 5w1s meta-step (synthetic data, 84x84x3)"
if [[ -f configs/maml_miniimagenet_5w1s.yaml ]]; then
    timeout "${MINI_BENCH_SECONDS:-90}" "$PY" scripts/benchmark.py --device cuda --repeats 3 --out "$OUT/mini-bench" \
        --only miniimagenet --drivers "${MINI_DRIVERS:-auto,vmap+cudagraph,learn2learn}" --skip-memory \
        ${MINI_BENCH_ARGS---no-tf32} 2>&1 | tee -a "$LOG"  # full float32, as training runs (config key tf32=false)
    run=/tmp/gpu-mini-train
    rm -rf "$run"
    timeout -s INT "${MINI_SECONDS:-60}" "$PY" scripts/train_maml.py preset=maml_miniimagenet_5w1s data.dataset=synthetic \
        device=cuda train.cuda_graph=true driver=vmap_autograd train.iterations="${MINI_ITERATIONS:-1000}" train.val_every=500 \
        train.checkpoint_every=500 eval.tasks=100 progress=false out_dir="$run" 2>&1 | tee -a "$LOG"
    tail -n 3 "$run/metrics.jsonl" 2>/dev/null | tee -a "$LOG"
    tar czf "$OUT/mini-train.tar.gz" -C "$run" --exclude='*.pt' . 2>/dev/null
else
    echo "no preset maml_miniimagenet_5w1s in this checkout: stage skipped" | tee -a "$LOG"
fi
fi

if want cells; then
stage "table cells at the full schedule, graphed: ${CELLS:=fomaml_omniglot:fomaml_5w1s}"
first=${CELLS%% *}
table=${first%%:*} cell=${first##*:}
preset=$("$PY" -c "from meta.experiments.tables import load_table
print(next(c.preset for c in load_table('experiments/tables/$table.yaml').cells if c.name == '$cell'))")
check() {  # check NAME [key=value ...]: the first CHECK_ITERATIONS of the first cell's preset, every step logged
    local name=$1; shift
    rm -rf "/tmp/gpu-check-$name"
    timeout -s INT 120 "$PY" scripts/train_maml.py preset="$preset" device=cuda driver=vmap_autograd \
        train.iterations="${CHECK_ITERATIONS:-200}" train.log_every=1 train.val_every=100000 eval.tasks=10 \
        progress=false out_dir="/tmp/gpu-check-$name" "$@" >/dev/null 2>&1
}
check graphed train.cuda_graph=true
check eager
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/cells-check.txt" | tee -a "$LOG"
import json
def losses(name):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"/tmp/gpu-check-{name}/metrics.jsonl"))
            if r.get("split") == "train"}
graphed, eager = losses("graphed"), losses("eager")
steps = sorted(set(graphed) & set(eager))
worst = max(abs(graphed[s] - eager[s]) / abs(eager[s]) for s in steps)
print(f"graphed vs eager training loss, steps {steps[0]}..{steps[-1]} ({len(steps)} logged steps, same seed, "
      f"driver vmap_autograd): largest relative difference {worst:.2e}")
for s in steps[:3] + steps[-3:]:
    print(f"  step {s}: graphed {graphed[s]:.8f} eager {eager[s]:.8f}")
PYEOF
for entry in $CELLS; do
    table=${entry%%:*} cell=${entry##*:}
    stage "cell $table/$cell: full schedule, train.cuda_graph=true (at most ${CELL_SECONDS:-330} s)"
    start=$(date +%s)
    timeout -s INT "${CELL_SECONDS:-330}" "$PY" scripts/reproduce.py "$table" --only "$cell" --out /tmp/gpu-cells \
        device=cuda train.cuda_graph=true driver=vmap_autograd progress=false 2>&1 | tee -a "$LOG"
    echo "cell $table/$cell: wall time $(( $(date +%s) - start )) s" | tee -a "$LOG"
    tail -n 2 "/tmp/gpu-cells/$cell/seed0/metrics.jsonl" 2>/dev/null | tee -a "$LOG"
    tar czf "$OUT/cell-$cell.tar.gz" -C /tmp/gpu-cells "$cell" 2>/dev/null
done
fi

if want distributed; then
stage "distributed (torchrun): tasks/s on 1 GPU, and on 2 with NCCL where the machine has 2"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
timeout "${DIST_SECONDS:-120}" "$PY" scripts/benchmark_distributed.py --configs "$([[ $GPUS -ge 2 ]] && echo 1x1,2x1 || echo 1x1)" \
    --repeats 2 --steps 30 --out "$OUT/distributed.json" device=cuda 2>&1 | tee -a "$LOG"
fi

stage "done"
