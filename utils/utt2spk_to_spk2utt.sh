#!/usr/bin/env bash
# utt2spk -> spk2utt: "<spk> <utt1> <utt2> ..." per speaker, speakers and utterances in LC_ALL=C order.
#   utils/utt2spk_to_spk2utt.sh data/train/utt2spk > data/train/spk2utt
#   utils/utt2spk_to_spk2utt.sh < data/train/utt2spk > data/train/spk2utt
set -euo pipefail

if [ $# -gt 1 ] || [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
    echo "Usage: $0 [<utt2spk>]  (reads stdin without an argument; writes spk2utt to stdout)"
    case "${1:-}" in --help|-h) exit 0 ;; esac
    exit 2
fi
input=${1:--}
if [ "${input}" != - ] && [ ! -f "${input}" ]; then
    echo "$0: ${input}: file not found" >&2
    exit 1
fi

export LC_ALL=C
# Sort by utterance, group by speaker, then sort the speaker lines.
sort -k1,1 "${input}" | tr -d '\r' | awk '
    NF == 0 { next }
    NF != 2 { printf("utt2spk line %d: expected \"<utt> <spk>\", got: %s\n", NR, $0) > "/dev/stderr"; bad = 1; exit 1 }
    !($2 in utts) { order[++n] = $2; utts[$2] = $1; next }
    { utts[$2] = utts[$2] " " $1 }
    END { if (bad) exit 1; for (i = 1; i <= n; i++) print order[i], utts[order[i]] }
' | sort -k1,1
