#!/usr/bin/env bash
# GPU check: what the CPU cannot show, measured on one CUDA GPU in one go (sized for an H200, < 8 min).
#
#   bash scripts/gpu_check.sh                      # on a GPU node, in the repo's environment
#   OUT=/some/dir bash scripts/gpu_check.sh        # results there (default ./gpu_check_out)
#   GPU_CHECK_ALLOW_CPU=1 bash scripts/gpu_check.sh   # the same script on CPU, tiny shapes (a dry run)
#
# 1. bench: python -m peft_lab.bench --model llama-1b-shape (Llama-3.2-1B's shape, random weights, no
#    download) --precision bf16 (frozen base bf16, trainable fp32) for lora, qlora (4-bit NF4, bf16
#    compute, method.paged_optimizer's default paged_adamw_32bit), hira and sparselora (its default
#    deep-band placement), interleaved as the bench does: per method step time, tokens/s, MFU (6N
#    convention, the device's dense bf16 peak: see peft_lab/bench.py), peak CUDA memory and dtypes;
#    QLoRA's peak memory against LoRA-bf16; SparseLoRA's paired speed-up over LoRA.
# 2. smoke: every method in conf/method/ (lora, qlora, hira, sparse, sparselora, full, head and the generic PEFT ones) through the real
#    train.py on the tiny model, experiment=smoke train.device=cuda train.max_steps=2 logger=none, each
#    into its own temp dir; pass = exit 0 and a completed metrics.json that ran on that device.
# Prints a summary block at the end; writes bench.json, bench.log, smoke.log, gpu_check.json and
# summary.txt (5 files) to $OUT or ./gpu_check_out. Exit 0 when everything passed, 1 when anything
# failed, 2 when no CUDA device is visible (and GPU_CHECK_ALLOW_CPU is not 1).
#
# Settings on the GPU: batch 8 x seq 1024 (8,192 tokens a step: enough to fill an H200 at 1B), 3 repeats
# of 3 warm-up + 10 timed steps per method, classification (SST-2's setting; SparseLoRA keeps only
# the pooled last token dense). GPU_CHECK_PEAK_TFLOPS=<n> gives MFU's peak for a GPU the table lacks;
# GPU_CHECK_BENCH_TIMEOUT / GPU_CHECK_SMOKE_TIMEOUT (seconds) change the limits below; PYTHON the interpreter.
#
# Time on one H200 (16 CPU cores), estimated; this script has not been run on a GPU yet:
# - preflight (nvidia-smi, torch's CUDA init): ~10 s (limits 30 s + 30 s).
# - bench, limit 290 s, expected ~150-230 s on a fresh machine:
#   imports ~8 s; the first build of the 1.24B random model on the CPU (fp32 init, ~5 GB written to the
#   peft_lab cache) ~30-60 s; 4 loads in bf16 (QLoRA quantising onto the GPU) ~5-10 s each; SparseLoRA's
#   rank-8 SVD estimators, computed on the CPU for all 16 layers (gate, up, q, k, v: 32 SVDs of
#   8192x2048, 16 of 2048x2048; 4.3 s and 2.2 s each on 2 cores here) ~60 s, cached on disk after;
#   timed part: at 40 % MFU a LoRA step is 6 x 1.24e9 x 8192 / (0.4 x 989e12) ~ 0.15 s, QLoRA ~2x that:
#   4 methods x 3 repeats x 13 steps ~ 30-40 s, plus ~1 s per block (optimizer, checkpoint) ~ 12 s.
# - smoke: 18 methods, 9 train.py processes at once (~8 s of imports each, tiny model, 2 steps,
#   evaluation), two waves of ~20-30 s; limit 60 s each.
# - worst case, every limit hit (each +10 s to kill): 60 + 300 + 2 x 70 + the summary (~1 s) = 8.3 min.
# On CPU (GPU_CHECK_ALLOW_CPU=1): --model tiny, batch 2 x seq 32, 2 repeats of 1 + 2 steps, the smoke
# one method after another, SparseLoRA with both tiny layers sparse (the deep band names none of 2);
# about 2 minutes on 2 cores. MFU is left out on CPU (no peak) unless GPU_CHECK_PEAK_TFLOPS is set.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
RESULTS=${OUT:-./gpu_check_out}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
# every method config the project ships (conf/method/*.yaml), so a new method is smoke-tested without editing this
mapfile -t METHODS_SMOKE < <(cd "$REPO/conf/method" && ls -1 -- *.yaml | sed 's/\.yaml$//' | sort)

