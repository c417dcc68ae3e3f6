#!/usr/bin/env bash
# Check Kaldi-style data dirs; print each problem as "file:line: key: what". Exit 1 if any.
# The checks are speechclip_plus.data.datadir.validate_data_dir (python -m speechclip_plus.bin.validate_data).
set -euo pipefail

usage="Usage: $0 [--no-check-files] <data-dir> [<data-dir> ...]
  --no-check-files   do not check that audio/image files exist
Environment: PYTHON (default python3) runs the checker."

if [ $# -eq 0 ] || [ "$1" = --help ] || [ "$1" = -h ]; then
    echo "${usage}"
    [ $# -eq 0 ] && exit 2
    exit 0
fi
exec "${PYTHON:-python3}" -m speechclip_plus.bin.validate_data "$@"
