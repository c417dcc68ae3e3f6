#!/usr/bin/env bash
# Stage 0 of egs/mini: generate the synthetic corpus (shape scenes + espeak-ng captions) and write the
# Kaldi data dirs <data_dir>/{train,dev,test}, then validate them. Re-running reuses a complete corpus.
set -euo pipefail

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (${0##*/}) $*"; }

corpus_dir=downloads/mini_corpus  # images, wavs and manifest go here
data_dir=data                     # parent of the train/dev/test data dirs
num_images=1000                   # images in the corpus (train/dev/test = 75/10/15 %)
captions_per_image=5              # spoken captions per image, each from another template and voice (1..6)
num_voices=10                     # use the first N voice variants (1..10)
eval_group_size=1                 # dev/test images in groups of N near-identical scenes (1 = independent)
image_size=64                     # image side in pixels (must match conf/clip_mini.json)
seed=0                            # everything generated is a function of the seed
nj=2                              # synthesis worker processes
python=""                         # interpreter; empty: the one ../../TEMPLATE/path.sh finds

help_message=$(cat <<EOF
Usage: $0 [options]
Generate the offline mini corpus and its Kaldi data dirs.
Options (default):
  --corpus_dir DIR           ($corpus_dir)
  --data_dir DIR             ($data_dir)
  --num_images N             ($num_images)
  --captions_per_image N     ($captions_per_image)
  --num_voices N             ($num_voices)
  --eval_group_size N        ($eval_group_size)
  --image_size N             ($image_size)
  --seed N                   ($seed)
  --nj N                     ($nj)
  --python CMD               ($python)
  --help                     this message
EOF
)

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) echo "$help_message"; exit 0 ;;
    --corpus_dir|--data_dir|--num_images|--captions_per_image|--num_voices|--eval_group_size|--image_size|--seed|\
    --nj|--python)
      if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; echo "$help_message" >&2; exit 2; fi
      name=${1#--}
      printf -v "$name" '%s' "$2"
      shift 2 ;;
    *) echo "$0: unknown argument: $1" >&2; echo "$help_message" >&2; exit 2 ;;
  esac
done

# shellcheck disable=SC1091
. "$(dirname "$0")/../../TEMPLATE/path.sh"

command -v espeak-ng >/dev/null || { echo "$0: espeak-ng not found (apt-get install espeak-ng)" >&2; exit 1; }

local_dir=$(cd "$(dirname "$0")" && pwd)
start=$SECONDS
log "making corpus: ${num_images} images x ${captions_per_image} captions -> ${corpus_dir}, ${data_dir}"
HF_HUB_OFFLINE=1 "$python" "$local_dir/make_corpus.py" \
  --corpus_dir "$corpus_dir" --data_dir "$data_dir" --num_images "$num_images" \
  --captions_per_image "$captions_per_image" --num_voices "$num_voices" --eval_group_size "$eval_group_size" \
  --image_size "$image_size" --seed "$seed" --nj "$nj"

# make_corpus.py checks its own output; the toolkit's validator, when installed, checks more (audio, images).
if "$python" -c "from speechclip_plus.data.datadir import check_data_dir" 2>/dev/null; then
  for set in train dev test; do
    "$python" -m speechclip_plus.bin.validate_data "$data_dir/$set"
  done
  log "validated ${data_dir}/{train,dev,test} with speechclip_plus.bin.validate_data"
else
  log "speechclip_plus.data.datadir.check_data_dir not available: kept make_corpus.py's own checks"
fi
log "done in $((SECONDS - start)) s"
