#!/usr/bin/env bash
# The shared stage engine of every recipe: data -> audio -> image cache -> vocab -> train -> score -> export.
# A recipe's run.sh sets its corpus options and calls this script with "$@" last (user options win).
#
# Stages (each logged, skipped when its .done marker exists, outputs written atomically; the Python comes from
# path.sh beside this script: --python, else the active env, else <repo>/.venv):
#   0  local/data.sh: corpus -> Kaldi data dirs data/<set>/ (validated)
#   1  audio check/format: 16 kHz mono (converted copies in dump/audio/), data/<set>/utt2dur
#   2  frozen-CLIP image embeddings: dump/<clip key>/<set>/img_embed.{ark,scp} (--train_teacher true first
#      trains a tiny CLIP teacher on the train set into the file model.clip.pretrained names: the CPU route)
#   3  vocabularies: data/token_list/clip_vocab_usage.txt (keyword codebook), data/token_list/spm/bpe.model
#   4  training: exp/<tag>/ (config.yaml, train.log, tensorboard/, checkpoints/, run.sh)
#   5  scoring on the test sets: exp/<tag>/<set>/results.json, plots, exp/<tag>/RESULTS.md
#   6  export: exp/<tag>/model.pt (self-contained, for the API and SUPERB)
set -euo pipefail

