#!/usr/bin/env bash
# Remote-shell agent for the emulated cluster (launch/emulated_cluster.sh): Open MPI calls it
# as it would call ssh (`--mca plm_rsh_agent`), with `HOST CMD...`. It runs CMD inside HOST's
# network namespace, in a UTS namespace of its own with the node's hostname, with the node's
# own TMPDIR: PMIx keeps its shared-memory store under TMPDIR, and two nodes sharing one
# store fail.
#   EMULATED_CLUSTER_STATE=DIR launch/emulated_node.sh [SSH-OPTIONS] HOST CMD...
# DIR/hosts/HOST holds "NAMESPACE HOSTNAME TMPDIR" (written by emulated_cluster.sh).
set -euo pipefail
# ssh-style options that Open MPI may put before the host mean nothing here.
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
[ $# -ge 2 ] || { echo "usage: $0 HOST CMD..." >&2; exit 255; }
HOST=$1; shift
STATE=${EMULATED_CLUSTER_STATE:?EMULATED_CLUSTER_STATE is not set: this agent is used by launch/emulated_cluster.sh}
[ -r "$STATE/hosts/$HOST" ] || { echo "$0: $HOST is not a node of this emulated cluster ($STATE)" >&2; exit 255; }
read -r NAMESPACE NODE_NAME NODE_TMP <"$STATE/hosts/$HOST"
# As with ssh, the command arrives as words to be joined and read by the remote shell.
exec ip netns exec "$NAMESPACE" unshare --uts -- \
    env TMPDIR="$NODE_TMP" sh -c 'hostname "$1" && exec sh -c "$2"' emulated-node "$NODE_NAME" "$*"
