#!/usr/bin/env bash
# Repair a data dir in place: sort every file, drop malformed lines and utterances missing from a file,
# with an empty caption or an unknown image; rebuild spk2utt. Originals are copied to <dir>/.backup/; every
# dropped utterance is listed with its reason in <dir>/excluded.txt.
set -euo pipefail

usage="Usage: $0 [--check-files] <data-dir>
  --check-files   also drop utterances whose audio or image file does not exist
Originals go to <data-dir>/.backup/; dropped utterances and reasons are listed in <data-dir>/excluded.txt.
Environment: PYTHON (default python3)."

if [ $# -eq 0 ] || [ "$1" = --help ] || [ "$1" = -h ]; then
    echo "${usage}"
    [ $# -eq 0 ] && exit 2
    exit 0
fi
exec "${PYTHON:-python3}" -m speechclip_plus.data.datadir fix "$@"
