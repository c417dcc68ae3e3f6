#!/usr/bin/env bash
# Stage 0 of egs/flickr8k: $FLICKR8K (the unpacked Flickr8k + Flickr Audio archives, see db.sh) ->
# data/{train,dev,test} Kaldi data dirs. The layout, the pairing rules, the known quirks of the distribution
# (skipped, listed in data/local/skipped.tsv) and the faults that stop this stage (or, with --skip_bad true,
# are excluded and listed in data/<set>/excluded.txt) are documented in local/prepare_flickr8k.py.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (local/data.sh) $*"; }

out_dir=data          # parent of the data dirs (relative to the recipe dir)
skip_bad=false        # true: leave out faulty wavs, images and captions (listed) instead of stopping
nj=2                  # processes for checking every wav header and image
encoding=utf-8        # encoding of the corpus's text files
python=""             # interpreter; empty: the one ../TEMPLATE/path.sh finds (the engine's --python)

# shellcheck disable=SC1091
. ./db.sh
help_message=$(cat <<HELP
Usage: $0 [--out_dir \${out_dir}] [--skip_bad \${skip_bad}] [--nj \${nj}] [--encoding \${encoding}]
          [--python \${python}]
Reads FLICKR8K (db.sh or the environment; now \${FLICKR8K}) and writes \${out_dir}/{train,dev,test}.
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

log "Flickr8k: ${FLICKR8K} -> ${out_dir}/{train,dev,test}"
"${python}" local/prepare_flickr8k.py --root "${FLICKR8K}" --out_dir "${out_dir}" --skip_bad "${skip_bad}" \
    --nj "${nj}" --encoding "${encoding}"
log "done"
