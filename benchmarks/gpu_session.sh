#!/usr/bin/env bash
# The GPU checks and figures, in parts that each end well inside ten minutes, for a CUDA machine
# that may have no network: Python wheels and EGL libraries travel in .whl/ and .gl/ (both ignored
# by git), fetched beforehand on a machine that reaches PyPI and Debian.
#
#   bash benchmarks/gpu_session.sh fetch            # on the networked machine: fill .whl/ and .gl/
#   env -u VLMRM_FAST_COMMIT python -c "from vlmrm_fast.run_info import git_commit; print(git_commit())"
#                                                   # where the tree is sent from: its commit, 1a2b3c4 say
#   VLMRM_FAST_COMMIT=1a2b3c4 bash benchmarks/gpu_session.sh PART [PART ...]
#                                                   # on the GPU machine, the commit written in (results
#                                                   # carry it; a copy of the tree has no .git, or an old one)
#
# PARTs:
#   info         nvidia-smi, library versions, commit, whether EGL reaches the GPU       (seconds)
#   tests        build the GL-CUDA extension, then `pytest -m gpu`, the files of GPU_TESTS_FIRST (the few
#                end-to-end tests) before the kernels' (GPU_TESTS="tests/x.py ..." for some files only)
#                                                                                         (minutes)
#   kernels      benchmarks/bench_kernels.py: preprocess GB/s against the copy (with the other tiles
#                in KERNEL_TILES, default "16x64w4 4x128w4 4x64w4", and the identity candidates of
#                benchmarks/identity_variants.py in KERNEL_IDENTITY, default "flat1024w4 flat2048w8
#                words1024w4 words2048w8"), score frames/s, the patch embedding, the LayerNorm kernel
#                against torch's (with the other launches in KERNEL_LAYER_NORM, default "1w4 2w4 8w8"),
#                the MLPs' first matmul with its GELU in the epilogue against the unfused pair, the fp8
#                activations' quantisation kernel against torch's ops (and, with the MLPs' GELU in it,
#                against the GELU pass then either; with the blocks' LayerNorms in it, against the
#                LayerNorm kernel then the quantisation kernel), OpenAI towers' QuickGELU kernel against
#                open_clip's three ops
#   render       benchmarks/bench_env.py --no-env-steps: render-only frames/s (target 3,000/s at 224)
#   render-breakdown
#                benchmarks/render_breakdown.py: where a frame's render time goes (scene passes,
#                shadow-map size, multisampling) and whether threads or processes add up;
#                RENDER_BREAKDOWN_ARGS="--scene-no-shadow --num-envs 32" (for one) changes its scene
#   env          benchmarks/bench_env.py --no-render: env steps/s with the VLM reward, N = 1 8 32
#                (ENV_BACKEND=compile: the fast path's tower through torch.compile, default auto)
#   profile-b32, profile-l14, profile-bigg, profile-l14-quickgelu
#                `vlmrm-fast bench` for one model at 224 px, batch 1-1024, bf16, torch and compile,
#                with the kernel profile of the largest batch (where the time goes against the ceiling);
#                PROFILE_BATCHES="1 64 1024", PROFILE_BACKENDS=torch (or compile) and PROFILE_NO_SEED=1
#                split a long one (ViT-bigG-14) over calls; PROFILE_DTYPES="bf16 fp8" (or fp8) adds the
#                torch and compile backends' fp8 matmuls (Hopper); PROFILE_ARGS="--compile-mode
#                max-autotune" (for one) passes more options, "--kernels triton torch" an end-to-end
#                A/B of the package's Triton kernels (the torch backend's tower kernels);
#                profile-l14-quickgelu is ViT-L-14 as OpenAI's weights build it (QuickGELU), whose
#                QuickGELU kernel the others do not run
#
# Each part writes under $RESULTS/<part>/ (RESULTS defaults to $OUT where that is set, else
# runs/gpu-session/): its log and results, at most 4 files; copy the figures worth keeping to
# benchmarks/results/ and commit them. Override the python with PYTHON=... Time: the whole call
# ends by CALL_LIMIT seconds (default 570, for a 600 s limit): each part gets what is left, or
# PART_TIMEOUT=S seconds if less, then SIGTERM (every benchmark then writes what it measured); a
# part with under 30 s left is skipped. The GL-CUDA extension is built only for the parts that use
# it (tests, render, render-breakdown, env). Every part but info needs open_clip from .whl/, the
# rendering ones (the same four) also mujoco, gymnasium, stable-baselines3 and the libraries of .gl/
# (or all of them installed): the call stops at once without them, after info where asked.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-${OUT:-runs/gpu-session}}
CALL_LIMIT=${CALL_LIMIT:-570}
# Versions for the fetch step; the GPU image supplies torch, triton, numpy and the rest.
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0
        glfw==2.11.0 pyopengl==3.1.10 gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2)
