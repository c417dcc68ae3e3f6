#!/usr/bin/env bash
# SpokenCOCO (spoken MSCOCO captions) on the Karpathy split: SpeechCLIP and SpeechCLIP+ (p, c, c+, h, h+ in
# base and large, conf/). Corpus options only: the stages are in ../TEMPLATE/speechclip.sh (./run.sh --help
# lists its options); the corpus locations are in db.sh.
#   SPOKENCOCO=... MSCOCO=... KARPATHY_SPLIT=... ./run.sh       base h+, stages 0-6
#   ./run.sh --train_config conf/large_hplus.yaml --ngpu 4      another variant (stages 0-3 are shared)
#   ./run.sh --local_data_opts "--split_source ksplit"         the reference's SpokenCOCO_ksplit_*.json
set -euo pipefail
cd "$(dirname "$0")"

train_set=train                   # Karpathy train + restval (about 113k images)
valid_set=dev                     # Karpathy val (5,000 images; checkpoint selection)
test_sets="test"                  # Karpathy test (5,000 images, about 25k utterances)
train_config=conf/base_hplus.yaml # the variant trained by default

../TEMPLATE/speechclip.sh \
    --train_set "${train_set}" \
    --valid_set "${valid_set}" \
    --test_sets "${test_sets}" \
    --train_config "${train_config}" \
    "$@"
