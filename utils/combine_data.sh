#!/usr/bin/env bash
# Combine data dirs into one (utterance ids must be unique; shared image ids must share the path).
set -euo pipefail

usage="Usage: $0 <dest-data-dir> <src-data-dir> [<src-data-dir> ...]
utt2dur is kept only if every source has one.
Environment: PYTHON (default python3)."

if [ $# -lt 2 ] || [ "$1" = --help ] || [ "$1" = -h ]; then
    echo "${usage}"
    case "${1:-}" in --help|-h) exit 0 ;; esac
    exit 2
fi
exec "${PYTHON:-python3}" -m speechclip_plus.data.datadir combine "$@"
