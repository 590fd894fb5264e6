#!/bin/bash
# An arm64 "device" on this x86 machine, for the end-to-end tests (make arm64-device, make test-e2e).
#
# A Debian arm64 root (debootstrap --arch=arm64; binaries run under qemu-user-static through binfmt_misc),
# shaped like Raspberry Pi OS 64-bit: user `pi`, python3 and a venv (~pi/venv) holding only the aarch64
# wheels of numpy and onnxruntime, fetched on this host with `pip download` and installed with --no-index.
# Its own OpenSSH server (the arm64 sshd, chrooted) listens on 127.0.0.1:PORT with its own host key.
#
#   arm64_device.sh build                    build the root once (idempotent; stages are stamped)
#   arm64_device.sh start PORT PUBKEY        mount /proc /sys /dev inside, authorise PUBKEY for pi, start sshd
#   arm64_device.sh stop PORT                stop that sshd (and its sessions); unmount when none is left
#   arm64_device.sh status                   what is built and running
#   arm64_device.sh info                     key=value facts for the tests (root, python, host key, ...)
#
# Environment: ARM64_DIR (default /var/tmp/autoseg-arm64; the root is $ARM64_DIR/root), ARM64_SUITE
# (bookworm, as Raspberry Pi OS today), ARM64_MIRROR, ARM64_PIP_PKGS (default "numpy onnxruntime"),
# HOST_PIP (a pip on this host that can download, default "python3 -m pip").
set -euo pipefail