die() {
  echo "gpu_check: $*" >&2
  exit 2
}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------ preflight: a CUDA device, or refuse
if [[ $ALLOW_CPU == 1 ]]; then
  echo "gpu_check: GPU_CHECK_ALLOW_CPU=1: a CPU dry run with tiny shapes (its figures mean nothing)"
  DEVICE=cpu MODEL=tiny BATCH=2 SEQ=32 WARMUP=1 STEPS=2 REPEATS=2 THREADS=1 SMOKE_JOBS=1 SMOKE_THREADS=1
  SPARSELORA="sparselora:method.mlp_sparsity=0-1:0.75"
else
  command -v nvidia-smi >/dev/null 2>&1 ||
    die "no CUDA device visible: nvidia-smi is not on PATH. Run this on a GPU node (e.g. srun --gres=gpu:1 bash scripts/gpu_check.sh), or set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run with tiny shapes."
  timeout 30 nvidia-smi -L ||
    die "no CUDA device visible: nvidia-smi -L failed (no driver, or no GPU given to this job). Run this on a GPU node, or set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run."
  # shellcheck disable=SC2016
  if ! timeout 30 "$PY" - <<'EOF'; then
import sys
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
print(f"device: {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
sys.exit(0 if torch.cuda.is_bf16_supported() else 1)
EOF
    die "no usable CUDA device for torch: torch.cuda.is_available() is false or the GPU has no bf16. Install a CUDA build of torch (pip install torch==2.13.0 from the CUDA index), check CUDA_VISIBLE_DEVICES, or set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run."
  fi
  DEVICE=cuda MODEL=llama-1b-shape BATCH=8 SEQ=1024 WARMUP=3 STEPS=10 REPEATS=3
  THREADS=$(nproc) SMOKE_JOBS=9 SMOKE_THREADS=1
  SPARSELORA=sparselora
fi
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-290}
SMOKE_TIMEOUT=${GPU_CHECK_SMOKE_TIMEOUT:-60}

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d -t gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
T0=$SECONDS

# ------------------------------------------------------------------ 1. bench (llama-1b-shape, bf16)
echo "gpu_check: [1/2] bench: $MODEL, lora qlora hira sparselora, bf16, batch $BATCH x seq $SEQ on $DEVICE (limit ${BENCH_TIMEOUT}s)"
bench_args=(--model "$MODEL" --methods "lora,qlora,hira,$SPARSELORA" --precision bf16 --device "$DEVICE"
  --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" --repeats "$REPEATS" --threads "$THREADS"
  --no-bare --no-memory --no-startup --out "$RESULTS/bench.json")
if [[ -n ${GPU_CHECK_PEAK_TFLOPS:-} ]]; then
  bench_args+=(--peak-tflops "$GPU_CHECK_PEAK_TFLOPS")
fi
rm -f "$RESULTS/bench.json"
set +e # the whole log to bench.log, its progress lines ([bench] ...) to the terminal
(cd "$WORK" && timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m peft_lab.bench "${bench_args[@]}") 2>&1 |
  tee "$RESULTS/bench.log" | grep --line-buffered '^\[bench\]'
bench_rc=${PIPESTATUS[0]}
set -e
bench_s=$((SECONDS - T0))
echo "gpu_check: bench exit $bench_rc after ${bench_s}s (log: $RESULTS/bench.log)"

# ------------------------------------------------------------------ 2. smoke: every method through train.py
echo "gpu_check: [2/2] smoke: ${METHODS_SMOKE[*]} through train.py, 2 steps on $DEVICE ($SMOKE_JOBS at a time, limit ${SMOKE_TIMEOUT}s each)"
smoke_one() {
  local m=$1 t=$SECONDS rc=0
  (cd "$WORK" && PEFT_LAB_THREADS=$SMOKE_THREADS timeout -k 10 "$SMOKE_TIMEOUT" "$PY" "$REPO/train.py" \
    "method=$m" experiment=smoke "train.device=$DEVICE" train.max_steps=2 logger=none \
    "hydra.run.dir=$WORK/smoke/$m") >"$WORK/smoke_$m.log" 2>&1 || rc=$?
  echo "$m $rc $((SECONDS - t))" >"$WORK/smoke_$m.rc"
  echo "gpu_check: smoke $m: exit $rc after $((SECONDS - t))s"
}
T1=$SECONDS
for m in "${METHODS_SMOKE[@]}"; do
  while (($(jobs -rp | wc -l) >= SMOKE_JOBS)); do
    wait -n || true
  done
  smoke_one "$m" &
