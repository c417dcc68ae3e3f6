# shellcheck shell=bash
# The recipes' environment (ESPnet's path.sh does the same job): which Python runs the toolkit.
# Sourced, not run, by every recipe script that starts Python, after it has parsed its options:
#     . ../TEMPLATE/path.sh        (from a recipe dir; egs/TEMPLATE may be reached through a symlink)
#
# In:  python               the command to use, if set and not empty (a script's --python option)
#      SPEECHCLIP_PYTHON    the command a parent script chose (the engine exports it to local/data.sh)
# Else the first of these that has the toolkit's dependencies (torch, torchaudio, open_clip, s3prl, ...):
#      the active virtualenv or conda env ($VIRTUAL_ENV, $CONDA_PREFIX), <repo>/.venv/bin/python (what
#      `make setup` creates), python3 on PATH.
# Out: python (the command), exported as SPEECHCLIP_PYTHON and PYTHON (utils/*.sh read PYTHON);
#      PYTHONPATH with this checkout first, so a recipe runs the speechclip_plus it belongs to;
#      PATH with the chosen environment's bin/ first when it was found automatically.
# When no usable interpreter is found it prints one line saying what to run, and exits 1.

_sp_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
case ":${PYTHONPATH:-}:" in
    *":${_sp_root}:"*) ;;
    *) export PYTHONPATH="${_sp_root}${PYTHONPATH:+:${PYTHONPATH}}" ;;
esac

# _sp_usable <interpreter>: it finds speechclip_plus and the libraries it needs (find_spec: nothing imported).
_sp_usable() {
    command -v "$1" >/dev/null 2>&1 || return 1
    "$1" -c 'import importlib.util as u, sys
mods = ("speechclip_plus", "torch", "torchaudio", "open_clip", "s3prl", "soundfile", "yaml", "kaldiio",
        "sentencepiece")
sys.exit(0 if all(u.find_spec(m) is not None for m in mods) else 1)' >/dev/null 2>&1
}

if [ -n "${python:-}" ]; then
    # Given explicitly: a multi-word command ("coverage run") is taken as it is; one word must be usable.
    if [[ "${python}" != *" "* ]] && ! _sp_usable "${python}"; then
        echo "path.sh: --python ${python} cannot import speechclip_plus and its dependencies;" \
            "run 'make setup' in ${_sp_root} and drop --python, or give an interpreter that has them" >&2
        exit 1
    fi
elif [ -n "${SPEECHCLIP_PYTHON:-}" ]; then
    python=${SPEECHCLIP_PYTHON}
else
    _sp_tried=()
    for _sp_cand in ${VIRTUAL_ENV:+"${VIRTUAL_ENV}/bin/python"} ${CONDA_PREFIX:+"${CONDA_PREFIX}/bin/python"} \
            "${_sp_root}/.venv/bin/python" python3; do
        _sp_tried+=("${_sp_cand}")
        if _sp_usable "${_sp_cand}"; then
            python=${_sp_cand}
            break
        fi
    done
    if [ -z "${python:-}" ]; then
        echo "path.sh: no Python with speechclip_plus's dependencies (tried ${_sp_tried[*]}):" \
            "run 'make setup' in ${_sp_root} (it creates ${_sp_root}/.venv), or pass --python" >&2
        exit 1
    fi
    if [ "${python}" != python3 ]; then
        _sp_bin=$(dirname "${python}")
        case ":${PATH}:" in
            *":${_sp_bin}:"*) ;;
            *) export PATH="${_sp_bin}:${PATH}" ;;
        esac
    fi
    unset _sp_tried _sp_cand _sp_bin
fi
export SPEECHCLIP_PYTHON="${python}" PYTHON="${python}"
unset _sp_root
unset -f _sp_usable
