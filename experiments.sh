#!/usr/bin/env bash
# Does dreaming help, over seeds? Phases 1-2 once, then for each seed phase 3 and its controls (real text only,
# phase 2 continued, the oracle's true captions), phase 4 from phase 3 and from the control, the evals, and
# eval.py --compare: each metric's mean and sd, and paired bootstrap 95% intervals over test items for
# phase 3 - phase 2 / - control / - continued / - oracle (and the others in eval.CONTRASTS).
#
#   bash experiments.sh --seeds 3 --device cpu        # everything under out_seeds/
#   bash experiments.sh --seeds 3 --base out          # reuse reproduce.sh's phases 1-2 from out/
#   bash experiments.sh --seeds 1 --first_seed 1338   # one more seed (runs side by side in another shell)
#
# Other arguments go to every phase script; P3_ARGS, P4_ARGS and EVAL_ARGS (words) to phase 3, phase 4 and
# eval.py only. A step whose best.pt (or eval.json) is there already is skipped, so an interrupted run picks
# up where it stopped. Writes out_seeds/seeds.json and out_seeds/seeds.png (ROOT/ with --root ROOT).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)  # the scripts; paths in arguments stay relative to where it was started
PY=${PYTHON:-python}
# shellcheck disable=SC2206  # word lists on purpose
p3=(${P3_ARGS:-}); p4=(${P4_ARGS:-}); ev=(${EVAL_ARGS:-})
seeds=3; first=1337; base=""; root=out_seeds; args=(); eval_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds=$2; shift 2 ;;
        --first_seed) first=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --device|--world_dir) args+=("$1" "$2"); eval_args+=("$1" "$2"); shift 2 ;;
        --quiet) args+=("$1"); eval_args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
t_start=$(date +%s)
step() {  # step DONE_FILE command...: run unless DONE_FILE exists
    local done=$1; shift
    if [ -e "$done" ]; then echo "==> skip (done): $*"; return; fi
    echo; echo "==> $*"
    local t0; t0=$(date +%s)
    "$@"
    echo "==> done in $(( $(date +%s) - t0 )) s"
}

if [ -z "$base" ]; then
    base=$root/base
    step "$base/phase1/best.pt" "$PY" "$here/phase1_text.py" --out_dir "$base" "${args[@]+"${args[@]}"}"
    step "$base/phase2/best.pt" "$PY" "$here/phase2_caption.py" --out_dir "$base" "${args[@]+"${args[@]}"}"
fi
step "$root/base_eval.json" "$PY" "$here/eval.py" --out_dir "$base" --ckpt "$base/phase1/best.pt" --ckpt "$base/phase2/best.pt" \
    --json "$root/base_eval.json" --chart "$root/base_eval.png" "${eval_args[@]+"${eval_args[@]}"}" "${ev[@]+"${ev[@]}"}"
files=("$root/base_eval.json")
for ((s = first; s < first + seeds; s++)); do
    d=$root/seed_$s
    mkdir -p "$d"
    for f in phase1 phase2 tokens tokenizer.model data.json; do  # phases 1-2 are shared: each seed starts from them
        [ -e "$d/$f" ] || cp -r "$base/$f" "$d/$f"
    done
    step "$d/phase3/best.pt" "$PY" "$here/phase3_synth.py" --out_dir "$d" --seed "$s" "${args[@]+"${args[@]}"}" "${p3[@]+"${p3[@]}"}"
    step "$d/phase3_control/best.pt" "$PY" "$here/phase3_synth.py" --synthetic_frac 0 --out_dir "$d" --seed "$s" "${args[@]+"${args[@]}"}" "${p3[@]+"${p3[@]}"}"
    step "$d/phase3_continued/best.pt" "$PY" "$here/phase3_synth.py" --arm continued --out_dir "$d" --seed "$s" "${args[@]+"${args[@]}"}" "${p3[@]+"${p3[@]}"}"
    step "$d/phase3_oracle/best.pt" "$PY" "$here/phase3_synth.py" --arm oracle --out_dir "$d" --seed "$s" "${args[@]+"${args[@]}"}" "${p3[@]+"${p3[@]}"}"
    step "$d/phase4/best.pt" "$PY" "$here/phase4_vqa.py" --n_test 0 --out_dir "$d" --seed "$s" "${args[@]+"${args[@]}"}" "${p4[@]+"${p4[@]}"}"
    step "$d/phase4_control/best.pt" "$PY" "$here/phase4_vqa.py" --n_test 0 --init phase3_control --out_name phase4_control \
        --out_dir "$d" --seed "$s" "${args[@]+"${args[@]}"}" "${p4[@]+"${p4[@]}"}"
    ckpts=()
    for r in phase3_control phase3_continued phase3 phase3_oracle phase4_control phase4; do ckpts+=(--ckpt "$d/$r/best.pt"); done
    step "$d/eval.json" "$PY" "$here/eval.py" --out_dir "$d" --seed "$s" "${ckpts[@]}" "${eval_args[@]+"${eval_args[@]}"}" "${ev[@]+"${ev[@]}"}"
done
for f in "$root"/seed_*/eval.json; do files+=("$f"); done
"$PY" "$here/eval.py" --compare "${files[@]}" --json "$root/seeds.json" --chart "$root/seeds.png"
echo
echo "experiments.sh: everything in $(( $(date +%s) - t_start )) s"
