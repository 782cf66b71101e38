# Shared by the install-*.sh scripts: a side virtual environment `$venv`, made once and stamped.
# The caller sets `venv`, `stamp_file`, `stamp` and `name` (its log prefix), then calls `venv_up_to_date MODULE`
# (exits 0 when the stamp matches and MODULE imports) and `venv_create`; `pip` runs that venv's pip.

python="${PYTHON:-python3}"

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$name" -1 "$*"; }

venv_up_to_date() {
    if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] \
        && "$venv/bin/python" -c "import $1" >/dev/null 2>&1; then
        log "already installed in $venv ($stamp); nothing to do"
        exit 0
    fi
}

venv_create() {
    rm -f "$stamp_file"
    mkdir -p "$(dirname "$venv")"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating virtual environment $venv with $("$python" --version 2>&1)"
        "$python" -m venv "$venv"
    fi
    export PIP_NO_INPUT=1
}

# pip, without the one warning line per package for index folders this machine's pip.conf names but lacks.
pip() {
    "$venv/bin/python" -m pip --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
