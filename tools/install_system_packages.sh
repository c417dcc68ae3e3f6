#!/usr/bin/env bash
# Installs the system tools the recipes and tests use (espeak-ng, sox, shellcheck) when missing.
# As root it runs apt-get; otherwise it prints the command to run.
set -euo pipefail

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v sox >/dev/null 2>&1 || missing+=(sox)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "Missing system packages: ${missing[*]}. Install them with:" >&2
    echo "    sudo apt-get install -y ${missing[*]}" >&2
    echo "(tests that need them are skipped outside CI)" >&2
fi
