#!/usr/bin/env bash
# The Raspberry Pi path, checked on an x86 machine: an emulated aarch64 Debian
# bookworm (the base of Raspberry Pi OS 64-bit), the project installed there without
# torch, the no-torch tests with the JIT on, `finetune --quick` to a saved adapter
# and `generate` with it. Each step prints its result, wall time and peak RSS.
#
#   sudo nice -n 19 benchmarks/arm64_check.sh                    # every step
#   sudo nice -n 19 benchmarks/arm64_check.sh install finetune   # only these (the root is kept)
#
# Steps: host (qemu-user-static, debootstrap, binfmt), rootfs (debootstrap --foreign,
# then the second stage inside), install (venv, pip install -e . from PyPI, no torch),
# tests, finetune, generate. Needs root, Debian's apt and PyPI. The root lives in
# $ARM64_ROOT (default /var/tmp/minilars-arm64) and is reused when it is already
# built; the project is copied in afresh at `install`. Peak RSS is that of the
# largest process, measured by the host's /usr/bin/time -v around the chroot, so it
# includes qemu's own memory (tens of MiB). Under emulation everything runs 10-30x
# slower than on a Pi, and numba's compile is slower still.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ARM64_ROOT:-/var/tmp/minilars-arm64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MODEL=${MINILARS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minilars}/SmolLM2-135M-Instruct.Q4_1.gguf
STEPS=(host rootfs install tests finetune generate)
WANTED=" ${*:-${STEPS[*]}} "
TIMES=$(mktemp)
FAILED=0

say() { printf '%s\n' "$*"; }

# step NAME CMD...: run, then print "== NAME: ok|FAILED (rc N), wall W s, peak RSS R MiB"
step() {
    local name=$1; shift
    say "== $name: $(date -u +%H:%M:%S) UTC, running: $*"
    /usr/bin/time -f '%e %M' -o "$TIMES" bash -c "$*"  # the steps are exported functions
    local rc=$?
    local wall rss
    read -r wall rss < <(tail -n 1 "$TIMES")
    local verdict=ok
    if [ "$rc" -ne 0 ]; then verdict="FAILED (rc $rc)"; FAILED=1; fi
    say "== $name: $verdict, wall ${wall} s, peak RSS $((rss / 1024)) MiB"
    return "$rc"
}

in_root() {  # a login-like shell inside the root, with the venv on PATH
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 /bin/bash -o pipefail -e -c "$1"
}

mount_root() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # the host's CA bundle (it may hold a proxy's CA that the root's does not)
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true
}
unmount_root() {
    for m in dev proc; do mountpoint -q "$ROOT/$m" && umount "$ROOT/$m"; done
    return 0
}
trap unmount_root EXIT

wanted() { [[ "$WANTED" == *" $1 "* ]]; }  # was step $1 asked for?

host_setup() {
    command -v debootstrap >/dev/null && [ -e /usr/bin/qemu-aarch64-static ] && [ -x /usr/bin/time ] || {
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap \
            binfmt-support time; } || return 1
    apt-cache policy qemu-user-static debootstrap | grep -E '^[a-z]|Installed'
    # binfmt_misc lets the kernel run aarch64 binaries through qemu by itself, child
    # processes included (debootstrap's second stage and pip start many)
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
    if ! grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        say "binfmt_misc is not available here: an emulated Debian needs it for every process it starts" \
            "(qemu-aarch64-static alone runs one binary, not a system); run this on a host or container that" \
            "may register it (docker run --privileged)"
        return 1
    fi
    say "binfmt: $(head -n 2 /proc/sys/fs/binfmt_misc/qemu-aarch64 | tr '\n' ' ')"
}

build_rootfs() {
    if [ -e "$ROOT/.minilars-built" ]; then say "reusing $ROOT"; return 0; fi
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    # minbase: no libgomp1, as on a minimal image; the check then sees numba without OpenMP
    debootstrap --arch arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT" "$MIRROR" || return 1
    chroot "$ROOT" /debootstrap/debootstrap --second-stage || return 1
    touch "$ROOT/.minilars-built"
}

install_project() {
    mount_root
    rm -rf "$ROOT/opt/minilars" && mkdir -p "$ROOT/opt/minilars"
    tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs --exclude='__pycache__' \
        --exclude='*.egg-info' -cf - . | tar -C "$ROOT/opt/minilars" -xf -
    mkdir -p "$ROOT/root/.cache/minilars"
    [ -e "$ROOT/root/.cache/minilars/$(basename "$MODEL")" ] || cp "$MODEL" "$ROOT/root/.cache/minilars/" || return 1
    in_root 'set -e; uname -m; python3 --version
        [ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
        pip install -q -e /opt/minilars pytest hypothesis
        if python -c "import torch" 2>/dev/null; then echo "torch is installed: this check is for no torch"; exit 1; fi
        pip list 2>/dev/null | grep -iE "^(numpy|numba|llvmlite|scipy|tokenizers|gguf) "
        ls /usr/lib/aarch64-linux-gnu/libgomp.so.1 2>/dev/null || echo "no libgomp1 (OpenMP) installed"'
}

run_tests() {
    mount_root
    # numba's JIT on (NUMBA_DISABLE_JIT unset), a cold kernel cache
    in_root 'cd /opt/minilars && rm -rf /root/.cache/minilars/numba && python -W error::RuntimeWarning:minilars.backends.numba_backend -m pytest -x -q -p no:cacheprovider -m "not real_model" \
        tests/test_backend_numba.py tests/test_ops_gradients.py tests/test_lars_guarantees.py tests/test_store.py'
}

run_finetune() {
    mount_root
    in_root 'cd /root && rm -rf pi-run && minilars finetune --quick --backend numba --no-progress --output pi-run 2>&1 \
        | tee finetune.log; test -s pi-run/adapter_model.safetensors; echo "adapter saved: $(ls pi-run)"
        ! grep -n "Warning" finetune.log'
}

run_generate() {
    mount_root
    in_root 'cd /root && minilars generate --adapter pi-run --backend numba --max-new-tokens 24 \
        "What is the capital of France?" 2>&1 | tee generate.log; ! grep -n "Warning" generate.log'
}

for s in "$@"; do
    [[ " ${STEPS[*]} " == *" $s "* ]] || { say "unknown step $s; steps: ${STEPS[*]}"; exit 2; }
done
export REPO ROOT MIRROR MODEL
export -f say in_root mount_root unmount_root host_setup build_rootfs install_project run_tests run_finetune run_generate
say "arm64 check of $REPO ($(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null)), $(date -u '+%Y-%m-%d %H:%M UTC')"
say "host: $(nproc) cores, $(uptime)"
wanted host && { step host host_setup || exit 1; }
wanted rootfs && { step rootfs build_rootfs || exit 1; }
wanted install && { step install install_project || exit 1; }
wanted tests && step tests run_tests
wanted finetune && step finetune run_finetune
wanted generate && step generate run_generate
say "== arm64 check: $([ "$FAILED" = 0 ] && echo PASSED || echo FAILED), $(date -u '+%H:%M UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$FAILED"
