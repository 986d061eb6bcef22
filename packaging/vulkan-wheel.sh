#!/bin/sh
# Build llama-cpp-python with llama.cpp's Vulkan backend, once per machine, and print the folder
# to put on PYTHONPATH (the venv keeps its CPU build), or with --env the shell lines that set up
# the software Vulkan device (llvmpipe) for it:
#
#   eval "$(sh packaging/vulkan-wheel.sh --env)" && .venv/bin/python -m pytest -q -m gpu
#
# Debian 12 (root, apt): installs the Vulkan loader, Mesa's drivers (llvmpipe: a software Vulkan
# device) and the shader compilers if missing. Debian 12's Vulkan headers (1.3.239) are too old for
# ggml-vulkan.cpp ('LayerSettingEXT' is not a member of 'vk'), so the headers of Debian 13's
# libvulkan-dev are fetched with apt-get download from a private apt state folder (the system's
# apt sources are not touched) and unpacked into the cache.
#
# Portable across x86-64 hosts with AVX2 (GGML_NATIVE=OFF): no AVX512 kernels (hosts without it
# would die with SIGILL) and no AMX kernels (llama.cpp issue 20824; edgelora's CPU probe still
# decides the remaining extra buffers per host).
#
# Cached in $EDGELORA_VULKAN_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/edgelora/vulkan-wheel),
# one folder per llama-cpp-python version + build flags: the wheel, build.json (build time, wheel
# size) and site/ (the installed package). A later run finds site/.complete and prints it at once.
# Everything but the site folder goes to stderr and to build.log in that folder.
set -eu
mode=${1:-site}
case $mode in site|--env) ;; *) echo "usage: sh packaging/vulkan-wheel.sh [--env]" >&2; exit 2 ;; esac

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-$root/.venv/bin/python}
version=${LLAMA_CPP_PYTHON_VERSION:-$("$python" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))" 2>/dev/null || echo 0.3.36)}
flags="-DGGML_VULKAN=on -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
key="$version-$(printf %s "$flags" | sha256sum | cut -c1-12)"
top=${EDGELORA_VULKAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora/vulkan-wheel}
cache="$top/$key"

# What this script prints: the site folder, or (--env) the environment that uses it.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }  # safe to eval, whatever the path holds
finish() {
    if [ "$mode" = --env ]; then
        printf 'export PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}\n' "$(quote "$cache/site")"
        echo "export GGML_VK_VISIBLE_DEVICES=0"  # llama.cpp skips CPU-type Vulkan devices unless named
        if [ -f "$top/mesa/lvp_icd.json" ]; then
            printf 'export VK_ICD_FILENAMES=%s\n' "$(quote "$top/mesa/lvp_icd.json")"
            # LLVM's optimisation of ggml's matmul shaders takes Mesa 25's llvmpipe ~100 s per shader
            # variant (the first 9-token prompt); without it 5.5 s, and decoding is as fast.
            echo "export GALLIVM_PERF=no_opt"
        fi
        echo "export EDGELORA_REQUIRE_GPU=1"  # the gpu tests fail, not skip, if no device shows up
    else
        echo "$cache/site"
    fi
    exit 0
}

bookworm() { grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; }
if [ -f "$cache/site/.complete" ] && { [ -f "$top/mesa/lvp_icd.json" ] || ! bookworm; }; then
    echo "vulkan-wheel: reusing $cache" >&2
    finish
fi

mkdir -p "$cache"
log="$cache/build.log"
say() { echo "vulkan-wheel: $*" | tee -a "$log" >&2; }

# 1. System packages (Debian 12): loader, llvmpipe, shader compilers.
packages="libvulkan-dev glslc glslang-tools spirv-headers mesa-vulkan-drivers vulkan-tools"
missing=""
for p in $packages; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "cannot install$missing here (needs root and apt-get: Debian 12): install them first"
        # --env: the test command goes on; the gpu tests then skip and say why
        [ "$mode" = --env ] && exit 0
        exit 2
    fi
    say "installing$missing"
    apt-get update -q >>"$log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >>"$log" 2>&1
fi

