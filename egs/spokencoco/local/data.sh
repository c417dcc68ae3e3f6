#!/usr/bin/env bash
# Stage 0 of egs/spokencoco: $SPOKENCOCO (SpokenCOCO.tar.gz unpacked), $MSCOCO (train2014/, val2014/) and the
# Karpathy split $KARPATHY_SPLIT (see db.sh) -> data/{train,dev,test} Kaldi data dirs (train = Karpathy
# train + restval, dev = val, test = test). Layout, ids and the faults that stop this stage (or, with
# --skip_bad true, are excluded and listed in data/<set>/excluded.txt) are documented in
# local/prepare_spokencoco.py.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (local/data.sh) $*"; }

out_dir=data          # parent of the data dirs (relative to the recipe dir)
split_source=auto     # auto | karpathy (dataset_coco.json) | ksplit (SpokenCOCO_ksplit_*.json)
skip_bad=false        # true: leave out faulty wavs, images and captions (listed) instead of stopping
nj=2                  # processes for checking every wav header and image
encoding=utf-8        # encoding of the json files
python=""             # interpreter; empty: the one ../TEMPLATE/path.sh finds (the engine's --python)

# shellcheck disable=SC1091
. ./db.sh
help_message=$(cat <<HELP
Usage: $0 [--out_dir \${out_dir}] [--split_source \${split_source}] [--skip_bad \${skip_bad}] [--nj \${nj}]
          [--encoding \${encoding}] [--python \${python}]
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
    --karpathy_split "${KARPATHY_SPLIT}" --split_source "${split_source}" --out_dir "${out_dir}" \
    --skip_bad "${skip_bad}" --nj "${nj}" --encoding "${encoding}"
log "done"
