#!/usr/bin/env bash
# From a fresh clone to the results table: build the world, run the four phases (plus phase 3's control
# without synthetic captions and its oracle on the world's true captions), evaluate every checkpoint, print
# the table.
#
#   ./reproduce.sh                       # auto device, everything under out/
#   ./reproduce.sh --device cpu --quiet  # extra arguments go to every phase script
#   EVAL_ARGS="--blimp ../shared/data/blimp_fast" ./reproduce.sh   # extra arguments for eval.py only
#
# eval.py gets only the shared arguments it knows (--device, --out_dir, --world_dir, --seed, --quiet);
# the table also lands in OUT_DIR/eval.json and the chart in OUT_DIR/eval.png.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

# the subset of the arguments that eval.py understands
eval_args=()
args=("$@")
world_dir=data/world
i=0
while [ $i -lt ${#args[@]} ]; do
    a=${args[$i]}
    case "$a" in
        --device|--out_dir|--world_dir|--seed)
            if [ $((i + 1)) -ge ${#args[@]} ]; then echo "reproduce.sh: $a needs a value" >&2; exit 2; fi
            eval_args+=("$a" "${args[$((i + 1))]}")
            [ "$a" = --world_dir ] && world_dir=${args[$((i + 1))]}
            i=$((i + 2)) ;;
        --device=*|--out_dir=*|--world_dir=*|--seed=*|--quiet)
            eval_args+=("$a")
            case "$a" in --world_dir=*) world_dir=${a#--world_dir=} ;; esac
            i=$((i + 1)) ;;
        *) i=$((i + 1)) ;;
    esac
done

t_start=$(date +%s)
step() {
    echo
    echo "==> $*"
    local t0
    t0=$(date +%s)
    "$@"
    echo "==> done in $(( $(date +%s) - t0 )) s: $*"
}

step "$PY" -c "import sys; from data.world import ensure_built; ensure_built(sys.argv[1])" "$world_dir"
step "$PY" phase1_text.py "$@"
# --n_test 0: eval.py scores every test set at the end, so the phases skip their own reports
step "$PY" phase2_caption.py --n_test 0 "$@"
step "$PY" phase3_synth.py "$@"
step "$PY" phase3_synth.py --synthetic_frac 0 "$@"
step "$PY" phase3_synth.py --arm oracle "$@"
step "$PY" phase4_vqa.py --n_test 0 "$@"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of words on purpose
step "$PY" eval.py ${eval_args[@]+"${eval_args[@]}"} ${EVAL_ARGS:-}
echo
echo "reproduce.sh: everything in $(( $(date +%s) - t_start )) s"