done
wait || true
smoke_s=$((SECONDS - T1))
for m in "${METHODS_SMOKE[@]}"; do
  echo "===== smoke $m: $(cat "$WORK/smoke_$m.rc" 2>/dev/null || echo "$m ? ?") (method exit-code seconds)"
  tail -n 40 "$WORK/smoke_$m.log" 2>/dev/null || true
done >"$RESULTS/smoke.log"

# ------------------------------------------------------------------ summary
summary_rc=0
"$PY" - "$RESULTS" "$WORK" "$DEVICE" "$bench_rc" "$bench_s" "$smoke_s" "$ALLOW_CPU" "${METHODS_SMOKE[@]}" <<'EOF' ||
import json
import statistics
import sys
from pathlib import Path

results, work, device, bench_rc, bench_s, smoke_s, allow_cpu, *methods = sys.argv[1:]
results, work = Path(results), Path(work)
lines, failures = [], []
out = {"device": device, "cpu_dry_run": allow_cpu == "1", "bench_exit": int(bench_rc), "bench_s": int(bench_s),
       "smoke_s": int(smoke_s), "bench": None, "smoke": {}}


def fmt(v, spec, unit=""):
    return "–" if v is None else format(v, spec) + unit


def paired(num, den):  # bench's paired ratio: median over repeats of back-to-back block medians
    pairs = [a / b for a, b in zip(num["block_medians_s"], den["block_medians_s"]) if b]
    return statistics.median(pairs) if pairs else None


