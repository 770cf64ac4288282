#!/usr/bin/env bash
# An emulated cluster on one machine: NODES Linux network namespaces ("nodes"), each joined to
# a bridge by a veth pair whose rate is limited in both directions (tc tbf), then
# RANKS_PER_NODE ranks of PROGRAM on every node. Ranks on one node talk over shared memory,
# ranks on different nodes over TCP through the limited links, as on a real cluster.
#
#   LINK_RATE=1gbit bash launch/emulated_cluster.sh NODES RANKS_PER_NODE PROGRAM [ARGS...]
#
# PROGRAM is a script path or "-m module", run with the venv's Python on every rank.
# Environment:
#   LINK_RATE          rate of every link, each direction, in tc's syntax (default 1gbit)
#   LINK_BURST         tbf bucket size, in tc's syntax (default 256kb)
#   EMULATED_LAUNCHER  mpirun (default), horovodrun (MPI mode), horovodrun-gloo, or torchrun (the
#                      torch.distributed engine: one torchrun per node, its rendezvous at node0)
#   OMP_NUM_THREADS    threads per rank (default 1)
#   MPIRUN_EXTRA       more mpirun flags (mpirun launcher)
#   HOROVODRUN_EXTRA   more horovodrun flags (horovodrun launchers)
# Exit status: the launcher's (non-zero if any rank fails); 2 for bad usage; 3 when this
# machine cannot host the emulator (not root, no network namespaces, no tbf, no sshd).
#
# What it emulates, and what not:
#   - link rates: yes (tbf on both ends of every node's link, each direction);
#   - latency: no (netem is not available everywhere; tbf adds only queueing delay);
#   - separate cores: no. Every node shares this machine's cores, so the ranks must not
#     busy-poll while they wait: mpirun and horovodrun in MPI mode run Open MPI with
#     mpi_yield_when_idle=1 (what --oversubscribe sets on one host), since the hostfile gives
#     every node slots of its own and Open MPI would otherwise spin on the shared cores.
#     Gloo mode (horovodrun-gloo, and torchrun's torch.distributed Gloo) has no such setting;
#     see BENCHMARKS.md for what it measures.
#
# Only addresses in 198.18.0.0/15 (RFC 2544, benchmarking) are used: one free /24 per run,
# nodes at .1, .2, ..., the root namespace's end of the bridge at .254, so that the launcher
# and its daemons reach the nodes. Nothing else on the machine's network is touched. On every
# exit, Ctrl-C included, the ranks are stopped and every namespace, link, bridge and qdisc of
# the run is removed.
set -euo pipefail

usage() {
    echo "usage: [LINK_RATE=1gbit] [EMULATED_LAUNCHER=mpirun|horovodrun|horovodrun-gloo|torchrun] $0 NODES RANKS_PER_NODE PROGRAM [ARGS...]" >&2
    exit 2
}
say() { echo "[emulated-cluster] $*" >&2; }
refuse() { echo "[emulated-cluster] cannot run here: $*" >&2; exit 3; }

[ $# -ge 3 ] || usage
NODES=$1; RANKS_PER_NODE=$2; shift 2
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] && [ "$NODES" -le 200 ] || { echo "NODES must be an integer in 1..200, got '$NODES'" >&2; usage; }
[[ "$RANKS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || { echo "RANKS_PER_NODE must be an integer >= 1, got '$RANKS_PER_NODE'" >&2; usage; }
LINK_RATE=${LINK_RATE:-1gbit}
LINK_BURST=${LINK_BURST:-256kb}
LAUNCHER=${EMULATED_LAUNCHER:-mpirun}
case "$LAUNCHER" in mpirun|horovodrun|horovodrun-gloo|torchrun) ;; *) echo "EMULATED_LAUNCHER must be mpirun, horovodrun, horovodrun-gloo or torchrun, got '$LAUNCHER'" >&2; usage ;; esac
NP=$((NODES * RANKS_PER_NODE))

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
AGENT=$ROOT/launch/emulated_node.sh

# ---------------------------------------------------------------- can this machine host it?
[ "$(id -u)" = 0 ] || refuse "it must run as root (it creates network namespaces, veth pairs, a bridge and tc qdiscs)"
for tool in ip tc unshare; do
    command -v "$tool" >/dev/null || refuse "'$tool' is not installed (Debian: apt-get install iproute2 util-linux)"
done
if [ "$LAUNCHER" = mpirun ]; then
    command -v mpirun >/dev/null || refuse "mpirun is not on PATH: run launch/setup.sh first"
