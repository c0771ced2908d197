#!/usr/bin/env bash
# The GPU paths, run on a lent CUDA machine (see benchmarks/README or the device notes):
# doctor, a monitored training run, DDP and FSDP2 with world size 1 (NCCL), bench, and the
# test suite with CUDA present. Each step's full output goes to OUT_DIR/<step>.txt.
#
#     bash benchmarks/gpu_checks.sh OUT_DIR
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
lt=("$py" -m leantrain)

step() {  # step NAME LIMIT_S COMMAND...: run it, keep its output, show its end
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$out/$name.txt"
}

step machine 60 bash -c "nvidia-smi; $py -c 'import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())'"
step doctor 150 "${lt[@]}" doctor --out "$out/doctor" --no-progress
step train-monitored 120 "${lt[@]}" train --out "$out/train-monitored" --no-progress \
    --set train.monitor_interval_s=0.25
step ddp-world1 120 "${lt[@]}" launch --nproc 1 -- train --out "$out/ddp-world1" --no-progress \
    --set plan.distributed=ddp
step fsdp-world1 120 "${lt[@]}" launch --nproc 1 -- train --out "$out/fsdp-world1" --no-progress \
    --set plan.distributed=fsdp
step bench 200 "${lt[@]}" bench --budget-s 120 --out "$out/bench" --no-progress
# compression (torch-pruning, torchao) is CPU work and its packages are not on the GPU image
# the default (fast) suite: the slow ones launch 2 ranks, which want 2 GPUs once CUDA is seen
TAIL=30 step tests 240 "$py" -m pytest -q -p no:cacheprovider -n 8 \
    --ignore tests/test_prune.py --ignore tests/test_quantize.py \
    --ignore tests/test_compress_cli.py tests
