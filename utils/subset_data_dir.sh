#!/usr/bin/env bash
# Copy a subset of the utterances of a data dir (img.scp keeps only the images used; spk2utt rebuilt).
set -euo pipefail

usage="Usage: $0 <selection> <src-data-dir> <dest-data-dir>
  selection (one of):
    --utt-list <file>   utterances listed in <file> (first field)
    --spk-list <file>   utterances of the speakers listed in <file>
    --first <n>         first n utterances (LC_ALL=C order)
    --last <n>          last n utterances
    --random <n>        n utterances at random (--seed <s>, default 0)
    --shortest <n>      n shortest utterances (needs utt2dur)
Environment: PYTHON (default python3)."

if [ $# -eq 0 ] || [ "$1" = --help ] || [ "$1" = -h ]; then
    echo "${usage}"
    [ $# -eq 0 ] && exit 2
    exit 0
fi
exec "${PYTHON:-python3}" -m speechclip_plus.data.datadir subset "$@"