elif [ "$LAUNCHER" = torchrun ]; then
    TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
    [ -x "$TORCHRUN" ] || refuse "torchrun not found next to $PY: run launch/setup.sh first"
else
    HOROVODRUN=${HOROVODRUN:-$(dirname "$PY")/horovodrun}
    [ -x "$HOROVODRUN" ] || refuse "horovodrun not found next to $PY: run launch/setup.sh first"
    command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || refuse "the ssh client is not installed (Debian: apt-get install openssh-client)"
    if [ ! -x /usr/sbin/sshd ]; then
        command -v apt-get >/dev/null || refuse "$LAUNCHER needs an sshd in every node: install OpenSSH's server (/usr/sbin/sshd)"
        say "installing Debian's openssh-server (an sshd runs in every node; none is started outside them)"
        # Keep the package from starting an sshd on the machine itself.
        NEW_POLICY=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; NEW_POLICY=1; fi
        INSTALLED=0
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null 2>&1; } \
            && INSTALLED=1
        [ "$NEW_POLICY" = 1 ] && rm -f /usr/sbin/policy-rc.d
        [ "$INSTALLED" = 1 ] && [ -x /usr/sbin/sshd ] || refuse "installing openssh-server failed"
    fi
fi

# ---------------------------------------------------------------- names of this run
ID=$(printf 'hle%x' $$)            # interface names stay under Linux's 15 characters
IFNAME=$ID                          # the bridge, and every node's interface: one name everywhere
BRIDGE=$ID
NAMESPACES=(); VETHS=(); ADDRS=(); LAUNCH_PID=""; NODE_PIDS=(); MADE_SSHD_DIR=0; MADE_NETNS_ETC=0; STATE=""; BRIDGE_MADE=0

