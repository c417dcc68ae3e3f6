#!/usr/bin/env bash
# Parse "--name value" / "--name=value" command-line options into existing shell variables.
#
# Source it after setting the defaults (one variable per option) and, optionally, help_message:
#     stage=0        # first stage to run
#     . utils/parse_options.sh
# Dashes in option names map to underscores (--stop-stage sets stop_stage). Only variables that already
# exist can be set, so a typo is an error, not a silent new variable. "--help" / "-h" prints $help_message
# (variables in it expanded to their current values), then exits 0. Positional arguments are left in "$@".

_po_usage() {
    # help_message may reference option variables ("--stage \${stage}"): they show their current values.
    [ -n "${help_message:-}" ] || return 0
    eval "cat <<_PO_HELP_EOF_
${help_message}
_PO_HELP_EOF_"
}

_po_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h)
            _po_usage
            exit 0 ;;
        --*=*)
            _po_name="${1%%=*}"; _po_value="${1#*=}"; shift ;;
        --*)
            _po_name="$1"
            if [ $# -lt 2 ]; then
                echo "$0: option $1 needs a value" >&2
                exit 2
            fi
            _po_value="$2"; shift 2 ;;
        *)
            _po_args+=("$1"); shift; continue ;;
    esac
    _po_var="${_po_name#--}"
    _po_var="${_po_var//-/_}"
    if ! [[ "${_po_var}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ -z "${!_po_var+set}" ]; then
        echo "$0: unknown option ${_po_name} (see --help)" >&2
        exit 2
    fi
    printf -v "${_po_var}" '%s' "${_po_value}"
done
set -- "${_po_args[@]+"${_po_args[@]}"}"
unset _po_name _po_value _po_var _po_args