log() {
    local fname=${BASH_SOURCE[1]##*/}
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}
SECONDS=0
_vars_before=$(compgen -v)

# General options
stage=0                 # first stage to run
stop_stage=100          # last stage to run
skip_train=false        # skip stages 4 (training)
skip_eval=false         # skip stages 5-6 (scoring, export)
python=""               # python interpreter (e.g. "coverage run"); empty: found by path.sh
nj=2                    # parallel jobs for data stages
ngpu=0                  # GPUs (0 = CPU); >1 launches torchrun
num_nodes=1             # machines for multi-node training
node_rank=0             # rank of this machine
master_addr=localhost   # rendezvous host (multi-node)
master_port=29500       # rendezvous port
dumpdir=dump            # features / caches
expdir=exp              # experiments

# Data options
local_data_opts=""      # options passed to local/data.sh
train_set=train         # training set name
valid_set=dev           # validation set name
test_sets="test"        # test set names (space separated)
vocab_source=train      # keyword vocabulary from the train text (train) or every set (all, as the reference)
spm_vocab_size=500      # sentencepiece BPE size (the spm CIF target and subword statistics)
image_batch_size=64     # images per batch in stage 2
train_teacher=false     # true: stage 2 first trains a tiny CLIP teacher into model.clip.pretrained (CPU route)
teacher_opts=""         # options for that teacher (egs/mini/local/train_clip.py), e.g. "--steps 300"
validate_opts=""        # options for speechclip_plus.bin.validate_data (e.g. "--fix_dir --check_images")
format_audio_opts=""    # options for speechclip_plus.bin.format_audio (e.g. "--skip_bad")
skip_bad=false          # true: stages 0-2 leave out bad wavs, images and captions, each listed by name in
                        # data/<set>/excluded.txt, instead of stopping (see docs/reliability.md)

# Training / scoring options
train_config=""         # model + training YAML (required)
train_args=""           # extra overrides, e.g. "--train.lr 1e-4 --model.cif.threshold 0.9"
tag=""                  # experiment tag (default: from the config name and train_args)
score_opts=""           # options for speechclip_plus.bin.score
resume=true             # stage 4 resumes exp/<tag> when it has a last checkpoint

# The option names are the variables defined above; their defaults are kept to report what a run changed.
mapfile -t options < <(comm -13 <(sort <<<"${_vars_before}") <(compgen -v | sort) | grep -v '^_')
declare -A option_default
for o in "${options[@]}"; do option_default[${o}]=${!o}; done
unset _vars_before

help_message=$(cat <<EOF
Usage: $0 --train_config <yaml> [options]

Stages: 0 data, 1 audio format, 2 image-embedding cache, 3 vocabularies, 4 train, 5 score, 6 export.
Options (current values):
  --stage \${stage}  --stop_stage \${stop_stage}  --skip_train \${skip_train}  --skip_eval \${skip_eval}
  --python "\${python}" (empty: found by path.sh)  --nj \${nj}  --ngpu \${ngpu}  --num_nodes \${num_nodes}  --node_rank \${node_rank}
  --master_addr \${master_addr}  --master_port \${master_port}  --dumpdir \${dumpdir}  --expdir \${expdir}
  --local_data_opts "\${local_data_opts}"
  --train_set \${train_set}  --valid_set \${valid_set}  --test_sets "\${test_sets}"
  --validate_opts "\${validate_opts}"  --format_audio_opts "\${format_audio_opts}"  --skip_bad \${skip_bad}
  --vocab_source \${vocab_source}  --spm_vocab_size \${spm_vocab_size}  --image_batch_size \${image_batch_size}
  --train_teacher \${train_teacher}  --teacher_opts "\${teacher_opts}"
  --train_config \${train_config}  --train_args "\${train_args}"  --tag "\${tag}"
  --score_opts "\${score_opts}"  --resume \${resume}
EOF
)

engine_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC1091
. "${engine_dir}/../../utils/parse_options.sh"
if [ $# -ne 0 ]; then
    echo "$0: unexpected arguments: $*" >&2
    echo "${help_message}" >&2
    exit 2
fi
if [ -z "${train_config}" ]; then
    echo "$0: --train_config is required" >&2
    exit 2
fi
[ -f "${train_config}" ] || { echo "$0: --train_config ${train_config}: no such file" >&2; exit 2; }

# The options that differ from the engine's defaults (a recipe's run.sh and the user's options, last one wins).
changed=()
for o in "${options[@]}"; do
    [ "${!o}" = "${option_default[${o}]}" ] || changed+=("--${o} $(printf '%q' "${!o}")")
done
run_options="${changed[*]}"

# shellcheck disable=SC1091
. "${engine_dir}/path.sh"  # sets ${python}: --python, else the active env, else <repo>/.venv
log "$0 ${run_options} (python: ${python})"

# --skip_bad (the data-integrity policy): passed to stage 0's local/data.sh as "--skip_bad true" and to
# stages 1-2 as "--skip_bad"; nothing is passed when false, so a local/data.sh without the option still runs.
case "${skip_bad}" in
    true) data_skip_bad=(--skip_bad true); tool_skip_bad=(--skip_bad) ;;
    false) data_skip_bad=(); tool_skip_bad=() ;;
    *) echo "$0: --skip_bad must be true or false, got '${skip_bad}'" >&2; exit 2 ;;
esac

token_list=data/token_list
vocab_file=${token_list}/clip_vocab_usage.txt
spm_model=${token_list}/spm/bpe.model

# Experiment tag: config name + overrides, so two settings never share an exp dir.
if [ -z "${tag}" ]; then
    tag=$(basename "${train_config}" .yaml)
    if [ -n "${train_args}" ]; then
        tag+="_$(echo "${train_args}" | sed -e 's/--//g' -e 's/[ =]\+/_/g' -e 's/[^A-Za-z0-9._+-]//g')"
    fi
fi
exp=${expdir}/${tag}

# The image-embedding cache of the CLIP in the resolved train config (train_args applied): its folder name is
# a key of the CLIP's content (config, weights digest), so another CLIP never reuses it. Found on first use,
# after stage 2 may have trained the teacher whose weights it names.
cache_dir=""
find_cache_dir() {
    [ -n "${cache_dir}" ] && return 0
    local clip_key
    # shellcheck disable=SC2086
    clip_key=$(${python} -m speechclip_plus.bin.show_config --config "${train_config}" --clip_tag ${train_args}) ||
        { echo "$0: cannot key the image-embedding cache of ${train_config} (above); a missing CLIP weights" \
            "file is made by --train_teacher true (stage 2) or must be given in model.clip.pretrained" >&2; exit 2; }
    cache_dir=${dumpdir}/${clip_key}
}

