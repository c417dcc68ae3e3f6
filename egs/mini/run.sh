#!/usr/bin/env bash
# egs/mini: the offline demo. Generates a corpus of shape scenes with spoken captions (espeak-ng), trains a
# tiny teacher CLIP on it, then runs the same stage engine, trainer and scorer as the real recipes.
#   ./run.sh                                  h+ only (what `make demo` runs); summary in exp/RESULTS.md
#   ./run.sh --variants "p c cplus h hplus"   all five variants on the shared data, cache and vocab
#   local/study.sh                            the claims study: its runs x 3 seeds -> RESULTS.md (README.md)
#   ./run.sh --size ci                        a reduced corpus and schedule (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")"

stage=0            # first engine stage (the teacher CLIP is trained with stage 2)
stop_stage=6       # last engine stage
variants="hplus"   # runs to train: names from conf/arms.txt (the five variants and the study's controls)
seeds="1"          # training seeds; several give mean +- spread in RESULTS.md
size=full          # full (about 1000 images x 5 captions) | ci (reduced, for tests)
python=""          # interpreter; empty: the one ../TEMPLATE/path.sh finds (active env, ../../.venv)
nj=2               # data-preparation jobs
train_args=""      # extra training overrides for every variant
jobs=1             # runs trained side by side (each with one torch thread when > 1; logs in exp/logs/)
check_bars=auto    # true: exit 1 when a quality bar of RESULTS.md is missed; auto: true for --size full
results=exp/RESULTS.md  # summary written here (the committed RESULTS.md is the claims study's)

# shellcheck disable=SC2034  # read by utils/parse_options.sh
help_message=$(cat <<EOF
Usage: $0 [options]
  --stage \${stage} --stop_stage \${stop_stage} --variants "\${variants}" --seeds "\${seeds}" --size \${size}
  --python \${python} --nj \${nj} --train_args "\${train_args}" --jobs \${jobs} --check_bars \${check_bars}
  --results \${results}
EOF
)
# shellcheck disable=SC1091
. ../../utils/parse_options.sh
# shellcheck disable=SC1091
. ../TEMPLATE/path.sh

# On cores shared with other jobs, OpenMP threads that spin while waiting for each other made a training step
# 17x slower here (2 threads, one core busy elsewhere: 9.2 s instead of 0.55 s); waiting passively costs nothing
# on an idle machine.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
case "${jobs}" in
    ''|*[!0-9]*|0) echo "$0: --jobs must be a number >= 1, got '${jobs}'" >&2; exit 2 ;;
esac

case "${size}" in
    full)
        data_opts="--num_images 1000 --captions_per_image 5 --eval_group_size 10"
        clip_opts="--steps 200 --lr 2e-3 --precision fp32"
        size_args="" ;;
    ci)
        data_opts="--num_images 160 --captions_per_image 2 --num_voices 8 --eval_group_size 4"
        clip_opts="--steps 100 --batch_size 32 --precision fp32"
        size_args="--train.max_steps 30 --train.valid_every 15 --train.warmup_steps 5 --train.batch_size 16" ;;
    *)
        echo "$0: --size must be full or ci" >&2; exit 2 ;;
esac

if [ "${check_bars}" = auto ]; then
    if [ "${size}" = full ]; then check_bars=true; else check_bars=false; fi
fi
case "${check_bars}" in
    true|false) ;;
    *) echo "$0: --check_bars must be true, false or auto" >&2; exit 2 ;;
esac

# Each run name maps to a config and its training overrides (conf/arms.txt).
declare -A run_config run_args
while read -r name config args; do
    case "${name}" in ''|'#'*) continue ;; esac
    run_config[${name}]=conf/${config}
    run_args[${name}]=${args}
done <conf/arms.txt
for v in ${variants}; do
    if [ -z "${run_config[${v}]+set}" ]; then
        echo "$0: --variants: unknown run '${v}'; known: ${!run_config[*]} (conf/arms.txt)" >&2
        exit 2
    fi
done

SECONDS=0
engine=../TEMPLATE/speechclip.sh
common=(--python "${python}" --nj "${nj}" --train_set train --valid_set dev --test_sets test --spm_vocab_size 100)
first=$(echo "${variants}" | awk '{print $1}')

# Stages 0-1: corpus, data dirs, audio check.
"${engine}" "${common[@]}" --stage "${stage}" --stop_stage "$(( stop_stage < 1 ? stop_stage : 1 ))" \
    --train_config "${run_config[${first}]}" --local_data_opts "${data_opts} --nj ${nj} --python ${python}"

# The teacher: a tiny open_clip CLIP trained on the generated image-caption pairs, then frozen.
if [ "${stage}" -le 2 ] && [ "${stop_stage}" -ge 2 ]; then
    # shellcheck disable=SC2086
    [ -x local/train_clip.sh ] && local/train_clip.sh --python "${python}" ${clip_opts}
fi

# Stages 2-6 per run and seed. The image cache and vocabularies (stages 2-3) are shared: the first run makes
# them alone, then up to ${jobs} runs go side by side.
train_run() {  # train_run <run> <seed>
    "${engine}" "${common[@]}" --stage "$(( stage > 2 ? stage : 2 ))" --stop_stage "${stop_stage}" \
        --train_config "${run_config[$1]}" --tag "mini_$1_seed$2" \
        --train_args "--train.seed $2 ${size_args} ${run_args[$1]} ${train_args}"
}
if [ "${stop_stage}" -ge 2 ]; then
    if [ "${jobs}" -eq 1 ]; then
        for v in ${variants}; do
            for seed in ${seeds}; do train_run "${v}" "${seed}"; done
        done
    else
        first_seed=$(echo "${seeds}" | awk '{print $1}')
        if [ "${stage}" -le 3 ]; then
            "${engine}" "${common[@]}" --stage "$(( stage > 2 ? stage : 2 ))" --stop_stage 3 \
                --train_config "${run_config[${first}]}" --tag "mini_${first}_seed${first_seed}"
        fi
        mkdir -p exp/logs
        failed=exp/logs/failed.txt
        rm -f "${failed}"
        for v in ${variants}; do
            for seed in ${seeds}; do
                while [ "$(jobs -rp | wc -l)" -ge "${jobs}" ]; do wait -n || true; done
                log=exp/logs/mini_${v}_seed${seed}.log
                echo "$0: $(date +%T) mini_${v}_seed${seed} started (log: ${log})"
                ( OMP_NUM_THREADS=1 train_run "${v}" "${seed}" >"${log}" 2>&1 ||
                    echo "mini_${v}_seed${seed} (log: ${log})" >>"${failed}" ) &
            done
        done
        wait
        if [ -s "${failed}" ]; then
            echo "$0: these runs failed:" >&2
            cat "${failed}" >&2
            exit 1
        fi
    fi
fi

if [ "${stop_stage}" -ge 5 ]; then
    bars=()
    if "${check_bars}"; then bars=(--check_bars); fi
    # shellcheck disable=SC2086
    ${python} local/summarize.py --variants ${variants} --seeds ${seeds} --size "${size}" \
        --out "${results}" --elapsed "${SECONDS}" "${bars[@]+"${bars[@]}"}"
fi
echo "$0: done in ${SECONDS} s"
