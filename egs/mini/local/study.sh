#!/usr/bin/env bash
# The claims study of egs/mini (README.md, "The claims study"): every run it compares, 3 seeds each, two runs at a
# time (one torch thread each), per-term gradient norms logged, summary and verdicts in RESULTS.md. Extra options
# go to ./run.sh (e.g. --stage 5 to rescore and summarise finished runs). Runs already trained are skipped, so an
# interrupted study resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="hplus p p_ctl c cplus cplus_dur cplus_ref hplus_pbt"
exec ./run.sh --variants "${runs}" --seeds "1 2 3" --jobs 2 --results RESULTS.md \
    --train_args "--train.log_grad_norms true" "$@"