DIR=${ARM64_DIR:-/var/tmp/autoseg-arm64}
ROOT=$DIR/root
WHEELS=$DIR/wheels
SUITE=${ARM64_SUITE:-bookworm}
MIRROR=${ARM64_MIRROR:-http://deb.debian.org/debian}
PIP_PKGS=${ARM64_PIP_PKGS:-numpy onnxruntime}
TEST_PKGS="pytest onnx"  # only in the separate test venv: the agent's own tests run on the device's python
HOST_PIP=${HOST_PIP:-python3 -m pip}
DEB_PKGS=python3,python3-venv,openssh-server,openssh-sftp-server,procps,ca-certificates
USER_NAME=pi
STATE=.autoseg  # stamps and host key, inside the root

say() { printf 'arm64-device: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

in_root() {  # run a command inside the root with a clean environment
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        chroot "$ROOT" "$@"
}

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
}

# qemu-user through binfmt_misc: the kernel hands every aarch64 binary, in the root too, to the emulator.
check_binfmt() {
    command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install -y debootstrap qemu-user-static binfmt-support"
    [ -x /usr/bin/qemu-aarch64-static ] || die "qemu-aarch64-static missing: apt-get install -y qemu-user-static binfmt-support"
    local bm=/proc/sys/fs/binfmt_misc
    if [ ! -e $bm/register ]; then
        mount -t binfmt_misc binfmt_misc $bm 2>/dev/null ||
            die "binfmt_misc cannot be mounted at $bm (a container without that privilege?): aarch64 binaries cannot run"
    fi
    if [ ! -e $bm/qemu-aarch64 ]; then
        command -v update-binfmts >/dev/null || die "update-binfmts missing: apt-get install -y binfmt-support"
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    [ -e $bm/qemu-aarch64 ] && head -1 $bm/qemu-aarch64 | grep -q enabled ||
        die "binfmt_misc has no enabled qemu-aarch64 entry (update-binfmts --enable qemu-aarch64 failed)"
    # F (fix binary): the emulator is opened at registration, so it works inside the chroot without a copy.
    grep -q '^flags:.*F' $bm/qemu-aarch64 ||
        { say "qemu-aarch64 is registered without the F flag: copying the emulator into the root";
          [ ! -d "$ROOT" ] || install -D -m 755 /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static"; }
}

stamp() { [ -f "$ROOT/$STATE/$1" ] && [ "$(cat "$ROOT/$STATE/$1")" = "$2" ]; }
set_stamp() { mkdir -p "$ROOT/$STATE"; printf '%s' "$2" >"$ROOT/$STATE/$1"; }

root_python_version() { in_root /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

build() {
    need_root
    check_binfmt
    local t0=$SECONDS
    mkdir -p "$DIR"
    if [ ! -d "$ROOT" ]; then
        # Built beside, renamed when complete: an interrupted debootstrap never looks like a root.
        rm -rf "$ROOT.partial"
        say "debootstrap $SUITE arm64 into $ROOT (several minutes under emulation)"
        debootstrap --arch=arm64 --variant=minbase --include=$DEB_PKGS "$SUITE" "$ROOT.partial" "$MIRROR" \
            >"$DIR/debootstrap.log" 2>&1 || { tail -20 "$DIR/debootstrap.log" >&2; die "debootstrap failed (log: $DIR/debootstrap.log)"; }
        mv "$ROOT.partial" "$ROOT"
    fi
    if ! stamp system 2; then
        say "user $USER_NAME, ssh host key"
        in_root /usr/bin/id -u $USER_NAME >/dev/null 2>&1 || in_root /usr/sbin/useradd -m -s /bin/bash $USER_NAME
        # Key login only, but not a locked account ('!'), which sshd refuses without PAM.
        in_root /usr/sbin/usermod -p '*' $USER_NAME
        mkdir -p "$ROOT/$STATE" "$ROOT/run/sshd"
        # Its own host key, made once: known_hosts entries stay valid across starts.
        [ -f "$ROOT/$STATE/ssh_host_ed25519_key" ] ||
            ssh-keygen -q -t ed25519 -N '' -C autoseg-arm64-device -f "$ROOT/$STATE/ssh_host_ed25519_key"
        set_stamp system 2
    fi
    local pyver
    pyver=$(root_python_version)
    local spec="python $pyver: $PIP_PKGS"
    if ! stamp venv "$spec"; then
        say "fetching aarch64 wheels for Python $pyver on the host: $PIP_PKGS"
        mkdir -p "$WHEELS/device"
        # shellcheck disable=SC2086
        $HOST_PIP download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version "$pyver" \
            --implementation cp -d "$WHEELS/device" $PIP_PKGS
        rm -rf "$ROOT/home/$USER_NAME/venv" "$ROOT/tmp/wheels"
        cp -r "$WHEELS/device" "$ROOT/tmp/wheels"
        say "installing them into ~$USER_NAME/venv inside the root (--no-index)"
        in_root /bin/su $USER_NAME -c "python3 -m venv ~/venv && ~/venv/bin/pip install -q --no-index --find-links /tmp/wheels $PIP_PKGS"
        rm -rf "$ROOT/tmp/wheels"
        set_stamp venv "$spec"
    fi
    spec="python $pyver: $PIP_PKGS $TEST_PKGS"
    if ! stamp testvenv "$spec"; then
        say "test venv (/opt/agent-tests: $PIP_PKGS $TEST_PKGS) for the agent's own tests"
        mkdir -p "$WHEELS/tests"
        # shellcheck disable=SC2086
        $HOST_PIP download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version "$pyver" \
            --implementation cp -d "$WHEELS/tests" $PIP_PKGS $TEST_PKGS
        rm -rf "$ROOT/opt/agent-tests" "$ROOT/tmp/wheels"
        cp -r "$WHEELS/tests" "$ROOT/tmp/wheels"
        # shellcheck disable=SC2086
        in_root /usr/bin/python3 -m venv /opt/agent-tests
        # shellcheck disable=SC2086
        in_root /opt/agent-tests/bin/pip install -q --no-index --find-links /tmp/wheels $PIP_PKGS $TEST_PKGS
        rm -rf "$ROOT/tmp/wheels"
        set_stamp testvenv "$spec"
    fi
    if [ $((SECONDS - t0)) -gt 5 ]; then
        printf '%s\n' "$((SECONDS - t0))" >"$DIR/build_seconds"
    fi
    # (onnxruntime's cpuinfo complains at import without /sys mounted: not shown)
    say "ready: $ROOT ($(in_root /home/$USER_NAME/venv/bin/python -c 'import numpy, onnxruntime, platform; print(platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)' 2>/dev/null))"
}

mount_all() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    local m
    for m in sys dev; do
        if ! mountpoint -q "$ROOT/$m"; then
            mount --rbind "/$m" "$ROOT/$m"
            mount --make-rslave "$ROOT/$m"  # what is mounted below it here never reaches the host's /$m
        fi
    done
    # onnxruntime's cpuinfo (aarch64 build) segfaults at import under qemu-user when it finds the CPU list in
    # /sys next to an x86 /proc/cpuinfo; without the list it warns and goes on. Thermal zones stay visible.
    local cpu=$ROOT/sys/devices/system/cpu
    mountpoint -q "$cpu" || mount -t tmpfs -o size=64k,mode=755 autoseg-no-cpu-list "$cpu"
    mkdir -p "$ROOT/run/sshd"
}

umount_all() {
    local m
    umount "$ROOT/sys/devices/system/cpu" 2>/dev/null || true
    for m in dev sys proc; do
        if mountpoint -q "$ROOT/$m"; then
            umount -R "$ROOT/$m" 2>/dev/null || umount -R -l "$ROOT/$m"
        fi
    done
}

pidfile() { echo "$ROOT/run/autoseg-sshd-$1.pid"; }

descendants() {  # all descendants of a pid, deepest last
    local kid
    for kid in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$kid"
        descendants "$kid"
    done
}

start() {
    need_root
    local port=${1:?usage: start PORT PUBKEY} pubkey=${2:?usage: start PORT PUBKEY}
    [ -f "$ROOT/$STATE/venv" ] || die "$ROOT is not built; run \`make arm64-device\` first"
    [ -f "$pubkey" ] || die "$pubkey: no such public key file"
    check_binfmt
    mount_all
    local home=$ROOT/home/$USER_NAME
    install -d -m 700 "$home/.ssh"
    touch "$home/.ssh/authorized_keys"
    grep -qxF "$(cat "$pubkey")" "$home/.ssh/authorized_keys" || cat "$pubkey" >>"$home/.ssh/authorized_keys"
    chmod 600 "$home/.ssh/authorized_keys"
    local uid
    uid=$(in_root /usr/bin/id -u $USER_NAME)
    chown -R "$uid:$uid" "$home/.ssh"
    local conf=/$STATE/sshd_config_$port
    cat >"$ROOT$conf" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey /$STATE/ssh_host_ed25519_key
PidFile /run/autoseg-sshd-$port.pid
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
UseDNS no
LoginGraceTime 120
MaxStartups 20
MaxSessions 20
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    local pf log=$DIR/sshd-$port.log
    pf=$(pidfile "$port")
    if [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null; then
        say "sshd already running on 127.0.0.1:$port (pid $(cat "$pf"))"
        return 0
    fi
    : >"$log"
    setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        chroot "$ROOT" /usr/sbin/sshd -D -e -f "$conf" </dev/null >>"$log" 2>&1 &
    local i
    for i in $(seq 1 600); do
        if grep -q "Server listening on 127.0.0.1 port $port" "$log"; then
            [ -f "$pf" ] || sleep 0.2
            say "sshd (arm64, emulated) listening on 127.0.0.1:$port; user $USER_NAME"
            return 0
        fi
        if grep -q -i "error\|fatal\|Bad configuration" "$log"; then
            break
        fi
        sleep 0.1
    done
    cat "$log" >&2
    die "sshd did not start on 127.0.0.1:$port"
}

stop() {
    need_root
    local port=${1:?usage: stop PORT} pf pid p
    pf=$(pidfile "$port")
    if [ -f "$pf" ]; then
        pid=$(cat "$pf")
        if kill -0 "$pid" 2>/dev/null; then
            # Sessions first (deepest last in the list, so kill in reverse), then the listener: by pid only.
            for p in $(descendants "$pid" | tac); do kill -9 "$p" 2>/dev/null || true; done
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pf"
    fi
    # Unmount only when no sshd of another port still runs in the root.
    local other
    for other in "$ROOT"/run/autoseg-sshd-*.pid; do
        [ -e "$other" ] && kill -0 "$(cat "$other")" 2>/dev/null && return 0
    done
    umount_all
}

status() {
    if [ -f "$ROOT/$STATE/venv" ]; then echo "built: $ROOT ($(cat "$ROOT/$STATE/venv"))"; else echo "not built: $ROOT"; fi
    local pf
    for pf in "$ROOT"/run/autoseg-sshd-*.pid; do
        [ -e "$pf" ] || continue
        if kill -0 "$(cat "$pf")" 2>/dev/null; then echo "running: $(basename "$pf" .pid) (pid $(cat "$pf"))"; fi
    done
}

info() {
    [ -f "$ROOT/$STATE/venv" ] || die "$ROOT is not built; run \`make arm64-device\` first"
    echo "root=$ROOT"
    echo "user=$USER_NAME"
    echo "python=/home/$USER_NAME/venv/bin/python"
    echo "test_python=/opt/agent-tests/bin/python"
    echo "wheels=$WHEELS/device"
    echo "host_key=$ROOT/$STATE/ssh_host_ed25519_key.pub"
    echo "build_seconds=$(cat "$DIR/build_seconds" 2>/dev/null || echo '')"
}

case "${1:-build}" in
    build) build ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    status) status ;;
    info) info ;;
    *) die "unknown command ${1}; use build, start PORT PUBKEY, stop PORT, status or info" ;;
esac
