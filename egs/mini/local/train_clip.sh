#!/usr/bin/env bash
# Train the mini recipe's tiny teacher CLIP (local/train_clip.py) on data/train; evaluate on dev and test.
# Every option except --python goes to train_clip.py unchanged (see --help); it skips when
# <exp_dir>/.done exists. Outputs: exp/clip_mini/{clip.pt,clip_mini.json,metrics.json,train.log}.
set -euo pipefail

python=python3  # interpreter with torch and open_clip

local_dir=$(cd "$(dirname "$0")" && pwd)
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python)
      if [ $# -lt 2 ]; then echo "$0: option --python needs a value" >&2; exit 2; fi
      python=$2
      shift 2 ;;
    --help|-h)
      echo "Usage: $0 [--python CMD ($python)] [train_clip.py options]"
      exec "$python" "$local_dir/train_clip.py" --help ;;
    *) args+=("$1"); shift ;;
  esac
done

HF_HUB_OFFLINE=1 exec "$python" "$local_dir/train_clip.py" "${args[@]}"
