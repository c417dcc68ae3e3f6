#!/usr/bin/env bash
# Create a new recipe skeleton: egs/TEMPLATE/setup.sh egs/<corpus>
# Makes <dir>/run.sh (thin: calls the shared stage engine), <dir>/conf/ (copies of the package's model
# configs to start from, and the CPU route: cpu_hplus.yaml, cpu_fbank.yaml, cpu_clip.json), <dir>/local/data.sh
# (a stub you replace: it must write data/<set>/ Kaldi dirs), and <dir>/db.sh (corpus locations). Existing
# files are never overwritten.
set -euo pipefail

if [ $# -ne 1 ] || [ "$1" = --help ] || [ "$1" = -h ]; then
    echo "Usage: $0 <new recipe dir>   e.g. $0 egs/mycorpus" >&2
    [ $# -eq 1 ] && exit 0
    exit 2
fi
template=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The package's model configs are found from the physical location of this script (egs/TEMPLATE may be
# reached through a symlink); the new run.sh refers to the engine through the path this script was called by.
root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
confs=("${root}"/speechclip_plus/conf/base_*.yaml "${root}"/speechclip_plus/conf/large_*.yaml)
for conf in "${confs[@]}"; do
    [ -f "${conf}" ] || { echo "$0: no model configs found in ${root}/speechclip_plus/conf" >&2; exit 1; }
done
mkdir -p "$1/conf" "$1/local"
dir=$(cd "$1" && pwd)
name=$(basename "${dir}")
rel=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "${template}" "${dir}")

write() {  # write <path> <text>: unless the path exists
    if [ -e "$1" ]; then
        echo "keeping existing $1"
    else
        printf '%s\n' "$2" >"$1"
        echo "wrote $1"
    fi
}

write "${dir}/run.sh" "#!/usr/bin/env bash
# Recipe for ${name}: corpus options only; the stages live in ${rel}/speechclip.sh (./run.sh --help).
#   ./run.sh       conf/base_hplus.yaml, the paper's: downloads HuBERT and CLIP ViT-B/32, expects a GPU
#   ./run.sh --train_config conf/cpu_hplus.yaml --train_teacher true
#                  the CPU route, no downloads: fbank features and a tiny CLIP teacher trained in stage 2
set -euo pipefail
cd \"\$(dirname \"\$0\")\"

train_set=train
valid_set=dev
test_sets=\"test\"
train_config=conf/base_hplus.yaml

${rel}/speechclip.sh \\
    --train_set \"\${train_set}\" \\
    --valid_set \"\${valid_set}\" \\
    --test_sets \"\${test_sets}\" \\
    --train_config \"\${train_config}\" \\
    \"\$@\""

write "${dir}/db.sh" "# shellcheck shell=bash
# Corpus locations for ${name}; each can be overridden from the environment.
# shellcheck disable=SC2034
CORPUS=\${CORPUS:-downloads/${name}}"

write "${dir}/local/data.sh" "#!/usr/bin/env bash
# Stage 0 of ${name}: turn the corpus into Kaldi data dirs data/{train,dev,test}/ holding wav.scp, text,
# utt2spk, spk2utt, utt2img, img.scp (absolute paths, sorted with LC_ALL=C). See egs/TEMPLATE/README.md.
#
# Nothing is left out silently (egs/TEMPLATE/README.md, \"Data integrity\"): a known quirk of the corpus is
# skipped and listed in data/local/skipped.tsv; anything else that would leave out a wav, image or caption
# stops this script with exit 1 and a line naming its file and item, unless --skip_bad true, which leaves it
# out and lists it in data/<set>/excluded.txt. speechclip_plus.data.corpus.CorpusWriter does all of that: write
# local/prepare.py around it (the README has one for a TSV manifest) and replace the last two lines with
#   \"\${python}\" local/prepare.py --corpus \"\${CORPUS}\" --out_dir data --skip_bad \"\${skip_bad}\" --nj \"\${nj}\"
set -euo pipefail
cd \"\$(dirname \"\$0\")/..\"

# shellcheck disable=SC2034  # used once local/prepare.py is called
skip_bad=false   # true: leave out bad wavs, images and captions (listed in data/<set>/excluded.txt)
# shellcheck disable=SC2034
nj=2             # processes for checking every wav header and image
# shellcheck disable=SC2034
python=python3   # interpreter with speechclip_plus installed

# shellcheck disable=SC1091
. ./db.sh
# shellcheck disable=SC1091
. ${rel}/../../utils/parse_options.sh
echo \"\$0: not written yet: read \${CORPUS} and create data/<set>/ (see egs/TEMPLATE/README.md)\" >&2
exit 1"

write "${dir}/conf/cpu_hplus.yaml" "# CPU route for ${name}: runs on a CPU with no downloads, to try the whole pipeline on this corpus.
# Not a paper setting. Speech: s3prl's filterbank features (cpu_fbank.yaml: no pretrained speech model)
# and two small transformer layers; CLIP: a tiny open_clip CLIP (cpu_clip.json, 64-pixel images) trained on
# this corpus's image-caption pairs by stage 2, or any weights file of that architecture:
#     ./run.sh --train_config conf/cpu_hplus.yaml --train_teacher true [--teacher_opts \"--steps 300\"]
# The model settings are egs/mini's (which learn its synthetic corpus in 300 steps); scale train.max_steps,
# train.batch_size and the teacher's --steps to the corpus. model.variant: p, c, cplus, h or hplus.
model:
  variant: hplus
  upstream: {name: baseline_local, model_config: cpu_fbank.yaml}
  clip: {name: cpu_clip.json, pretrained: ../exp/clip_teacher/clip.pt}
  encoder: {type: transformer, n_layers: 2, n_heads: 4, ffn_dim: 320, dropout: 0.1, attention_dropout: 0.0,
            conv_pos: 7}
  cascaded: {n_keywords: 8}
  cif: {scaling_steps: 100000, dropout: 0.1, target: clip_bpe}
  max_audio_len: 80000
train:
  batch_size: 64
  valid_batch_size: 64
  max_steps: 2000
  warmup_steps: 100
  lr: 2.0e-3
  valid_every: 250
  log_every: 25
  num_workers: 1"

write "${dir}/conf/cpu_fbank.yaml" "# s3prl baseline features of conf/cpu_hplus.yaml: 80 log-mel filterbanks every 40 ms, with CMVN.
kaldi:
  feat_type: fbank
  fbank:
    num_mel_bins: 80
    frame_length: 50.0
    frame_shift: 40.0
    use_log_fbank: True
delta:
  order: 0
  win_length: 5
cmvn:
  use_cmvn: True"

write "${dir}/conf/cpu_clip.json" '{
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": null},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}
}'

chmod +x "${dir}/run.sh" "${dir}/local/data.sh"
for conf in "${confs[@]}"; do
    write "${dir}/conf/$(basename "${conf}")" "$(cat "${conf}")"
done
echo "Next: write ${dir}/local/data.sh, then run ${dir}/run.sh"
