#!/usr/bin/env bash
# Idempotent set-up of everything horovod_leader needs, in the repository's .venv:
#   1. Open MPI (the one on PATH; otherwise Debian's packages when run as root with apt)
#   2. .venv with the pinned requirements.txt
#   3. Horovod 0.28.1 built from PyPI's sdist with PyTorch + MPI + Gloo, cached as a wheel
#      (for the CPU on a machine with no GPU, which builds in about half the time)
#   4. this package, installed editable (with its compiled extension when a compiler is there)
#   5. horovodrun --check-build, failing loudly if PyTorch, MPI or Gloo is missing
# Each step says how long it took. A warm re-run only checks stamps and finishes in seconds.
# Without Horovod (HOROVOD_LEADER_SKIP_HOROVOD=1, or when its build fails) the toolkit runs on
# its torch.distributed engine (launched by torchrun); the set-up says so.
#
# Environment knobs:
#   HOROVOD_LEADER_VENV   where the virtual environment goes            (default: <repo>/.venv)
#   HOROVOD_LEADER_CACHE  where the built Horovod wheel is kept         (default: ~/.cache/horovod_leader)
#   PYTHON                the interpreter the venv is made from        (default: python3)
#   CUDA_HOME             CUDA toolkit for a GPU build (default: /usr/local/cuda when it exists)
#   HOROVOD_LEADER_GPU    the fused-update extension's CUDA kernels: auto (default: when a toolkit
#                         is there and a GPU is visible), yes (whenever a toolkit is there) or no
#   HOROVOD_LEADER_SKIP_HOROVOD=1  do not build Horovod: the torch engine only
#   HOROVOD_*             passed through to Horovod's build (e.g. HOROVOD_GPU_OPERATIONS=NCCL)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HOROVOD_LEADER_VENV:-$ROOT/.venv}
CACHE=${HOROVOD_LEADER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod_leader}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
START=$SECONDS
STEP_START=$SECONDS
say() { echo "[setup] $*"; }
# The end of a step: how long it took.
took() { say "$* ($((SECONDS - STEP_START)) s)"; STEP_START=$SECONDS; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- 1. Open MPI
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
    say "MPI: $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -1))"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "no MPI on PATH: installing Debian's openmpi-bin and libopenmpi-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
else
    die "no MPI found (mpicc and mpirun must be on PATH). Load your cluster's MPI module
       (e.g. 'module load openmpi') or install Open MPI with its development headers
       (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev), then run this again."
fi
took "MPI ready"

# ---------------------------------------------------------------- 2. virtual environment
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
REQ_STAMP="$VENV/.requirements.sha"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$(hash_of "$ROOT/requirements.txt")" ]; then
    say "installing pinned requirements (torch is large: this takes a few minutes the first time)"
    "$PY" -m pip install -q -r "$ROOT/requirements.txt"
    hash_of "$ROOT/requirements.txt" >"$REQ_STAMP"
    took "requirements installed"
else
    say "requirements: up to date"
fi

# One Python start-up (importing torch takes seconds) tells what is installed.
probe() {
    "$PY" - <<'PYEOF' 2>/dev/null
def attempt(fn):
    try:
        return fn()
    except Exception:
        return ""
def horovod_ok():
    import horovod, horovod.torch as hvd
    return "yes" if horovod.__version__ == "0.28.1" and hvd.mpi_built() and hvd.gloo_built() else ""
def backend():
    from horovod_leader import fused
    return fused.backend() + (" (CUDA kernel compiled in)" if fused.extension_has_cuda() else "")
print("TORCH_TAG=" + repr(attempt(lambda: __import__("torch").__version__.replace("+", "_"))))
print("HOROVOD_OK=" + repr(attempt(horovod_ok)))
print("BACKEND=" + repr(attempt(backend)))
PYEOF
}
eval "$(probe)"
CHANGED=0

# ---------------------------------------------------------------- 3. Horovod
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
# Horovod's torch binding needs the CUDA toolkit whenever torch is a CUDA build (its CMake
# adds CUDA then, GPU or not): say where it is, or build CPU-only when there is none.
GPU_CHOICE=${HOROVOD_LEADER_GPU:-auto}
case "$GPU_CHOICE" in auto|yes|no) ;; *) die "HOROVOD_LEADER_GPU must be auto, yes or no, got '$GPU_CHOICE'" ;; esac
gpu_visible() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    BUILD_FLAVOUR=cuda
else
    BUILD_FLAVOUR=cpu; unset CUDA_HOME
