#!/usr/bin/env bash
# One node, NPROC processes of `megarope train`: one per GPU, or NPROC CPU workers (gloo) without GPUs.
#
#   launch/torchrun.sh NPROC CONFIG.yaml [dotted.key=value ...]
#   launch/torchrun.sh 8 examples/llama2_7b_base1e6_4k.yaml
#   launch/torchrun.sh 2 examples/toy_cpu.yaml parallel.cp=2        # CPU: CP=2 over 2 processes
#
# NPROC must be a multiple of parallel.tp x parallel.cp; the rest is data parallelism.
# Stopping: SIGTERM or SIGUSR1 to this script (it becomes torchrun) reaches every rank, which saves a
# checkpoint at the end of its current step and exits 0; torchrun itself then reports the signal and
# exits non-zero. Run the same command again to resume from checkpoint.dir.
#
# Environment you may set (EDIT here or export before running):
#   PYTHON            the interpreter with megarope installed (default: the repo's .venv, else python3)
#   OMP_NUM_THREADS   threads per process (default: this machine's cores / NPROC)
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for the ranks to save after a signal (default 600)
#   CUDA_DEVICE_MAX_CONNECTIONS  1 when parallel.tp or parallel.cp > 1, as megatron-core wants it (set here;
#                     megarope.config.launch_environment says why); a value exported before wins
#   MEGAROPE_DEVICE   cpu: train on the CPU (gloo ranks) although the machine has GPUs
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG.yaml [dotted.key=value ...]" >&2
    exit 2
fi
NPROC=$1
CONFIG=$2
shift 2
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
if [ ! -f "$CONFIG" ]; then
    echo "$0: config file not found: $CONFIG" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
# The config is checked here, before any rank starts (one line and exit 2 when it is bad), and its layout
# decides the environment megatron-core wants in the ranks (megarope.config.launch_environment).
LAUNCH_ENV=$("$PYTHON" - "$CONFIG" "$@" <<'EOF'
import sys

from megarope.config import launch_environment, load_config
from megarope.errors import UsageError

try:
    p = load_config(sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")]).parallel
except UsageError as e:
    sys.exit(f"megarope: error: {e}")
for name, value in launch_environment(p.tp, p.cp).items():
    print(f"{name}={value}")
EOF
) || exit 2
for assignment in $LAUNCH_ENV; do
    [ -n "$(printenv "${assignment%%=*}")" ] || export "$assignment"   # a value exported before wins
done

CORES=$(nproc 2>/dev/null || echo 1)
THREADS=$(( CORES / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}

# --standalone: a local rendezvous on a free port, so several runs can share a node.
# SIGUSR1 is added to the signals torchrun forwards to the ranks (Slurm sends it before a time limit).
exec "$PYTHON" -m torch.distributed.run \
    --standalone \
    --nproc-per-node "$NPROC" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}" \
    -m megarope train "$CONFIG" "$@"
