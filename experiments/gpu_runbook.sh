#!/usr/bin/env bash
# The GPU measurements of issues 3, 4 and 5, in phases that each fit one 10-minute device call.
#
# Once, on the development machine (wheels of what the GPU image lacks into .whl/, the CIFAR-10
# subset into .data/; both git-ignored, never committed):
#   bash experiments/gpu_runbook.sh prepare
# Then one device call per phase, with carry [".whl", ".data"]; results and logs go to $OUT:
#   bash experiments/gpu_runbook.sh bench   # issue 4: images/s, compile time, memory, ms/sampling step
#   bash experiments/gpu_runbook.sh curve   # issue 4: test bpd vs training seconds; bf16 vs fp32 bpd
#   bash experiments/gpu_runbook.sh model   # issues 3, 5: vdm.main train + eval, likelihood, schedule
#   bash experiments/gpu_runbook.sh sweep   # issue 4: variants of the step side by side, with
#                                           # kernel time by kind, ceilings and the optimised HLO
#   bash experiments/gpu_runbook.sh lease   # issue 4 in one call: the norms checked and timed
#                                           # alone, then the curve with the fastest one
#   bash experiments/gpu_runbook.sh compare # the lease's bf16-vs-fp32 figure, where its limit
#                                           # cut it (same warm machine)
# Every phase trains what it needs (a fresh device machine keeps nothing between calls) and
# writes fewer than the 8 files a call returns. Each command has its own time limit, so one that
# fails or overruns leaves the others' results.
# Overrides for a smoke run on any machine: VDM_CONFIG, VDM_DATA_ARGS, VDM_SECONDS, VDM_STEPS,
# VDM_ARGS (extra --config.* flags for every command), VDM_LIMIT (the seconds a phase may take),
# VDM_SPECS (the bench's), VDM_VARIANTS, VDM_BATCH and VDM_SWEEP_ARGS (the sweep's variants,
# batch size and measurements before them, experiments/speed_sweep.py), PYTHON, and
# VDM_TMP (where the runs, the compile cache and the wheels go; /tmp by default; a warm device
# machine keeps it between calls).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
CONFIG=${VDM_CONFIG:-configs/cifar10.py}
DATA_ARGS=${VDM_DATA_ARGS---config.data.source=npz --config.data.path=.data/cifar10_subset.npz}
TRAIN_SECONDS=${VDM_SECONDS:-330}
STEPS=${VDM_STEPS:-400}
LIMIT=${VDM_LIMIT:-570}
TMP=${VDM_TMP:-/tmp}
OUT=${OUT:-$TMP/vdm_runbook}
# Words of every line (read -a alone keeps the first line's: a VDM_ARGS pasted across two lines
# lost its second in silence); read exits 1 at the end of its input, as -d '' always does.
read -r -d '' -a EXTRA <<< "${VDM_ARGS:-}"
read -r -d '' -a DATA <<< "$DATA_ARGS"

