#!/usr/bin/env bash
# Stage 0 of egs/spokencoco: $SPOKENCOCO (SpokenCOCO.tar.gz unpacked), $MSCOCO (train2014/, val2014/) and the
# Karpathy split $KARPATHY_SPLIT (see db.sh) -> data/{train,dev,test} Kaldi data dirs (train = Karpathy
# train + restval, dev = val, test = test). Layout, ids and skipped entries are documented in
# local/prepare_spokencoco.py; the skip counts go to data/local/spokencoco_prep.json.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (local/data.sh) $*"; }

out_dir=data          # parent of the data dirs (relative to the recipe dir)
split_source=auto     # auto | karpathy (dataset_coco.json) | ksplit (SpokenCOCO_ksplit_*.json)
python=""             # interpreter; empty: the one ../TEMPLATE/path.sh finds (the engine's --python)

# shellcheck disable=SC1091
. ./db.sh
help_message=$(cat <<HELP
Usage: $0 [--out_dir \${out_dir}] [--split_source \${split_source}] [--python \${python}]
Reads SPOKENCOCO=\${SPOKENCOCO}, MSCOCO=\${MSCOCO}, KARPATHY_SPLIT=\${KARPATHY_SPLIT} (db.sh or the
environment) and writes \${out_dir}/{train,dev,test}.
HELP
)
# shellcheck disable=SC1091
. ../../utils/parse_options.sh
if [ $# -ne 0 ]; then
    echo "$0: unexpected arguments: $*" >&2
    echo "${help_message}" >&2
    exit 2
fi
# shellcheck disable=SC1091
. ../TEMPLATE/path.sh

log "SpokenCOCO: ${SPOKENCOCO} + ${MSCOCO} (split: ${split_source}) -> ${out_dir}/{train,dev,test}"
"${python}" local/prepare_spokencoco.py --spokencoco "${SPOKENCOCO}" --mscoco "${MSCOCO}" \
    --karpathy_split "${KARPATHY_SPLIT}" --split_source "${split_source}" --out_dir "${out_dir}"
log "done"