fi
# The fused-update extension gets its CUDA kernels only where a GPU can run them
# (HOROVOD_LEADER_GPU=auto): compiling them costs most of its build and serves nothing there.
if [ "$BUILD_FLAVOUR" = cuda ] && [ "$GPU_CHOICE" != no ] && { [ "$GPU_CHOICE" = yes ] || gpu_visible; }; then
    EXT_FLAVOUR=cuda
else
    EXT_FLAVOUR=cpu; export HOROVOD_LEADER_NO_CUDA=1
    if [ "$BUILD_FLAVOUR" = cuda ] && [ "$GPU_CHOICE" = auto ]; then
        say "no GPU visible: the fused-update extension is built for the CPU only (HOROVOD_LEADER_GPU=yes adds its CUDA kernels)"
    fi
fi
HVD_FLAGS=$(env | grep '^HOROVOD_' | grep -v '^HOROVOD_LEADER_' | sort | tr '\n' ' ' || true)
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-torch$TORCH_TAG-$BUILD_FLAVOUR-$(hash_of <(echo "$HVD_FLAGS"))"

HOROVOD_SKIPPED=""
# The choice to skip Horovod is kept with the venv, so that a later set-up (the quick start's,
# the tests') does not install it behind the user's back; HOROVOD_LEADER_SKIP_HOROVOD=0 undoes it.
SKIP_STAMP="$VENV/.horovod-skipped"
SKIP_HOROVOD=${HOROVOD_LEADER_SKIP_HOROVOD:-}
if [ -z "$SKIP_HOROVOD" ] && [ -f "$SKIP_STAMP" ] && [ -z "$HOROVOD_OK" ]; then
    SKIP_HOROVOD=1; SKIP_WHY="HOROVOD_LEADER_SKIP_HOROVOD=1 when this environment was set up; =0 installs it"
fi
if [ "${SKIP_HOROVOD:-0}" = 1 ]; then
    HOROVOD_SKIPPED=${SKIP_WHY:-HOROVOD_LEADER_SKIP_HOROVOD=1}
    touch "$SKIP_STAMP"
    say "Horovod: skipped ($HOROVOD_SKIPPED): the toolkit runs on its torch.distributed engine (launch with torchrun)"
elif [ -n "$HOROVOD_OK" ]; then
    say "Horovod $HOROVOD_VERSION: already installed"