GL_DEBS=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
# The tests part runs these files first: their few `gpu` tests check the GPU render path, the backends, fp8
# on Hopper and the reward end to end, and the ~400 kernel-shape tests after them (many a Triton compile)
# may outlast the call.
GPU_TESTS_FIRST="tests/test_render.py tests/test_reward.py tests/test_backends.py tests/test_torch_fp8.py
    tests/test_fp8.py tests/test_fp8_block.py tests/test_fp8_gelu_mlp.py tests/test_gelu_epilogue.py
    tests/test_patch_embed.py tests/test_profiler.py tests/test_train.py"

fetch() {
    mkdir -p .whl .gl
    rm -f .whl/*.whl .gl/*.deb  # one Python version's wheels at a time
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || return 1
    local lists=/tmp/gpu-session-apt
    mkdir -p "$lists/partial"
    local apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
    apt-get "${apt_opts[@]}" update -qq && (cd .gl && apt-get "${apt_opts[@]}" download "${GL_DEBS[@]}") || return 1
    du -sh .whl .gl
}

setup() {
    # What a bare machine lacks: the GL libraries (unpacked into /), the carried wheels, this package.
    mkdir -p "$RESULTS"
    if compgen -G ".gl/*.deb" >/dev/null; then
        for deb in .gl/*.deb; do dpkg -x "$deb" / || { echo "unpacking $deb failed" >&2; return 1; }; done
        ldconfig
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    local vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    [ -f "$vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
    export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
    # --no-build-isolation: the extension builds against the torch already here (setup.py's knobs);
    # only the parts that render need it (a build takes about a minute).
    local build=()
    [ "${NEEDS_EXTENSION:-0}" = 1 ] || build=(env VLMRM_FAST_SKIP_CUDA_BUILD=1)
    local log=/tmp/vlmrm-fast-setup.log
    if ! ${build[@]+"${build[@]}"} "$PYTHON" -m pip install --no-deps --no-build-isolation -v -e . >"$log" 2>&1; then
        cp "$log" "$RESULTS/setup.log"
        tail -n 30 "$log" >&2
        return 1
    fi
    grep "vlmrm_fast setup" "$log" || true  # whether the GL-CUDA extension was built
}

require() {
    # A call that did not carry .whl and .gl (ignored by git, so only `carry` sends them) would
    # otherwise run its parts into skips and exit 0 with no figures.
    local fix="carry them: the device tool's run(carry=[\".whl\", \".gl\"]), after \`bash $0 fetch\` here"
    local modules=open_clip
    [ "$NEEDS_EXTENSION" = 1 ] && modules="open_clip, mujoco, gymnasium, stable_baselines3"
    if [ "$NEEDS_PACKAGES" = 1 ] && ! "$PYTHON" -c "import $modules" >/dev/null 2>&1; then
        echo "one of $modules is missing (.whl/ holds them): $fix" >&2
        return 1
    fi
    if [ "$NEEDS_EXTENSION" = 1 ]; then
        local reason  # stdout only: a warning on stderr while importing is no failure
        reason=$("$PYTHON" -c "from vlmrm_fast.render import rendering_unavailable_reason as r; print(r() or '')" \
            2>/dev/null) || reason="vlmrm_fast.render does not import"
        if [ -n "$reason" ]; then
            echo "the EGL libraries of .gl/ are missing or fail: $reason; $fix" >&2
            return 1
        fi
    fi
}

part() {  # part NAME COMMAND...: run COMMAND with its output also in $RESULTS/NAME/log.txt
    local name=$1
    shift
    mkdir -p "$RESULTS/$name"
    echo "== $name: $*"
    local start=$SECONDS
    local left=$((CALL_LIMIT - SECONDS - 15))  # 15 s for the kill's grace period
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left} s left of CALL_LIMIT=$CALL_LIMIT"
        return 1
    fi
    local seconds=$left
    if [ -n "${PART_TIMEOUT:-}" ] && [ "$PART_TIMEOUT" -lt "$left" ]; then seconds=$PART_TIMEOUT; fi
    local limit=()
    if [ "$(type -t "$1")" = file ]; then limit=(timeout -k 15 "$seconds"); fi
    ${limit[@]+"${limit[@]}"} "$@" 2>&1 | tee "$RESULTS/$name/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    return "$rc"
}

info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
import os
try:
    from vlmrm_fast.run_info import git_commit
    print("commit", git_commit())
except Exception as error:  # the summary must print whatever is missing
    print("commit: unknown", repr(error))
for name in ("torch", "triton", "open_clip_torch", "onnx", "onnxruntime", "mujoco", "gymnasium", "stable_baselines3"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} missing")
import torch
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    from vlmrm_fast.render import gpu_unavailable_reason, rendering_unavailable_reason
    print("MuJoCo rendering:", rendering_unavailable_reason() or "available")
    if os.environ.get("NEEDS_EXTENSION") == "0":  # setup skipped the build: its reason says nothing of the GPU
        print("GPU render path: not built in this call (only with tests, render, render-breakdown or env)")
    else:
        print("GPU render path:", gpu_unavailable_reason() or "available")
except Exception as error:  # the summary must print whatever is missing
    print("rendering: unknown", repr(error))
EOF
}

profile() {  # profile PART MODEL; PROFILE_BATCHES, PROFILE_BACKENDS and PROFILE_NO_SEED=1 trim a long part; PROFILE_DTYPES="bf16 fp8" adds fp8; PROFILE_ARGS more options
    local seed=()
    [ "${PROFILE_NO_SEED:-0}" = 1 ] && seed=(--no-seed)
    # shellcheck disable=SC2086
    part "$1" "$PYTHON" -m vlmrm_fast bench --models "$2" --frame-size 224 --batch-sizes ${PROFILE_BATCHES:-1 8 64 256 1024} \
        --dtypes ${PROFILE_DTYPES:-bf16} --backends ${PROFILE_BACKENDS:-torch compile} --out "$RESULTS/$1" --no-progress --kernel-profile \
        ${seed[@]+"${seed[@]}"} ${PROFILE_ARGS:-}
}

# One function per part: part_<name>, dashes as underscores.
part_info() { part info info; }
part_tests() {
    local per_test=()  # pytest-timeout, where installed: one hung test must not take the whole call
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=240)
    # pytest writes its failures and summary on a KeyboardInterrupt, but the time limit's SIGTERM ends it
    # with only its progress dots in the log: SIGTERM raises KeyboardInterrupt here instead.
    local run_pytest='import signal, sys, pytest; signal.signal(signal.SIGTERM, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))'
    local files=${GPU_TESTS:-}
    if [ -z "$files" ]; then
        # shellcheck disable=SC2086
        files=$(echo $GPU_TESTS_FIRST)
        for file in tests/test_*.py; do
            case " $files " in *" $file "*) ;; *) files+=" $file" ;; esac
        done
    fi
    # shellcheck disable=SC2086
    part tests "$PYTHON" -c "$run_pytest" -m gpu -q -rfEs -p no:cacheprovider ${per_test[@]+"${per_test[@]}"} $files
}
part_kernels() {
    # shellcheck disable=SC2086
    part kernels "$PYTHON" benchmarks/bench_kernels.py --preprocess-tiles ${KERNEL_TILES:-16x64w4 4x128w4 4x64w4} \
        --identity-variants ${KERNEL_IDENTITY:-flat1024w4 flat2048w8 words1024w4 words2048w8} \
        --layer-norm-configs ${KERNEL_LAYER_NORM:-1w4 2w4 8w8} \
        --csv "$RESULTS/kernels/kernels.csv" --json "$RESULTS/kernels/kernels.json"
}
part_render() {
    part render "$PYTHON" benchmarks/bench_env.py --no-env-steps --csv "$RESULTS/render/env.csv" --json "$RESULTS/render/env.json"
}
part_render_breakdown() {
    # shellcheck disable=SC2086
    part render-breakdown "$PYTHON" benchmarks/render_breakdown.py ${RENDER_BREAKDOWN_ARGS:-} \
        --json "$RESULTS/render-breakdown/render-breakdown.json"
}
part_env() {
    part env "$PYTHON" benchmarks/bench_env.py --no-render --backend "${ENV_BACKEND:-auto}" --csv "$RESULTS/env/env.csv" \
        --json "$RESULTS/env/env.json"
}
part_profile_b32() { profile profile-b32 ViT-B-32; }
part_profile_l14() { profile profile-l14 ViT-L-14; }
part_profile_bigg() { profile profile-bigg ViT-bigG-14; }
part_profile_l14_quickgelu() { profile profile-l14-quickgelu ViT-L-14-quickgelu; }

if [ $# -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
if [ "$1" = fetch ]; then
    fetch
    exit
fi
NEEDS_EXTENSION=0 NEEDS_PACKAGES=0
for name in "$@"; do  # every name checked before setup touches the machine
    declare -F "part_${name//-/_}" >/dev/null || { echo "unknown part '$name' (see the top of $0)" >&2; exit 2; }
    case $name in tests | render | render-breakdown | env) NEEDS_EXTENSION=1 ;; esac
    [ "$name" = info ] || NEEDS_PACKAGES=1
done
export NEEDS_EXTENSION
if [ -n "${VLMRM_FAST_COMMIT+set}" ] && [ -z "${VLMRM_FAST_COMMIT// /}" ]; then
    # A shell variable of the machine the command was written on ($C) is empty where the command runs; a
    # git folder here, possibly an older one, would then name the results' commit without a word.
    echo "VLMRM_FAST_COMMIT is set but empty: write the commit itself into the command sent to this machine" >&2
    echo "  (VLMRM_FAST_COMMIT=1a2b3c4 bash $0 $*, the commit as benchmarks/README.md's first command prints it" >&2
    echo "  where the tree was sent from)" >&2
    exit 2
fi
if ! git rev-parse --git-dir >/dev/null 2>&1 && [ -z "${VLMRM_FAST_COMMIT:-}" ]; then
    echo "this copy of the tree has no .git, so results could not name their commit: run it as" >&2
    echo "  VLMRM_FAST_COMMIT=1a2b3c4 bash $0 $*" >&2
    echo "  with the commit that, where the tree was sent from, \`env -u VLMRM_FAST_COMMIT python -c" >&2
    echo "  'from vlmrm_fast.run_info import git_commit; print(git_commit())'\` prints (+dirty with uncommitted changes)" >&2
    exit 2
fi
setup || { echo "setup failed (log: $RESULTS/setup.log)" >&2; exit 1; }
status=0
case " $* " in *" info "*) part_info || status=1 ;; esac  # the diagnosis, even where the rest cannot run
require || exit 1
for name in "$@"; do
    [ "$name" = info ] || "part_${name//-/_}" || status=1
done
exit $status
