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
check_bars=auto    # true: exit 1 when a quality bar of RESULTS.md is missed; auto: true for --size full
results=exp/RESULTS.md  # summary written here (the committed RESULTS.md is the claims study's)

# shellcheck disable=SC2034  # read by utils/parse_options.sh
help_message=$(cat <<EOF
Usage: $0 [options]
  --stage \${stage} --stop_stage \${stop_stage} --variants "\${variants}" --seeds "\${seeds}" --size \${size}
  --python \${python} --nj \${nj} --train_args "\${train_args}" --check_bars \${check_bars} --results \${results}
EOF
)
# shellcheck disable=SC1091
. ../../utils/parse_options.sh
# shellcheck disable=SC1091
. ../TEMPLATE/path.sh

case "${size}" in
    full)
        data_opts="--num_images 1000 --captions_per_image 5 --eval_group_size 10"
        clip_opts=""
        size_args="" ;;
    ci)
        data_opts="--num_images 160 --captions_per_image 2 --num_voices 8 --eval_group_size 4"
        clip_opts="--steps 100 --batch_size 32"
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

# Stages 2-6 per variant and seed (the image cache and vocabularies are shared and made once).
if [ "${stop_stage}" -ge 2 ]; then
    for v in ${variants}; do
        for seed in ${seeds}; do
            "${engine}" "${common[@]}" --stage "$(( stage > 2 ? stage : 2 ))" --stop_stage "${stop_stage}" \
                --train_config "${run_config[${v}]}" --tag "mini_${v}_seed${seed}" \
                --train_args "--train.seed ${seed} ${size_args} ${run_args[${v}]} ${train_args}"
        done
    done
fi

if [ "${stop_stage}" -ge 5 ]; then
    bars=()
    if "${check_bars}"; then bars=(--check_bars); fi
    # shellcheck disable=SC2086
    ${python} local/summarize.py --variants ${variants} --seeds ${seeds} --size "${size}" \
        --out "${results}" --elapsed "${SECONDS}" "${bars[@]+"${bars[@]}"}"
fi
echo "$0: done in ${SECONDS} s"