else
    if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        say "building Horovod $HOROVOD_VERSION from source ($BUILD_FLAVOUR; minutes: see BENCHMARKS.md for the time measured)"
        BUILD=$(mktemp -d)
        trap 'rm -rf "$BUILD"' EXIT
        "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
        tar xzf "$BUILD"/horovod-$HOROVOD_VERSION.tar.gz -C "$BUILD"
        SRC="$BUILD/horovod-$HOROVOD_VERSION"
        # The one patch: Horovod 0.28.1 asks for C++14; torch >= 2.1 headers need C++17 and
        # torch 2.14's need C++20.
        CXX_STD=$("$PY" -c 'import torch; v=tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])); print(20 if v >= (2, 14) else 17)')
        sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $CXX_STD)/" \
            "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
        grep -q "CMAKE_CXX_STANDARD $CXX_STD" "$SRC/horovod/torch/CMakeLists.txt" \
            || die "could not patch Horovod's C++ standard (did its CMakeLists.txt change?)"
        mkdir -p "$WHEEL_DIR"
        (
            cd "$SRC"
            export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
            export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
            export MAKEFLAGS="-j$(nproc)"
            if [ "$BUILD_FLAVOUR" = cuda ]; then
                # Point CMake at the real toolkit: an nvcc wrapper elsewhere on PATH would make
                # it look for headers and cudart in the wrong prefix.
                export HOROVOD_CUDA_HOME="$CUDA_HOME" CUDAToolkit_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
            fi
            "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" . >"$WHEEL_DIR/build.log" 2>&1
        ) || { tail -40 "$WHEEL_DIR/build.log" >&2; rm -f "$WHEEL_DIR"/*.whl
               HOROVOD_SKIPPED="its build failed (log: $WHEEL_DIR/build.log)"; }
        [ -z "$HOROVOD_SKIPPED" ] && took "Horovod built"
    else
        say "Horovod $HOROVOD_VERSION: reusing cached wheel in $WHEEL_DIR"
    fi
    if [ -z "$HOROVOD_SKIPPED" ]; then
        "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
        rm -f "$SKIP_STAMP"
        CHANGED=1
    else
        say "WARNING: no Horovod, $HOROVOD_SKIPPED: the toolkit runs on its torch.distributed engine (launch with torchrun)"
    fi
fi

# ---------------------------------------------------------------- 4. this package
# The fused-update extension is built in place (C++ always, CUDA too when a toolkit is there),
# then the package is installed editable. Without a compiler the PyTorch fallback is used.
PKG_STAMP="$VENV/.package.sha"
PKG_HASH=$(hash_of "$ROOT/setup.py" $(find "$ROOT/horovod_leader/csrc" -type f 2>/dev/null | sort) <(echo "$EXT_FLAVOUR"))
if [ "$(cat "$PKG_STAMP" 2>/dev/null)" != "$PKG_HASH" ] || [ -z "$BACKEND" ]; then
    say "building the fused-update extension ($EXT_FLAVOUR: about a minute)"
    if ! (cd "$ROOT" && "$PY" setup.py -q build_ext --inplace >"$VENV/.extension-build.log" 2>&1); then
        tail -30 "$VENV/.extension-build.log" >&2
        say "WARNING: the extension did not build (log: $VENV/.extension-build.log); the PyTorch fallback will be used"
    fi
    say "installing horovod_leader (editable)"
    (cd "$ROOT" && HOROVOD_LEADER_NO_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .) \
        || die "installing horovod_leader failed"
    echo "$PKG_HASH" >"$PKG_STAMP"
    CHANGED=1
    eval "$(probe)"
    took "horovod_leader installed"
else
    say "horovod_leader: up to date"
fi
say "fused update backend: $BACKEND"

# ---------------------------------------------------------------- 5. check
# After any install (or once per venv), Horovod's own check must list PyTorch, MPI and Gloo.
if [ -n "$HOROVOD_SKIPPED" ]; then
    say "ready in $((SECONDS - START)) s, without Horovod ($HOROVOD_SKIPPED): torch.distributed engine only; activate with 'source $VENV/bin/activate'"
    exit 0
fi
if [ "$CHANGED" = 1 ] || [ ! -f "$VENV/.check-build.ok" ]; then
    rm -f "$VENV/.check-build.ok"
    CHECK=$(PATH="$VENV/bin:$PATH" "$VENV/bin/horovodrun" --check-build)
    for want in PyTorch MPI Gloo; do
        echo "$CHECK" | grep -Eq "\[X\] $want\b" || { echo "$CHECK" >&2; die "Horovod was built without $want"; }
    done
    echo "$CHECK" >"$VENV/.check-build.ok"
fi
say "ready in $((SECONDS - START)) s: Horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo; activate with 'source $VENV/bin/activate'"