run_stage() { [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]; }
done_or_run() {  # done_or_run <marker> <command...>: run unless the marker exists; touch it after success
    local marker=$1; shift
    if [ -f "${marker}" ]; then
        log "  already done (${marker}); skipping"
        return 0
    fi
    local t0=${SECONDS}
    "$@"
    mkdir -p "$(dirname "${marker}")"
    touch "${marker}"
    log "  done in $(( SECONDS - t0 )) s (${marker})"
}

all_sets="${train_set} ${valid_set} ${test_sets}"

if run_stage 0; then
    log "Stage 0: corpus -> Kaldi data dirs: data/{${all_sets// /,}}"
    # The marker means "local/data.sh ran and every set validated": it is written after the validation, so
    # a local/data.sh edited after a failed validation runs again.
    marker=data/.stage0.done
    if [ -f "${marker}" ]; then
        log "  already done (${marker}); skipping local/data.sh, validating again"
    else
        t0=${SECONDS}
        # shellcheck disable=SC2086
        local/data.sh "${data_skip_bad[@]}" ${local_data_opts}
        log "  local/data.sh done in $(( SECONDS - t0 )) s"
    fi
    dirs=()
    for dset in ${all_sets}; do dirs+=("data/${dset}"); done
    # shellcheck disable=SC2086
    if ! ${python} -m speechclip_plus.bin.validate_data ${validate_opts} "${dirs[@]}"; then
        rm -f "${marker}"
        echo "$0: stage 0: ${dirs[*]} did not validate (problems above). Fix local/data.sh and re-run" \
            "(it runs again), or exclude the bad utterances with --validate_opts \"--fix_dir\" (each listed in" \
            "data/<set>/excluded.txt)" >&2
        exit 1
    fi
    [ -f "${marker}" ] || touch "${marker}"  # a re-run that only validated writes nothing
fi

if run_stage 1; then
    log "Stage 1: audio check/format (16 kHz mono) + durations: data/<set>/wav.scp -> utt2dur, ${dumpdir}/audio/"
    for dset in ${all_sets}; do
        # shellcheck disable=SC2086
        done_or_run "data/${dset}/.stage1.done" \
            ${python} -m speechclip_plus.bin.format_audio --data_dir "data/${dset}" \
                --dump_dir "${dumpdir}/audio/${dset}" --nj "${nj}" "${tool_skip_bad[@]}" ${format_audio_opts}
    done
fi

if run_stage 2; then
    if "${train_teacher}"; then
        # shellcheck disable=SC2086
        clip_json=$(${python} -m speechclip_plus.bin.show_config --config "${train_config}" --key model.clip.name \
            ${train_args})
        # shellcheck disable=SC2086
        clip_weights=$(${python} -m speechclip_plus.bin.show_config --config "${train_config}" \
            --key model.clip.pretrained ${train_args})
        if [[ "${clip_json}" != *.json ]] || [ "$(basename "${clip_weights}")" != clip.pt ]; then
            echo "$0: --train_teacher true needs model.clip.name = an open_clip model-config .json and" \
                "model.clip.pretrained = <dir>/clip.pt in ${train_config} (found ${clip_json}, ${clip_weights})" >&2
            exit 2
        fi
        log "Stage 2: CLIP teacher ${clip_json} on data/${train_set} -> ${clip_weights}"
        # shellcheck disable=SC2086
        ${python} "${engine_dir}/../mini/local/train_clip.py" --config "${clip_json}" --data_dir data \
            --train_set "${train_set}" --eval_sets ${valid_set} --exp_dir "$(dirname "${clip_weights}")" \
            ${teacher_opts}
    fi
    find_cache_dir
    # No marker: embed_images checks the cache's key (CLIP weights and config, the set's image list) on every
    # run, reuses it when it matches (and says so) and recomputes it when anything changed.
    log "Stage 2: frozen CLIP image embeddings: data/<set>/img.scp -> ${cache_dir}/<set>/img_embed.scp"
    for dset in ${all_sets}; do
        # shellcheck disable=SC2086
        ${python} -m speechclip_plus.bin.embed_images --config "${train_config}" ${train_args} \
            --data_dir "data/${dset}" --out_dir "${cache_dir}/${dset}" --batch_size "${image_batch_size}" \
            --nj "${nj}" "${tool_skip_bad[@]}"
    done