teardown() {
    local status=$?
    trap - EXIT INT TERM HUP
    set +e
    local pid
    for pid in $LAUNCH_PID "${NODE_PIDS[@]}"; do
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    # Whatever still runs in a node (ranks, daemons, sshd) is stopped before its namespace goes.
    local ns pids
    for ns in "${NAMESPACES[@]}"; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    done
    for ns in "${NAMESPACES[@]}"; do
        for _ in $(seq 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
        ip netns del "$ns" 2>/dev/null
        rm -rf "/etc/netns/$ns"
    done
    [ "$MADE_NETNS_ETC" = 1 ] && rmdir /etc/netns 2>/dev/null
    local veth
    for veth in "${VETHS[@]}"; do ip link del "$veth" 2>/dev/null; done   # their qdiscs go with them
    [ "$BRIDGE_MADE" = 1 ] && ip link del "$BRIDGE" 2>/dev/null
    [ "$MADE_SSHD_DIR" = 1 ] && rmdir /run/sshd 2>/dev/null
    [ -n "$STATE" ] && rm -rf "$STATE"
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

fail_setup() { echo "[emulated-cluster] cannot run here: $*" >&2; exit 3; }

STATE=$(mktemp -d "${TMPDIR:-/tmp}/hl-emulated-cluster.XXXXXX")
mkdir -p "$STATE/hosts"

# ---------------------------------------------------------------- subnet and bridge
# One free /24 of 198.18.0.0/15 per run, chosen under a lock so that two runs never pick the
# same one; the bridge's address marks it as taken.
LOCK_DIR=/run/lock; [ -d "$LOCK_DIR" ] || LOCK_DIR=/tmp
exec 9>"$LOCK_DIR/horovod-leader-emulated-cluster.lock"
flock 9
USED=$(ip -4 -o addr show | awk '{print $4}')
SUBNET=""
for k in $(seq 0 511); do
    n=$(( ($$ + k) % 512 ))
    candidate="198.$((18 + n / 256)).$((n % 256))"
    grep -q "^${candidate//./\\.}\." <<<"$USED" || { SUBNET=$candidate; break; }
done
[ -n "$SUBNET" ] || fail_setup "every /24 of 198.18.0.0/15 is in use on this machine"
CIDR=$SUBNET.0/24
ip link add "$BRIDGE" type bridge 2>/dev/null || fail_setup "cannot create a bridge (is the bridge module available?)"
BRIDGE_MADE=1
sysctl -qw "net.ipv6.conf.$BRIDGE.disable_ipv6=1" 2>/dev/null || true
ip addr add "$SUBNET.254/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
flock -u 9

# ---------------------------------------------------------------- the nodes
# Each node resolves the nodes' names (node0, node1, ...) to their addresses, as on a cluster:
# 'ip netns exec' shows a namespace's processes /etc/netns/NS/hosts as their /etc/hosts (the
# machine's own /etc/hosts is not touched). Gloo needs it: it binds to the address of the
# node's hostname.
[ -d /etc/netns ] || { mkdir -p /etc/netns; MADE_NETNS_ETC=1; }
tbf() { tc "$@" root tbf rate "$LINK_RATE" burst "$LINK_BURST" latency 100ms; }
for i in $(seq 0 $((NODES - 1))); do
    ns=$ID-node$i; veth=${ID}v$i; addr=$SUBNET.$((i + 1)); node_tmp=$STATE/node$i/tmp
    ip netns add "$ns" 2>/dev/null || fail_setup "cannot create a network namespace ('ip netns add' failed: a container without CAP_SYS_ADMIN?)"
    NAMESPACES+=("$ns")
    ip link add "$veth" type veth peer name "$IFNAME" netns "$ns" || fail_setup "cannot create a veth pair"
    VETHS+=("$veth")
    ip link set "$veth" master "$BRIDGE" up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/24" dev "$IFNAME"
    ip -n "$ns" link set "$IFNAME" up
    # Both ends: the root end limits what the node receives, the node's end what it sends.
    tbf qdisc add dev "$veth" 2>/dev/null && tbf -n "$ns" qdisc add dev "$IFNAME" 2>/dev/null \
        || fail_setup "tc refused 'tbf rate $LINK_RATE burst $LINK_BURST latency 100ms' (LINK_RATE and LINK_BURST take tc's syntax, e.g. 1gbit, 100mbit; is sch_tbf available?)"
    mkdir -p "$node_tmp" "/etc/netns/$ns"
    echo "$ns node$i $node_tmp" >"$STATE/hosts/$addr"
    echo "$addr slots=$RANKS_PER_NODE" >>"$STATE/hostfile"
    ADDRS+=("$addr")
done
HOSTS_FILE=$(printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n'; for i in $(seq 0 $((NODES - 1))); do printf '%s\tnode%s\n' "${ADDRS[$i]}" "$i"; done)
for ns in "${NAMESPACES[@]}"; do echo "$HOSTS_FILE" >"/etc/netns/$ns/hosts"; done
export EMULATED_CLUSTER_STATE=$STATE
say "$NODES node(s) x $RANKS_PER_NODE rank(s), links $LINK_RATE each way, nodes ${ADDRS[0]}..${ADDRS[-1]} on $BRIDGE, launcher $LAUNCHER"

# ---------------------------------------------------------------- sshd in every node (horovodrun)
start_sshd() {
    local ssh_dir=$STATE/ssh
    mkdir -p "$ssh_dir"
    ssh-keygen -q -t ed25519 -N '' -C emulated-cluster -f "$ssh_dir/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C emulated-node -f "$ssh_dir/host_ed25519"
    cp "$ssh_dir/id_ed25519.pub" "$ssh_dir/authorized_keys"
    [ -d /run/sshd ] || { mkdir -p /run/sshd; chmod 755 /run/sshd; MADE_SSHD_DIR=1; }   # sshd's privilege separation dir
    : >"$ssh_dir/known_hosts"
    local i addr
    for i in $(seq 0 $((NODES - 1))); do
        addr=${ADDRS[$i]}
        echo "$addr $(cut -d' ' -f1,2 "$ssh_dir/host_ed25519.pub")" >>"$ssh_dir/known_hosts"
        # sshd passes no TMPDIR on: SetEnv gives each node's sessions their own.
        cat >"$STATE/node$i/sshd_config" <<EOF
ListenAddress $addr
Port 22
HostKey $ssh_dir/host_ed25519
PidFile $STATE/node$i/sshd.pid
AuthorizedKeysFile $ssh_dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
LogLevel ERROR
SetEnv TMPDIR=$STATE/node$i/tmp
EOF
        /usr/sbin/sshd -t -f "$STATE/node$i/sshd_config" || fail_setup "sshd rejected its configuration"
        # In the foreground of a background job (-D), so that this script is its parent and
        # reaps it; the teardown stops it with everything else in the node.
        ip netns exec "${NAMESPACES[$i]}" unshare --uts -- \
            sh -c 'hostname "$1" && exec /usr/sbin/sshd -D -f "$2"' sshd-node "node$i" "$STATE/node$i/sshd_config" &
    done
    # The launcher's ssh reads this run's configuration (key, known hosts), so ~/.ssh is not touched.
    cat >"$ssh_dir/config" <<EOF
Host *
    User root
    IdentityFile $ssh_dir/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $ssh_dir/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
EOF
    mkdir -p "$STATE/bin"
    printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$ssh_dir/config" >"$STATE/bin/ssh"
    chmod +x "$STATE/bin/ssh"
    for i in $(seq 0 $((NODES - 1))); do
        for try in $(seq 100); do
            "$STATE/bin/ssh" -o ConnectTimeout=2 "${ADDRS[$i]}" true 2>/dev/null && break
            [ "$try" = 100 ] && fail_setup "ssh into node$i (${ADDRS[$i]}) did not succeed (did its sshd start?)"
            sleep 0.1
        done
    done
}

# ---------------------------------------------------------------- launch
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$LAUNCHER" = mpirun ]; then
    CMD=(mpirun -np "$NP" --hostfile "$STATE/hostfile" --map-by slot --bind-to none
         --mca mpi_yield_when_idle 1
         --mca plm_rsh_agent "$AGENT" --mca plm_rsh_no_tree_spawn 1
         --mca btl_tcp_if_include "$CIDR" --mca oob_tcp_if_include "$CIDR"
         -x OMP_NUM_THREADS -x PATH)
    # Horovod's and this toolkit's settings (HOROVOD_*) reach every rank, as horovodrun does.
    for var in LD_LIBRARY_PATH PYTHONPATH PYTHONUNBUFFERED $(compgen -e | grep '^HOROVOD_' || true); do
        [ -n "${!var:-}" ] && CMD+=(-x "$var")
    done
    [ "$(id -u)" = 0 ] && CMD+=(--allow-run-as-root)
    # shellcheck disable=SC2206
    [ -n "${MPIRUN_EXTRA:-}" ] && CMD+=($MPIRUN_EXTRA)
elif [ "$LAUNCHER" != torchrun ]; then
    start_sshd
    HOSTS=$(printf "%s:$RANKS_PER_NODE," "${ADDRS[@]}"); HOSTS=${HOSTS%,}
    CMD=("$HOROVODRUN" -np "$NP" -H "$HOSTS" --network-interface "$IFNAME"
         --ssh-identity-file "$STATE/ssh/id_ed25519" --disable-cache)
    if [ "$LAUNCHER" = horovodrun-gloo ]; then
        CMD+=(--gloo)
    else
        CMD+=(--mpi --mpi-args="--mca oob_tcp_if_include $CIDR --mca plm_rsh_no_tree_spawn 1 --mca mpi_yield_when_idle 1")
    fi
    # shellcheck disable=SC2206
    [ -n "${HOROVODRUN_EXTRA:-}" ] && CMD+=($HOROVODRUN_EXTRA)
    # The run's ssh comes first on PATH; TMPDIR is left to each node's sshd (horovodrun forwards
    # the launcher's environment, and one shared TMPDIR breaks PMIx's store).
    export PATH=$STATE/bin:$PATH
    unset TMPDIR
fi
if [ "$LAUNCHER" = torchrun ]; then
    # One torchrun per node, inside the node (its namespace, its hostname, its TMPDIR), with the
    # rendezvous at node0's address; Gloo binds to the node's one link.
    PORT=$((29400 + $$ % 1000))
    for i in $(seq 0 $((NODES - 1))); do
        ip netns exec "${NAMESPACES[$i]}" unshare --uts -- env TMPDIR="$STATE/node$i/tmp" GLOO_SOCKET_IFNAME="$IFNAME" \
            sh -c 'hostname "$1" && shift && exec "$@"' torchrun-node "node$i" \
            "$TORCHRUN" --nnodes "$NODES" --node-rank "$i" --nproc-per-node "$RANKS_PER_NODE" \
            --master-addr "${ADDRS[0]}" --master-port "$PORT" "$@" &
        NODE_PIDS+=($!)
    done
    set +e
    STATUS=0
    for pid in "${NODE_PIDS[@]}"; do wait "$pid" || STATUS=$?; done
    set -e
    NODE_PIDS=()
    [ "$STATUS" = 0 ] || say "a node's torchrun exited with status $STATUS"
    exit "$STATUS"
fi
CMD+=("$PY" "$@")
# In the background, so that a signal reaches the trap at once and the teardown runs.
"${CMD[@]}" &
LAUNCH_PID=$!
set +e
wait "$LAUNCH_PID"
STATUS=$?
set -e
LAUNCH_PID=""
[ "$STATUS" = 0 ] || say "the launcher exited with status $STATUS"
exit "$STATUS"
