#!/usr/bin/env bash
# Create a new recipe skeleton: egs/TEMPLATE/setup.sh egs/<corpus>
# Makes <dir>/run.sh (thin: calls the shared stage engine), <dir>/conf/ (copies of the package's model
# configs to start from), <dir>/local/data.sh (a stub you replace: it must write data/<set>/ Kaldi dirs),
# and <dir>/db.sh (corpus locations). Existing files are never overwritten.
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
# Recipe for ${name}: corpus options only; the stages live in ${rel}/speechclip.sh.
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

chmod +x "${dir}/run.sh" "${dir}/local/data.sh"
for conf in "${confs[@]}"; do
    write "${dir}/conf/$(basename "${conf}")" "$(cat "${conf}")"
done
echo "Next: write ${dir}/local/data.sh, then run ${dir}/run.sh"