bench_file = results / "bench.json"
if bench_file.exists():
    b = json.loads(bench_file.read_text())
    res, st = b["results"], b["settings"]
    gpu = b["machine"].get("gpu", b["machine"].get("cpu", ""))
    lines.append(f"GPU check on {b['device']} ({gpu}; torch {b['machine']['torch']})"
                 + ("  -- CPU DRY RUN, figures mean nothing" if allow_cpu == "1" else ""))
    n = next((r["total_params"] for r in res.values() if r.get("total_params")), None)
    lines.append(f"bench: model {st['model']} (N = {fmt(n and n / 1e6, ',.1f', 'M')} parameters), {st['task']}, "
                 f"batch {st['batch']} x seq {st['seq']}, precision {st['precision']}, "
                 f"{st['repeats']} repeats of {st['warmup']} + {st['steps']} steps, {bench_s} s")
    lines.append(f"  MFU = 6 N tokens/s / peak; peak: {b.get('peak_flops_source')}")
    lines.append(f"  {'method':<12} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'peak MiB':>9}  weights / compute / trainable")
    for label, r in res.items():
        name = r["method"] if r["method"] == "sparselora" else label
        if r["error"] or not r["step_s"]:
            failures.append(f"bench {label}: {r['error'] or 'no timing'}")
            lines.append(f"  {name:<12} FAILED: {r['error'][:200]}")
            continue
        dt = " / ".join(str(r.get(k)) for k in ("weight_dtype", "compute_dtype", "trainable_dtype"))
        lines.append(f"  {name:<12} {1000 * r['step_s']:>9.1f} {r['tokens_per_s']:>10,.0f} "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f', ' %'):>7} {fmt(r['peak_memory_mib'], ',.0f'):>9}  {dt}")
    lora = res.get("lora") if res.get("lora", {}).get("step_s") else None
    qlora = next((r for r in res.values() if r["method"] == "qlora" and r["step_s"]), None)
    sparse = next((r for r in res.values() if r["method"] == "sparselora" and r["step_s"]), None)
    mem = None
    if lora and qlora and lora["peak_memory_mib"] and qlora["peak_memory_mib"]:
        mem = qlora["peak_memory_mib"] / lora["peak_memory_mib"]
        lines.append(f"  QLoRA peak memory vs LoRA ({lora['weight_dtype']} base): {mem:.2f}x "
                     f"({qlora['peak_memory_mib']:,.0f} / {lora['peak_memory_mib']:,.0f} MiB)")
    else:
        lines.append("  QLoRA peak memory vs LoRA: not measured" + (" (CPU dry run: --no-memory)" if allow_cpu == "1" else ""))
    if qlora:
        q = qlora["method_metrics"].get("quant_linear_bytes_ratio_vs_bf16")
        lines.append(f"  QLoRA 4-bit linear bytes vs bf16: {fmt(q, '.3f', 'x')}; optimizer on {device}: "
                     + ("paged_adamw_32bit (method.paged_optimizer)" if device.startswith("cuda") else "torch AdamW (CPU fallback)"))
    speed = paired(lora, sparse) if lora and sparse else None
    if sparse:
        skipped = sparse["method_metrics"].get("sparselora_flops_skipped")
        lines.append(f"  SparseLoRA speed-up over LoRA (paired, per step): {fmt(speed, '.2f', 'x')} "
                     f"(base FLOPs skipped {fmt(skipped and 100 * skipped, '.0f', ' %')}; README goal 1.6x on a ~1B shape)")
        for w in sparse.get("warnings", []):
            lines.append(f"    warning: {w[:200]}")
    out["bench"] = {
        "settings": st, "peak_flops": b.get("peak_flops"), "peak_flops_source": b.get("peak_flops_source"),
        "methods": {label: {k: r.get(k) for k in ("method", "step_s", "tokens_per_s", "mfu", "peak_memory_mib",
                                                   "weight_dtype", "compute_dtype", "trainable_dtype", "total_params",
                                                   "error")} for label, r in res.items()},
        "qlora_peak_memory_vs_lora": mem, "sparselora_speedup_vs_lora": speed,
    }
else:
    lines.append(f"bench: no bench.json (exit {bench_rc}{', timed out' if bench_rc in ('124', '137') else ''}): see bench.log")
if bench_rc != "0":
    failures.append(f"bench exit {bench_rc}" + (" (timed out)" if bench_rc in ("124", "137") else ""))

lines.append(f"smoke: train.py experiment=smoke train.max_steps=2 logger=none on {device}, {smoke_s} s")
for m in methods:
    rc_file = work / f"smoke_{m}.rc"
    _, rc, secs = rc_file.read_text().split() if rc_file.exists() else (m, "?", "?")
    rec_file = work / "smoke" / m / "metrics.json"
    rec = json.loads(rec_file.read_text()) if rec_file.exists() else {}
    ran_on = str(rec.get("device") or "")
    ok = rc == "0" and rec.get("status") == "completed" and ran_on.startswith(device) and rec.get("steps") == 2
    why = "" if ok else (f"exit {rc}" + (" (timed out)" if rc in ("124", "137") else "")
                         + f", status {rec.get('status')}, device {ran_on or '?'}, steps {rec.get('steps')}")
    if not ok:
        failures.append(f"smoke {m}: {why}")
    out["smoke"][m] = {"ok": ok, "exit": rc, "seconds": secs, "status": rec.get("status"), "device": ran_on or None,
                       "steps": rec.get("steps"), "dtypes": [rec.get("weight_dtype"), rec.get("compute_dtype"),
                                                             rec.get("trainable_dtype")]}
    lines.append(f"  {m:<12} {'PASS' if ok else 'FAIL'}  {secs:>4} s  "
                 + (f"{rec.get('weight_dtype')} / {rec.get('compute_dtype')} / {rec.get('trainable_dtype')}" if ok else why))
out["failures"] = failures
out["ok"] = not failures
lines.append("RESULT: " + ("PASS" if not failures else f"FAIL ({len(failures)}): " + "; ".join(failures)))
text = "\n".join(lines)
bar = "=" * 100
print(f"\n{bar}\n{text}\n{bar}")
(results / "summary.txt").write_text(text + "\n")
(results / "gpu_check.json").write_text(json.dumps(out, indent=1) + "\n")
sys.exit(0 if not failures else 1)
EOF
  summary_rc=$?
echo "gpu_check: results in $RESULTS (summary.txt, gpu_check.json, bench.json, bench.log, smoke.log); $((SECONDS - T0)) s"
exit "$summary_rc"