fi

if run_stage 3; then
    log "Stage 3: vocabularies (source: ${vocab_source}) -> ${vocab_file}, ${spm_model}"
    texts=(--text "data/${train_set}/text")
    if [ "${vocab_source}" = all ]; then
        for dset in ${valid_set} ${test_sets}; do texts+=(--text "data/${dset}/text"); done
    elif [ "${vocab_source}" != train ]; then
        echo "$0: --vocab_source must be train or all" >&2; exit 2
    fi
    # The marker records the source, so a later run with another --vocab_source fails instead of silently
    # reusing vocabularies made from other text (an empty marker is from an older engine: not checked).
    made_from=$(cat "${token_list}/.done" 2>/dev/null || true)
    if [ -n "${made_from}" ] && [ "${made_from}" != "${vocab_source}" ]; then
        echo "$0: ${token_list} was made with --vocab_source ${made_from}, not ${vocab_source}:" \
            "remove ${token_list} (and retrain) to change it" >&2
        exit 2
    fi
    make_vocab() {
        ${python} -m speechclip_plus.bin.make_vocab "${texts[@]}" --out_dir "${token_list}" \
            --spm_vocab_size "${spm_vocab_size}"
        echo "${vocab_source}" >"${token_list}/.done"
    }
    done_or_run "${token_list}/.done" make_vocab
fi

if ! "${skip_train}" && run_stage 4; then
    find_cache_dir
    log "Stage 4: training: ${train_config} ${train_args} -> ${exp}"
    # shellcheck disable=SC2206
    train_cmd=(${python} -m speechclip_plus.bin.train --config "${train_config}"
        --train_data "data/${train_set}" --valid_data "data/${valid_set}"
        --image_embeds "${cache_dir}/${train_set}/img_embed.scp"
        --valid_image_embeds "${cache_dir}/${valid_set}/img_embed.scp"
        --exp_dir "${exp}" --ngpu "${ngpu}" --num_nodes "${num_nodes}" --node_rank "${node_rank}"
        --master_addr "${master_addr}" --master_port "${master_port}"
        --model.clip.vocab "${vocab_file}" --data.text_vocab "${spm_model}")
    if "${resume}"; then train_cmd+=(--resume); fi
    # shellcheck disable=SC2206
    train_cmd+=(${train_args})
    done_or_run "${exp}/.train.done" "${train_cmd[@]}"
fi

if ! "${skip_eval}" && run_stage 5; then
    find_cache_dir
    log "Stage 5: scoring ${exp} on: ${test_sets} -> ${exp}/<set>/, ${exp}/RESULTS.md"
    for dset in ${test_sets}; do
        # shellcheck disable=SC2086
        done_or_run "${exp}/${dset}/.done" \
            ${python} -m speechclip_plus.bin.score --exp_dir "${exp}" --data_dir "data/${dset}" \
                --image_embeds "${cache_dir}/${dset}/img_embed.scp" --out_dir "${exp}/${dset}" ${score_opts}
    done
fi

if ! "${skip_eval}" && run_stage 6; then
    log "Stage 6: export -> ${exp}/model.pt"
    # shellcheck disable=SC2086
    done_or_run "${exp}/.export.done" ${python} -m speechclip_plus.bin.export --exp_dir "${exp}" --out "${exp}/model.pt"
fi

log "Finished ($0 ${run_options}) in ${SECONDS} s"
