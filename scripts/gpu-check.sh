#!/usr/bin/env bash
# The one-call GPU check: everything is built and packed here, then one `run` call on the lent
# H100/H200 runs the golden tests on cuda, a tiny `dpo train` on cuda, the Llama-2-7B-shape
# LoRA-DPO step (random weights made on the device) and PyTorch + peft at the same shape, and
# writes every result as JSON under $OUT.
#
#   scripts/gpu-check.sh pack [--cpu]     here: build (the cuda feature, or plain CPU builds for the
#                                         rehearsal), strip and xz the test, bench and dpo binaries
#                                         into .gpu-check/ (git-ignored; carry it)
#   scripts/gpu-check.sh device [--cpu]   there, from the repo root (device tool: carry [".gpu-check"],
#                                         timeout_s 600); --cpu rehearses the same steps here on tiny
#                                         shapes
#
# Device call:  bash scripts/gpu-check.sh device
# Shapes and limits: DPO_CHECK_STEPS (3), DPO_CHECK_TORCH (1: run bench_torch.py), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu-check
mode=${1:-}
cpu=0
[ "${2:-}" = "--cpu" ] && cpu=1

pack() {
  set -e
  local target bins=(device dpo_step)
  if [ $cpu = 1 ]; then
    target=target
    cargo build --release --tests --benches --quiet
  else
    target=target-cuda
    CARGO_TARGET_DIR=$PWD/$target bash ../shared/cuda/build-cuda.sh --tests --benches
  fi
  rm -rf "$PACK" && mkdir -p "$PACK"
  for b in "${bins[@]}"; do
    exe=$(ls -t "$target"/release/deps/"$b"-* | grep -v '\.d$' | head -1)
    strip -o "$PACK/$b" "$exe"
    xz -9 -T2 -f "$PACK/$b"
  done
  strip -o "$PACK/dpo" "$target/release/dpo"
  xz -9 -T2 -f "$PACK/dpo"
  cp ../shared/bench/bench_torch.py "$PACK/"
  [ $cpu = 1 ] && touch "$PACK/cpu-build"
  du -b "$PACK"/* | tee "$PACK/sizes.txt"
  total=$(du -cb "$PACK" | tail -1 | cut -f1)
  echo "packed $total bytes into $PACK"
  [ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "pack exceeds 60 MiB: the device tool carries 64 MiB in all" >&2; exit 1; }
}

device() {
  # Results gather in $work; $OUT (the device tool brings back at most 8 files) gets two:
  # summary.json (every JSON result, memory peaks, exit codes) and logs.txt.
  local final=${OUT:-$PWD/$PACK/out} out=/tmp/dpo-gpu-check-work bin=/tmp/dpo-gpu-check py=${PYTHON:-python3} steps=${DPO_CHECK_STEPS:-3}
  rm -rf "$out" && mkdir -p "$out" "$bin" "$final"
  local start=$SECONDS
  for b in device dpo_step dpo; do
    "$py" -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$PACK/$b.xz" "$bin/$b"
    chmod +x "$bin/$b"
  done
  local dev=cuda
  if [ $cpu = 1 ]; then
    dev=cpu
  else
    NV=$("$py" -c 'import nvidia;print(list(nvidia.__path__)[0])' 2>/dev/null || true)
    export LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib "$NV"/cu13/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv > "$out/gpu.csv" 2>&1
    ldd "$bin/dpo" | grep -E 'not found' > "$out/missing_libs.txt" || true
  fi
  export DPO_FIXTURES=$PWD/tests/fixtures
  # Samples the device's used memory every 0.1 s while a command runs (peak in MiB to $1).
  sample() {
    local file=$1; shift
    if [ $cpu = 1 ]; then "$@"; return $?; fi
    (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.1; done) > "$file.samples" 2>/dev/null &
    local sampler=$!
    "$@"; local rc=$?
    kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
    sort -n "$file.samples" | tail -1 > "$file"
    return $rc
  }
  echo "== 1. golden tests on $dev"
  DPO_TEST_DEVICE=$dev DPO_TEST_REPORT="$out/golden.json" timeout 240 "$bin/device" --test-threads 1 > "$out/golden.log" 2>&1
  rc=$?; echo $rc > "$out/rc_golden.json"; echo "golden rc $rc"; tail -3 "$out/golden.log"
  echo "== 2. dpo train on $dev (tiny-llama, 10 steps)"
  timeout 120 "$bin/dpo" train --model tests/fixtures/models/tiny-llama --dataset tests/fixtures/data/orca_dpo_pairs/train.jsonl \
    --output-dir /tmp/dpo-gpu-check-run --overwrite-output-dir --device "$dev" --max-steps 10 --json > "$out/train.json" 2> "$out/train.log"
  rc=$?; echo $rc > "$out/rc_train.json"; echo "train rc $rc"; tail -2 "$out/train.log"
  echo "== 3. LoRA-DPO step at the Llama-2-7B shape ($dev)"
  if [ $cpu = 1 ]; then
    shape=(DPO_BENCH_HIDDEN=256 DPO_BENCH_LAYERS=2 DPO_BENCH_HEADS=4 DPO_BENCH_KV_HEADS=4 DPO_BENCH_INTERMEDIATE=688 DPO_BENCH_VOCAB=1000 DPO_BENCH_PROMPT_LEN=64 DPO_BENCH_RESPONSE_LEN=64 DPO_BENCH_PAIRS=4)
    tshape=(--hidden 256 --layers 2 --heads 4 --kv-heads 4 --intermediate 688 --vocab 1000 --prompt-len 64 --response-len 64 --pairs 4 --threads 2)
  else
    shape=(DPO_BENCH_HIDDEN=4096 DPO_BENCH_LAYERS=32 DPO_BENCH_HEADS=32 DPO_BENCH_KV_HEADS=32 DPO_BENCH_INTERMEDIATE=11008 DPO_BENCH_VOCAB=32000 DPO_BENCH_PROMPT_LEN=512 DPO_BENCH_RESPONSE_LEN=512 DPO_BENCH_PAIRS=4)
    tshape=(--hidden 4096 --layers 32 --heads 32 --kv-heads 32 --intermediate 11008 --vocab 32000 --prompt-len 512 --response-len 512 --pairs 4)
  fi
  sample "$out/dpo_step_peak_mib.txt" env "${shape[@]}" DPO_BENCH_DEVICE=$dev DPO_BENCH_DTYPE=bf16 DPO_BENCH_STEPS=$steps DPO_BENCH_WARMUP=1 \
    DPO_BENCH_OUT="$out/dpo_step.json" timeout 300 "$bin/dpo_step" > "$out/dpo_step.log" 2>&1
  rc=$?; echo $rc > "$out/rc_dpo_step.json"; echo "dpo_step rc $rc"; tail -3 "$out/dpo_step.log"
  if [ "${DPO_CHECK_TORCH:-1}" = 1 ]; then
    for gc in "" --grad-checkpointing; do
      name=torch${gc:+_gc}
      echo "== 4. PyTorch + peft $gc ($dev)"
      sample "$out/${name}_peak_mib.txt" timeout 240 "$py" "$PACK/bench_torch.py" --device "$dev" --dtype bf16 "${tshape[@]}" \
        --steps "$steps" --warmup 1 $gc --out "$out/$name.json" > "$out/$name.log" 2>&1
      rc=$?; echo $rc > "$out/rc_$name.json"; echo "$name rc $rc"; tail -2 "$out/$name.log"
    done
  fi
  echo "== done in $((SECONDS - start)) s"
  "$py" - "$out" "$final" <<'PY'
import glob, json, os, sys
work, final = sys.argv[1], sys.argv[2]
summary, logs = {}, []
for path in sorted(glob.glob(os.path.join(work, "*"))):
    name = os.path.basename(path)
    if name.endswith(".samples"):
        continue
    text = open(path, errors="replace").read()
    if name.endswith(".json"):
        try:
            summary[name[:-5]] = json.loads(text)
        except ValueError:
            summary[name[:-5]] = {"unreadable": text[-2000:]}
    elif name.endswith("_peak_mib.txt"):
        summary[name[:-4]] = float(text.strip() or "nan")
    else:
        logs.append(f"===== {name}\n{text[-20000:]}")
json.dump(summary, open(os.path.join(final, "summary.json"), "w"), indent=1)
open(os.path.join(final, "logs.txt"), "w").write("\n".join(logs))
print("wrote", os.path.join(final, "summary.json"), "and logs.txt")
PY
}

case "$mode" in
  pack) pack ;;
  device) device ;;
  *) echo "usage: scripts/gpu-check.sh pack|device [--cpu]" >&2; exit 2 ;;
esac