# 2. Newer Vulkan headers (Debian 13's libvulkan-dev), from a private apt state folder.
headers="$top/headers"
if [ ! -f "$headers/usr/include/vulkan/vulkan.hpp" ]; then
    apt=$(mktemp -d)
    mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" >"$apt/sources.list"
    opts="-o Dir::Etc::sourcelist=$apt/sources.list -o Dir::Etc::sourceparts=/nonexistent -o Dir::State=$apt/state -o Dir::Cache=$apt/cache -o Dir::State::status=/var/lib/dpkg/status"
    say "fetching Debian 13 libvulkan-dev headers (private apt state in $apt)"
    apt-get $opts update -q >>"$log" 2>&1
    (cd "$apt" && apt-get $opts download libvulkan-dev >>"$log" 2>&1)
    rm -rf "$headers.tmp" && dpkg -x "$apt"/libvulkan-dev_*.deb "$headers.tmp"
    rm -rf "$headers" && mv "$headers.tmp" "$headers"
    basename "$apt"/libvulkan-dev_*.deb >"$headers/deb"
    rm -rf "$apt"
fi
say "headers: $(cat "$headers/deb" 2>/dev/null || echo "$headers")"

# 2b. A newer Mesa for the software device. Mesa 22.3.6 (Debian 12) llvmpipe corrupts its heap in
# its queue thread in the first decode after llama.cpp rebuilds its compute buffers (every adapter
# switch): SIGSEGV or a glibc abort in about 1 switch in 7. Mesa 25.0.7 from bookworm-backports
# (built for Debian 12, same LLVM 15) ran 84 switches without one. Unpacked into the cache and
# used through VK_ICD_FILENAMES (--env); the system's Mesa is not touched.
mesa="$top/mesa"
if [ ! -f "$mesa/lvp_icd.json" ] && bookworm; then
    apt=$(mktemp -d)
    mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" >"$apt/sources.list"
    opts="-o Dir::Etc::sourcelist=$apt/sources.list -o Dir::Etc::sourceparts=/nonexistent -o Dir::State=$apt/state -o Dir::Cache=$apt/cache -o Dir::State::status=/var/lib/dpkg/status"
    say "fetching Mesa's Vulkan drivers from bookworm-backports (private apt state in $apt)"
    apt-get $opts update -q >>"$log" 2>&1
    (cd "$apt" && apt-get $opts download mesa-vulkan-drivers >>"$log" 2>&1)
    rm -rf "$mesa.tmp" && dpkg -x "$apt"/mesa-vulkan-drivers_*.deb "$mesa.tmp"
    lvp=$(find "$mesa.tmp" -name libvulkan_lvp.so | head -1)
    mkdir -p "$mesa.tmp/lib" && mv "$lvp" "$mesa.tmp/lib/" && rm -rf "$mesa.tmp/usr" "$mesa.tmp/etc"
    printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.4.305"}}\n' "$mesa/lib/libvulkan_lvp.so" >"$mesa.tmp/lvp_icd.json"
    basename "$apt"/mesa-vulkan-drivers_*.deb >"$mesa.tmp/deb"
    rm -rf "$mesa" && mv "$mesa.tmp" "$mesa"
    rm -rf "$apt"
fi
[ -f "$mesa/deb" ] && say "software device: $(cat "$mesa/deb")"

# 3. The wheel: built once, shrunk (each library stored once or twice, not three times).
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    build=$(mktemp -d)
    say "building llama-cpp-python $version with $flags (log: $log; ~30 min on 2 busy cores)"
    start=$(date +%s)
    (cd "$build" && "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d . >>"$log" 2>&1)
    CMAKE_ARGS="$flags -DVulkan_INCLUDE_DIR=$headers/usr/include" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        nice -n 10 "$python" -m pip wheel -v --no-deps -w "$build/out" "$build"/llama_cpp_python-"$version".tar.gz >>"$log" 2>&1
    seconds=$(( $(date +%s) - start ))
    built=$(ls "$build"/out/*.whl)
    wheel="$cache/$(basename "$built")"
    "$python" "$here/shrink_wheel.py" wheel "$built" "$wheel.tmp"
    printf '{"version": "%s", "flags": "%s", "headers": "%s", "build_s": %s, "wheel_bytes_built": %s, "wheel_bytes": %s, "cores": %s, "cpu": "%s", "when": "%s"}\n' \
        "$version" "$flags" "$(cat "$headers/deb")" "$seconds" "$(wc -c <"$built")" "$(wc -c <"$wheel.tmp")" "$(nproc)" \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$cache/build.json"
    mv "$wheel.tmp" "$wheel"
    rm -rf "$build"
    say "built in ${seconds} s: $(cat "$cache/build.json")"
fi

# 4. Installed beside the venv, not into it.
rm -rf "$cache/site"
"$python" -m pip install -q --no-deps --no-index --target "$cache/site" "$wheel" >>"$log" 2>&1
"$python" "$here/shrink_wheel.py" link "$cache/site/llama_cpp/lib" 2>>"$log"
touch "$cache/site/.complete"
finish