run() {  # run LOG LIMIT_S CMD...: CMD's output appended to $OUT/LOG.log and the console
  local log=$OUT/$1.log limit=$2; shift 2
  echo "== $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

cache() {  # A warm machine keeps $TMP between calls: a program compiled by an earlier command
  # loads from here. Not for bench and sweep, whose compile times would become cache loads.
  export JAX_COMPILATION_CACHE_DIR="$TMP/jax_cache"
}

curve() {  # curve LIMIT_S [--config.* ...]: the 330 s curve (model.dtype bf16), then the final
  # parameters' bound in fp32 beside it; the run's checkpoint stays in $TMP for the model and
  # compare phases.
  local limit=$1; shift
  rm -rf "$TMP/vdm_curve_run"  # train_curve.py refuses a workdir that holds checkpoints
  run curve_bf16 "$limit" "$PY" experiments/train_curve.py --config="$CONFIG" \
    "${DATA[@]}" "${EXTRA[@]}" "$@" --config.model.dtype=bfloat16 --seconds="$TRAIN_SECONDS" \
    --compare_dtype=float32 --compare_batch_size=113 --output="$OUT/curve_bf16.json" \
    --workdir="$TMP/vdm_curve_run"
}

json_field() {  # json_field FILE KEY...: the value at FILE's nested KEYs (a list's by index);
  # fails, silently, if none
  "$PY" -c 'import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
  value = value[int(key) if isinstance(value, list) else key]
print(value)' "$@" 2> /dev/null
}

setup() {
  mkdir -p "$OUT"
  unset JAX_COMPILATION_CACHE_DIR  # a caller's cache too: only cache() sets one
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$TMP/site" .whl/*.whl || exit 1
    export PYTHONPATH="$TMP/site"${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1
  # The commit every JSON records (vdm.logging_utils.provenance): prepare's, else this checkout's.
  VDM_COMMIT=${VDM_COMMIT:-$(cat .data/COMMIT 2> /dev/null || git describe --always --dirty)}
  export VDM_COMMIT
  { date -u +%FT%TZ; echo "commit: $VDM_COMMIT";
    nvidia-smi -L 2>/dev/null; "$PY" -c "import jax; from importlib import metadata as m
print('jax', jax.__version__, jax.devices())
print(*(f'{p}=={m.version(p)}' for p in ('jaxlib', 'flax', 'optax', 'orbax-checkpoint',
      'equinox', 'ml-collections')), '(installed versions)')"
  } | tee -a "$OUT/machine.txt"  # appended: a phase that runs after another keeps its lines
}

case "${1:-}" in
  prepare)
    mkdir -p .whl .data
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl ml-collections==1.1.0 tensorboardX==2.6.5
    cp ../shared/data/cifar10_subset.npz .data/
    # The device's copy of the tree has no current git history: the results name this commit.
    git describe --always --dirty > .data/COMMIT
    ls -l .whl .data; cat .data/COMMIT
    ;;
  bench)
    setup
    LEFT=$LIMIT
    # VDM_SPECS: "batch dtype remat residual_dtype unroll [norm_impl]" per benchmark,
    # ';'-separated (norm_impl: the config's when left out). By
    # default, in order of need: cifar10_bf16's setting, the same at batch 512, batch 512 with
    # the scan and remat (measured to fit), and the fp32 step (which needs remat at batch 128).
    # Variants of one step side by side: the sweep phase.
    IFS=';' read -r -a SPECS <<< "${VDM_SPECS:-128 bfloat16 none bfloat16 0;512 bfloat16 none bfloat16 0;512 bfloat16 convs float32 4;128 float32 convs float32 4}"
    for spec in "${SPECS[@]}"; do
      read -r batch dtype remat residual unroll norm <<< "$spec"
      name=bench_${dtype}_${batch}_${remat}_${residual}_unroll${unroll}${norm:+_$norm}
      start=$SECONDS
      run bench $((LEFT > 240 ? 240 : LEFT)) "$PY" -m vdm.benchmark --config="$CONFIG" "${EXTRA[@]}" \
        --config.model.residual_dtype="$residual" --config.model.unroll="$unroll" \
        ${norm:+--config.model.norm_impl="$norm"} \
        --batch_size="$batch" --dtype="$dtype" \
        --remat="$remat" --repeats=10 --profile --json_out="$OUT/$name.json"
      LEFT=$((LEFT - SECONDS + start))
      [ "$LEFT" -gt 30 ] || break
    done
    ;;
  curve)
    setup; cache
    curve $((LIMIT - 30))
    ;;
  lease)
    # A 15-minute device lease holds one full call (600 s at most, after a start of a minute or
    # more) and a short one on the still-warm machine. This is the full one: each way of
    # computing the norm timed alone, with the check that Triton's kernels compute autodiff's
    # function (experiments/speed_sweep.py --norms), then the curve of $VDM_CONFIG (the caller
    # names configs/cifar10_bf16.py) with the fastest way that passed. No compilation cache, so
    # the curve's compile_seconds is a cold compile. A time limit that cuts the curve keeps its
    # marks so far; the fp32 comparison comes last. VDM_LIMIT: the phase's seconds, its setup
    # included (590 under a call's 600 s limit); the curve gets what the norms left.
    start=$SECONDS
    setup
    run norms 90 "$PY" experiments/speed_sweep.py --config="$CONFIG" "${EXTRA[@]}" \
      --batch_size="${VDM_BATCH:-128}" --norms --variants= --output="$OUT/norms.json"
    norm=$(json_field "$OUT/norms.json" fastest_norm) || norm=autodiff  # the default, if the
    # norms did not run
    echo "norm_impl for the curve: $norm" | tee -a "$OUT/machine.txt"
    curve $((LIMIT - (SECONDS - start) - 5)) --config.model.norm_impl="$norm"
    # The norms are checked in bf16 at the training batch; evaluation also runs them in fp32
    # (model.eval_fp32_fraction). A curve that saved no point with a Pallas way trains again
    # with autodiff's, in what time is left (its compare then reads autodiff from the run).
    left=$((LIMIT - (SECONDS - start) - 5))
    if [ "$norm" != autodiff ] && ! json_field "$OUT/curve_bf16.json" points 0 > /dev/null &&
        [ "$left" -gt 60 ]; then
      echo "no curve point with norm_impl=$norm: the curve again with autodiff" |
        tee -a "$OUT/machine.txt"
      curve "$left" --config.model.norm_impl=autodiff
    fi
    ;;
  compare)
    # The last figure of the lease's curve, bf16 against fp32 on the whole test split with shared
    # draws, from the final parameters that the curve left in $TMP (on the still-warm machine),
    # computed with the norm the curve trained with (the run's config.json).
    run_config="$TMP/vdm_curve_run/config.json"
    norm=$(json_field "$run_config" model norm_impl) || {
      echo "no curve run at $run_config: run the lease phase first" >&2; exit 2; }
    setup; cache
    run compare "$LIMIT" "$PY" experiments/likelihood.py --config="$CONFIG" "${DATA[@]}" \
      "${EXTRA[@]}" --config.model.dtype=bfloat16 --config.model.norm_impl="$norm" \
      --workdir="$TMP/vdm_curve_run" --noema --num_images=0 --batch_size=113 --timesteps= \
      --compare_dtype=float32 --noimportance --ode_num_images=0 --output="$OUT/compare.json"
    ;;
  model)
    setup; cache
    rm -rf "$TMP/vdm_main_run"  # else vdm.main resumes an old run
    # A short run of the paper's config (fp32): EMA 0.99, since 0.9999 would still sit near
    # the initial parameters; a checkpoint half-way in case the time limit stops it.
    run main_train $((LIMIT * 3 / 8)) "$PY" -m vdm.main --config="$CONFIG" "${DATA[@]}" "${EXTRA[@]}" \
      --workdir="$TMP/vdm_main_run" --config.training.num_steps="$STEPS" --config.optimizer.ema_rate=0.99 \
      --config.training.eval_every="$STEPS" --config.training.sample_every="$STEPS" \
      --config.training.checkpoint_every=$((STEPS / 2)) --config.sampling.num_steps=100
    cp "$TMP/vdm_main_run/train_eval.json" "$OUT/main_train_eval.json" 2>/dev/null
    # The likelihood runs take the curve phase's model (330 s of training) where this machine
    # still holds it (its raw parameters, as the curve evaluates them), else this phase's short run.
    RUN="$TMP/vdm_main_run" EMA=--ema
    [ -f "$TMP/vdm_curve_run/config.json" ] && RUN="$TMP/vdm_curve_run" EMA=--noema
    echo "likelihood model: $RUN" | tee -a "$OUT/machine.txt"
    # 1,017 test images = 9 batches of 113: no ragged last batch to compile again.
    run likelihood $((LIMIT * 3 / 8)) "$PY" experiments/likelihood.py --config="$CONFIG" \
      "${DATA[@]}" "${EXTRA[@]}" --workdir="$RUN" "$EMA" --num_images=0 --batch_size=113 \
      --variance_repeats=50 --ode_num_images=16 --ode_batch_size=16 --dequantization=uniform \
      --output="$OUT/likelihood.json"
    run schedule_variance $((LIMIT / 4)) "$PY" experiments/schedule_variance.py --config="$CONFIG" \
      "${DATA[@]}" "${EXTRA[@]}" --workdir="$RUN" "$EMA" --fit_steps=300 --draws=128 \
      --output="$OUT/schedule_variance.json"
    ;;
  sweep)
    setup
    # --norms first times each way of computing one GroupNorm + swish alone and checks that the
    # Pallas kernels compute the same function as autodiff on this GPU; --convs times the norm
    # and the convolution that reads it, cuDNN against the Pallas convolution that applies the
    # norm as it loads (vdm.pallas_conv), and checks that it computes XLA's function.
    # VDM_SWEEP_ARGS= leaves these three out, for a call that times only variants.
    read -r -d '' -a FIRST <<< "${VDM_SWEEP_ARGS---floors --norms --convs}"
    run sweep $((LIMIT - 10)) "$PY" experiments/speed_sweep.py --config="$CONFIG" "${EXTRA[@]}" \
      --variants="${VDM_VARIANTS:-unroll0+remat_none+residual_bf16,unroll0+remat_none+residual_bf16+norm_pallas,unroll0+remat_none+residual_bf16+norm_pallas_conv,unroll0+remat_none+residual_bf16+norm_recompute}" \
      --batch_size="${VDM_BATCH:-128}" "${FIRST[@]}" --hlo_dir="$OUT/hlo" \
      --output="$OUT/sweep.json"
    ;;
  *)
    echo "usage: bash experiments/gpu_runbook.sh prepare|bench|curve|model|sweep|lease|compare" >&2
    exit 2
    ;;
esac
