#!/usr/bin/env bash
# Flickr8k with the Flickr Audio Caption Corpus (40,000 spoken captions of 8,000 images): SpeechCLIP and
# SpeechCLIP+ (p, c, c+, h, h+ in base and large, conf/). Corpus options only: the stages are in
# ../TEMPLATE/speechclip.sh (./run.sh --help lists its options); the corpus location is in db.sh.
#   FLICKR8K=/data/flickr8k ./run.sh                          base h+, stages 0-6
#   ./run.sh --train_config conf/large_cplus.yaml --ngpu 4    another variant (stages 0-3 are shared)
#   ./run.sh --stage 5 --stop_stage 5                         re-score only
set -euo pipefail
cd "$(dirname "$0")"

train_set=train                   # Flickr_8k.trainImages.txt: 6,000 images, 30,000 utterances
valid_set=dev                     # Flickr_8k.devImages.txt: 1,000 images (checkpoint selection)
test_sets="test"                  # Flickr_8k.testImages.txt: 1,000 images, 5,000 utterances
train_config=conf/base_hplus.yaml # the variant trained by default

../TEMPLATE/speechclip.sh \
    --train_set "${train_set}" \
    --valid_set "${valid_set}" \
    --test_sets "${test_sets}" \
    --train_config "${train_config}" \
    "$@"
