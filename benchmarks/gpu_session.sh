# The open GPU measurements as device calls of under 10 minutes each, every step under its own
# time limit (one that fails or hangs leaves the others their time), logs and JSON written to $OUT:
#
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh a   # compiled correctness
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh b   # generate.py with mamba_ssm side by side
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh c   # fp8 training against bf16 (1.3B, 2.7B)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh d   # float8 GEMV tiles (kernels/gemv_q.py), megakernel, batch-1 A/B
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh e   # generate.py with mamba_ssm; float8 GEMV at batch 32
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh f   # megakernel probe: tagged-data sync, L2 prefetch
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh g   # CUDA skinny GEMM: kernel tests, isolation probe
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh h   # CUDA skinny GEMM in the decode loop (A/B)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh i   # generate.py 2.7B with mamba_ssm (the defaults)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh j   # megakernel probe vs the model's decode (JAX reference)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh k   # megakernel mode 10 (early steps): probe, tests, Engine A/B
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh l   # megakernel step timing probe, tests, generate.py b1 + peer
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh m   # the decode loop in XLA's command buffers (graph targets)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh n   # the megakernel at 130M and 1.3B: tests, generate.py b1
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh o   # the float8 megakernel: tests, generate.py b1 (2.7B, 130M)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh p   # every megakernel gpu test; 2.7B b1 bf16 / fp8 + peer
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh q   # H100 timing: head phase A/B, generate.py b1 + peer
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh r   # stage p's tests, then batch 1 by card (H100: the issue's row)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh s   # (retired: the cursor A/B of 2026-12-06 is done, variants removed)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh t   # (done) batch32_probe's modes; generate.py 2.7B b1 (the default) + peer
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh u   # (done) batch32_probe's unrolled consumers (A/B, cycles); generate.py b1
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh v   # (done) batch32_probe: arrive-only barriers, the state phase, L2 prefetch
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh w   # (done) batch32_probe mode 12: the states written back by bulk copies
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh x   # (done) batch32_probe mode 13 (the state phase alone); mode 12's check
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh y   # batch32_probe's kept modes after the trim (checks, cycle counts)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh z   # batch32_probe modes 14 / 15 only (the standalone projections)
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh window   # the CUDA window step: tests, profile, b32 A/B (VARIANTS_ONLY=1 stops there), generate.py b32
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh window2  # (done) its coefficients in registers, the coalesced stream: A/B
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh window3  # the window step's GPU tests, generate.py 2.7B b32 + peer
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh window4  # (retired) its stream under PDL (A/B): PDL 1 the default since
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh window5  # (retired) PDL 0 / 1 / 2 and the fused prep: A/B done
#   GIT_REVISION=<commit> bash benchmarks/gpu_session.sh window6  # (retired) the same cut down, generate.py b32 + peer
#
# Carry .whl (../shared/tools/device-wheels) and .peer (mamba_ssm from state-spaces/mamba). Stage a: the
# decode kernels' gpu tests at real widths (state write-back window, float8 weights) and the quantization
# tests, compiled. Stage b: generate.py on 2.7B (batch 1 and 32, bf16 states, bf16 and float8 weights)
# against mamba_ssm, the CUDA megakernel probe, then 130M and the 13-layer Nemotron-H. Stage c: fp8 training.
# (The window and fp8 A/Bs of 2026-12-05 are in benchmarks/results: decode_variants_*_h100.json.) Copy what
# comes back into benchmarks/results/ with the commands (each JSON holds its own).
set -u
stage=${1:?stage a, b or c}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }  # not in a pipe: keeps its exports
cat "$OUT/setup.log"
step() {  # step NAME SECONDS COMMAND…: runs COMMAND under a time limit, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
    return $rc
}
find_nvcc() {  # megakernel_probe.py needs nvcc: without one on PATH or in /usr/local/cuda, pip's CUDA compiler
    if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
        nv=$(python3 -c "import glob, nvidia; print(next(iter(glob.glob(nvidia.__path__[0] + '/cu*/bin/nvcc') + glob.glob(nvidia.__path__[0] + '/cuda_nvcc/bin/nvcc')), ''))" 2>/dev/null)
        [ -n "$nv" ] && export CUDA_HOME=$(dirname "$(dirname "$nv")")
        echo "nvcc: ${nv:-none}"
    fi
}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/[ ,].*//' | tr 'A-Z' 'a-z')
if [ "$stage" = a ]; then  # ≈ 9 minutes: the compiled tests (≈ 40 s per real-width case on an H100)
    step gpu_tests 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_kernels.py -k real_widths
    # (not the tensor-parallel case: it needs the 8 fake CPU devices; the GPU machine has one device)
    step quantize_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py -k "not tensor_parallel"
elif [ "$stage" = b ]; then  # ≈ 9 minutes at most
    cd benchmarks || exit 1
    step generate_2_7b 330 python3 generate.py --model mamba2_2_7b --batch 1,32 --state-dtype bfloat16 \
        --quantize none,fp8 --peer --out "$OUT/generate_2_7b_$gpu.json"
    step megakernel 60 python3 megakernel_probe.py --trace --configs 0:40960:5,0:20480:6,1:40960:5,2:40960:5 \
        --out "$OUT/megakernel_probe_$gpu.json"
    step generate_small 150 python3 generate.py --model mamba2_130m,nemotronh_8b_13l --batch 1,32 \
        --state-dtype bfloat16 --quantize none,fp8 --peer --out "$OUT/generate_130m_8b13l_$gpu.json"
elif [ "$stage" = c ]; then  # ≈ 8 minutes at most: fp8 training against bf16, one GPU
    cd benchmarks || exit 1
    step train_fp8_1_3b 240 python3 train.py --recipe ../experiments/mamba2_1_3b.py --batch 4 --remat selective \
        --set ssd_impl=pallas --fp8 off,0 --steps 6 --out "$OUT/train_fp8_mamba2_1_3b_$gpu.json"
    step train_fp8_2_7b 240 python3 train.py --recipe ../experiments/mamba2_2_7b.py --batch 1 --remat selective \
        --set ssd_impl=pallas --fp8 off,0 --steps 6 --out "$OUT/train_fp8_mamba2_2_7b_$gpu.json"
elif [ "$stage" = d ]; then  # ≈ 8 minutes at most: the float8 GEMV's tiles, the megakernel probe, a batch-1 A/B
    cd benchmarks || exit 1
    step fp8_probe 100 python3 gemv_probe.py --fp8 --out "$OUT/gemv_probe_fp8_$gpu.json"
    find_nvcc
    step megakernel 50 python3 megakernel_probe.py --trace --configs 0:40960:5,0:20480:6,1:40960:5,2:40960:5 \
        --out "$OUT/megakernel_probe_$gpu.json"
    # the fastest batch-1 tiles per shape from the probe, as MAMBA_JAX_DECODE_GEMV_Q="KxN=bn,bk,…|KxN=…"
    best=$(python3 -c "
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))['rows'] if r['impl'] == 'gemv_q' and r['b'] == 1 and 'us' in r]
best = {}
for r in rows:
    key = f\"{r['k']}x{r['n']}\"
    if key not in best or r['us'] < best[key]['us']:
        best[key] = r
print('|'.join(f\"{k}={r['bn']},{r['bk']},{r['splits']},{r['warps']},{r['stages']},{r['mode']}\" for k, r in best.items()))
" "$OUT/gemv_probe_fp8_$gpu.json")
    echo "best tiles: $best"
    step variants_b1 120 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 1 --reps 3 \
        --variant "fp8_xla:quantize=fp8" --variant "fp8_q:quantize=fp8;MAMBA_JAX_DECODE_GEMV_Q=$best" \
        --out "$OUT/decode_variants_fp8_gemv_best_2_7b_b1_$gpu.json"
elif [ "$stage" = e ]; then  # ≈ 9 minutes at most: generate.py against mamba_ssm, the batch-32 float8 A/B
    cd benchmarks || exit 1
    step generate_2_7b 330 python3 generate.py --model mamba2_2_7b --batch 1,32 --state-dtype bfloat16 \
        --quantize none,fp8 --peer --out "$OUT/generate_2_7b_$gpu.json"
    step variants_b32 210 python3 decode_variants.py --model mamba2_2_7b --batch 32 --rounds 2 --reps 3 \
        --variant "fp8_xla:quantize=fp8;MAMBA_JAX_DECODE_GEMV_Q=xla" --variant "fp8_q:quantize=fp8" \
        --out "$OUT/decode_variants_fp8_gemv_2_7b_b32_$gpu.json"
elif [ "$stage" = f ]; then  # ≈ 4 minutes at most: the megakernel probe's modes side by side, then fp8 tests
    cd benchmarks || exit 1
    find_nvcc
    step megakernel 120 python3 megakernel_probe.py --trace \
        --configs ${MK_CONFIGS:-0:40960:5,1:40960:5,5:40960:5:2,7:40960:5:2,8:40960:5:2,9:40960:5:2} \
        --out "$OUT/megakernel_probe_$gpu.json"
    # the loop of separate kernels on the same machine, for the probe's per-layer times
    step generate_2_7b_b1 150 python3 generate.py --model mamba2_2_7b --batch 1 --state-dtype bfloat16 \
        --quantize none --out "$OUT/generate_2_7b_b1_$gpu.json"
    cd .. || exit 1
    if [ "${F_TESTS:-1}" = 1 ]; then  # F_TESTS=0: the probe and the loop only
        step quantize_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py -k "not tensor_parallel"
    fi
elif [ "$stage" = g ]; then  # ≈ 3 minutes: the CUDA skinny GEMM's kernel tests and its isolation probe
    find_nvcc
    step skinny_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_skinny_gemm.py
    cd benchmarks || exit 1
    step skinny_probe 150 python3 gemv_probe.py --skinny --out "$OUT/gemv_probe_skinny_$gpu.json"
elif [ "$stage" = h ]; then  # ≈ 9 minutes at most: the CUDA skinny GEMM in the decode loop, A/B at batch 32 and 1
    find_nvcc
    cd benchmarks || exit 1
    step variants_b32 240 python3 decode_variants.py --model mamba2_2_7b --batch 32 --rounds 2 --reps 3 \
        --variant "xla:MAMBA_JAX_DECODE_GEMM=0,0" --variant "cuda:MAMBA_JAX_DECODE_GEMM=1,2" \
        --variant "cuda_nopdl:MAMBA_JAX_DECODE_GEMM=1,2;MAMBA_JAX_SKINNY_PDL=0" \
        --variant "cuda_in:MAMBA_JAX_DECODE_GEMM=1,0" --out "$OUT/decode_variants_skinny_2_7b_b32_$gpu.json"
    [ "${B32_ONLY:-0}" = 1 ] && exit 0  # the batch-32 A/B alone (chained behind stage g in one call)
    step variants_b1 150 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 1 --reps 3 \
        --variant "xla:MAMBA_JAX_DECODE_GEMM=0,0" --variant "cuda:MAMBA_JAX_DECODE_GEMM=1,1" \
        --variant "cuda_in:MAMBA_JAX_DECODE_GEMM=1,0" --out "$OUT/decode_variants_skinny_2_7b_b1_$gpu.json"
    cd .. || exit 1
    step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_kernels.py -k cuda_gemm
elif [ "$stage" = i ]; then  # ≈ 6 minutes at most: generate.py on 2.7B with mamba_ssm side by side (the defaults)
    find_nvcc
    cd benchmarks || exit 1
    step generate_2_7b 400 python3 generate.py --model mamba2_2_7b --batch 32,1 --state-dtype bfloat16 --peer \
        --decode-impl auto,megakernel --out "$OUT/generate_2_7b_$gpu.json"
elif [ "$stage" = j ]; then  # ≈ 9 minutes at most: the megakernel against the model's step, then in the Engine
    find_nvcc
    # the FFI kernel (kernels/megakernel.cu) against the JAX reference, 2 layers, 3 tokens
    step megakernel_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py
    cd benchmarks || exit 1
    # 2.7B batch 1: the loop of separate kernels against Engine(megakernel=True) (timed whatever the test said)
    step variants_mk_b1 200 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 1 --reps 3 \
        --variant "loop:" --variant "mk:megakernel=1" --out "$OUT/decode_variants_megakernel_2_7b_b1_$gpu.json"
    # the probe's mode 5 (checked bit for bit against its separate kernels) on 8 packed layers, 1 token
    step megakernel_check 150 python3 megakernel_check.py --layers 8 --out "$OUT/megakernel_check_$gpu.json"
elif [ "$stage" = k ]; then  # ≈ 6 minutes at most: mode 10 against mode 5 in the probe, the FFI and the Engine
    find_nvcc
    cd benchmarks || exit 1
    step megakernel_probe 150 python3 megakernel_probe.py --trace \
        --configs ${MK_CONFIGS:-5:40960:5:2,10:40960:5:2:1,10:40960:5:2:0,10:40960:5:2:2,10:40960:5:1:1} \
        --out "$OUT/megakernel_probe_mode10_$gpu.json"
    cd .. || exit 1
    step megakernel_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py
    cd benchmarks || exit 1
    step variants_mk_b1 240 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 2 --reps 3 \
        --variant "loop:" --variant "mk5:megakernel=1;MAMBA_JAX_MEGAKERNEL_MODE=5" \
        --variant "mk10:megakernel=1;MAMBA_JAX_MEGAKERNEL_MODE=${MK_ENGINE_MODE:-10}" \
        --out "$OUT/decode_variants_megakernel_modes_2_7b_b1_$gpu.json"
elif [ "$stage" = l ]; then  # ≈ 8 minutes: the step's sub-phases in the probe, the FFI tests, generate.py batch 1
    find_nvcc
    cd benchmarks || exit 1
    step megakernel_probe 120 python3 megakernel_probe.py --trace \
        --configs ${MK_CONFIGS:-5:40960:5:2,11:40960:5:2,8:40960:5:2,5:40960:5:2,11:40960:5:2} \
        --out "$OUT/megakernel_probe_step_$gpu.json"
    cd .. || exit 1
    # the 2.7B bf16 cases (the other sizes and float8: stages n and o)
    step megakernel_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py \
        -k "head_phase or (2_7b and None)"
    cd benchmarks || exit 1
    step generate_2_7b_b1 300 python3 generate.py --model mamba2_2_7b --batch 1 --state-dtype bfloat16 --peer \
        --decode-impl auto,megakernel --out "$OUT/generate_2_7b_b1_megakernel_$gpu.json"
    # tokens per iteration of the host-driven loop: 4 (the default for 256 tokens) against 1; the LM head
    # inside the kernel against XLA's
    step variants_unroll_b1 240 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 2 --reps 3 \
        --variant "mk_u4:megakernel=1" --variant "mk_u1:megakernel=1;MAMBA_JAX_MEGAKERNEL_UNROLL=1" \
        --variant "mk_head:megakernel=1;MAMBA_JAX_MEGAKERNEL_HEAD=1" \
        --out "$OUT/decode_variants_megakernel_unroll_head_2_7b_b1_$gpu.json"
elif [ "$stage" = m ]; then  # ≈ 7 minutes: the batch-1 decode loop inside XLA's command buffers
    find_nvcc
    step megakernel_graph_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py -k "5-1"
    cd benchmarks || exit 1
    # WHILE lets XLA put the loop itself in a CUDA graph (conditional nodes) when every op of its body can be
    # captured: the megakernel's *_graph targets are marked so (MAMBA_JAX_MEGAKERNEL_GRAPH=1)
    CB="xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
    step variants_graph_b1 380 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 1 --reps 3 \
        --variant "loop:" --variant "loop_while:$CB" --variant "mk:megakernel=1" \
        --variant "mk_graph:megakernel=1;MAMBA_JAX_MEGAKERNEL_GRAPH=1" \
        --variant "mk_graph_while:megakernel=1;MAMBA_JAX_MEGAKERNEL_GRAPH=1;MAMBA_JAX_MEGAKERNEL_UNROLL=1;$CB" \
        --out "$OUT/decode_variants_graph_2_7b_b1_$gpu.json"
elif [ "$stage" = n ]; then  # ≈ 6 minutes: the megakernel built for the smaller Mamba2 sizes (kGeneralRows)
    find_nvcc
    # first GPU run of the builds per model size: 130M (slots of 26 / 13 rows) and 1.3B (10 / 5)
    step megakernel_size_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py \
        -k "(130m or 1_3b) and None"
    cd benchmarks || exit 1
    step generate_sizes_b1 300 python3 generate.py --model mamba2_130m,mamba2_1_3b --batch 1 \
        --state-dtype bfloat16 --peer --decode-impl auto,megakernel --out "$OUT/generate_130m_1_3b_b1_megakernel_$gpu.json"
    cd .. || exit 1
elif [ "$stage" = o ]; then  # ≈ 7 minutes: the float8 megakernel (-DMK_FP8=1): tests, then 2.7B and 130M batch 1
    find_nvcc
    step megakernel_fp8_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py -k fp8
    cd benchmarks || exit 1
    step generate_fp8_b1 330 python3 generate.py --model mamba2_2_7b,mamba2_130m --batch 1 --state-dtype bfloat16 \
        --peer --decode-impl megakernel --quantize none,fp8 --out "$OUT/generate_b1_megakernel_fp8_$gpu.json"
elif [ "$stage" = p ]; then  # ≈ 9 minutes, any Hopper card: stages l, n and o's tests in one run, then batch 1
    find_nvcc
    step megakernel_tests 330 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py
    cd benchmarks || exit 1
    step generate_b1_mk 240 python3 generate.py --model mamba2_2_7b --batch 1 --state-dtype bfloat16 --peer \
        --decode-impl megakernel --quantize none,fp8 --out "$OUT/generate_2_7b_b1_megakernel_fp8_$gpu.json"
elif [ "$stage" = q ]; then  # ≈ 8 minutes on the H100 the issue names: the LM head phase A/B, then generate.py
    find_nvcc
    cd benchmarks || exit 1
    step variants_head_b1 230 python3 decode_variants.py --model mamba2_2_7b --batch 1 --rounds 2 --reps 3 \
        --variant "mk:megakernel=1" --variant "mk_head:megakernel=1;MAMBA_JAX_MEGAKERNEL_HEAD=1" \
        --out "$OUT/decode_variants_megakernel_head_2_7b_b1_$gpu.json"
    # Q_HEAD=1: generate.py's megakernel rows with the LM head inside the kernel
    MAMBA_JAX_MEGAKERNEL_HEAD=${Q_HEAD:-0} step generate_2_7b_b1 300 python3 generate.py --model mamba2_2_7b \
        --batch 1 --state-dtype bfloat16 --peer --decode-impl auto,megakernel \
        --out "$OUT/generate_2_7b_b1_megakernel_$gpu.json"
elif [ "$stage" = r ]; then  # ≈ 9.5 minutes: one call when machines are scarce, whichever card comes
    find_nvcc
    step megakernel_tests 330 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_megakernel.py
    cd benchmarks || exit 1
    if [ "$gpu" = h100 ]; then  # the issue's row: the loop and the megakernel against mamba_ssm
        step generate_2_7b_b1 250 python3 generate.py --model mamba2_2_7b --batch 1 --state-dtype bfloat16 --peer \
            --decode-impl auto,megakernel --out "$OUT/generate_2_7b_b1_megakernel_$gpu.json"
    else  # another card: the float8 rows against bf16, mamba_ssm beside them
        step generate_b1_mk 250 python3 generate.py --model mamba2_2_7b --batch 1 --state-dtype bfloat16 --peer \
            --decode-impl megakernel --quantize none,fp8 --out "$OUT/generate_2_7b_b1_megakernel_fp8_$gpu.json"
    fi
elif [ "$stage" = s ]; then
    # the producer cursor's A/B of 2026-12-06 (MK_CURSOR 0-3, results/megakernel_probe_cursor_h100.jsonl) is done:
    # variant 1 (both cursor functions inlined) is the kernel's only code now, the variants and their switch removed
    echo "stage s: the cursor A/B of 2026-12-06 is done and its variants removed (kernels/megakernel.cuh inlines both)"
    exit 0
elif [ "$stage" = t ]; then  # (done) where the batch-32 persistent projections lose time; batch 1 again
    # (its modes 1, 4, 5, 7-10 are gone from batch32_probe.cu: their code is at 21af4dc; its batch-1 run hit its
    # limit and was repeated in stage u)
    echo "stage t: done on 2026-12-06 at 0841341 (benchmarks/results/batch32_probe_modes_h100.jsonl); its modes were removed since"
    exit 0
elif [ "$stage" = u ]; then  # (done) batch32_probe's consumers unrolled (A/B against .ab/, cycle counts)
    echo "stage u: done on 2026-12-06 at e88e7ca (results in benchmarks/results/batch32_probe_unrolled_h100.jsonl, generate_2_7b_b1_megakernel_default_h100.json); modes 8, 9, 10 were removed since"
    exit 0
elif [ "$stage" = v ]; then  # (done) a whole 2.7B layer's bytes at batch 32 in one launch per token
    echo "stage v: done on 2026-12-06 at 31be137 and a56573b (results in benchmarks/results/batch32_probe_state_h100.jsonl, batch32_probe_state2_h100.jsonl); --pf was removed since"
    exit 0
elif [ "$stage" = w ]; then  # (done) mode 12's state write-back by the TMA instead of per-lane stores
    echo "stage w: done on 2026-12-06 at 1428718 (results in benchmarks/results/batch32_probe_bulk_store_h100.jsonl); --bulk-store was removed since"
    exit 0
elif [ "$stage" = x ]; then  # ≈ 1 minute: can the in-kernel state phase match XLA's 27.2 µs per layer?
    # (done on 2026-12-06 at 21af4dc: results/batch32_probe_state_alone_h100.jsonl; runs as it did on the trimmed probe)
    find_nvcc
    nv=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    f="$OUT/batch32_probe_state_alone_$gpu.jsonl"
    "$nv" -O3 -std=c++17 -arch=sm_90a -o /tmp/b32 benchmarks/batch32_probe.cu &&
        timeout 90 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 13,12,11 --check 1 | tee "$f"
    timeout 60 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 13 --check 0 --clock 1 | tee -a "$f"
    timeout 60 /tmp/b32 --layers 64 --tokens 10 --cps 4 --modes 13 --check 0 | tee -a "$f"
elif [ "$stage" = y ]; then  # ≈ 2 minutes: the trimmed probe's modes; 14 / 15, the projections as standalone GEMMs
    find_nvcc
    nv=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    f="$OUT/batch32_probe_trimmed_$gpu.jsonl"
    # the checks of modes 0, 11 and 12 and every kept mode's time, then the cycle counts of 11, 12 and 13
    "$nv" -O3 -std=c++17 -arch=sm_90a -o /tmp/b32 benchmarks/batch32_probe.cu &&
        timeout 120 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 0,11,12,13,2,6,3 --check 1 | tee "$f"
    timeout 60 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 11,12,13 --check 0 --clock 1 | tee -a "$f"
    # in_proj / out_proj as standalone launches of this design (with and without PDL; mode 14 checked)
    timeout 60 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 14,15 --check 1 | tee -a "$f"
    timeout 60 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 14,15 --check 0 --pdl 0 | tee -a "$f"
    timeout 60 /tmp/b32 --layers 64 --tokens 10 --cps 4 --modes 14,15 --check 0 | tee -a "$f"
elif [ "$stage" = z ]; then  # ≈ 1 minute: modes 14 / 15 (stage y's run of them at b0147e0 hung: the consumers entered the state phase)
    find_nvcc
    nv=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    f="$OUT/batch32_probe_standalone_$gpu.jsonl"
    "$nv" -O3 -std=c++17 -arch=sm_90a -o /tmp/b32 benchmarks/batch32_probe.cu &&
        timeout 30 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 14,15,11 --check 1 | tee "$f"
    timeout 20 /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 14,15 --check 0 --pdl 0 | tee -a "$f"
elif [ "$stage" = window ]; then  # ≈ 9 minutes: the CUDA window step (kernels/ssm_update.cu): tests, profile, A/B
    find_nvcc
    # the kernel tests first (both targets, tiles and persistent stream; the stream kernel was refactored
    # after its last GPU run, f4d7fea → next), then the model at real widths with the default window
    step window_tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_kernels.py \
        -k "cuda_window_update or real_widths_on_gpu and ${WINDOW_TESTS:-1-8-xla-8}"
    cd benchmarks || exit 1
    [ "${PROFILE:-1}" = 1 ] && step profile_window 150 python3 decode_profile.py \
        --batch 32 --new-tokens 32 --out "$OUT/decode_profile_mamba2_2_7b_b32_window_$gpu.json"
    W=MAMBA_JAX_DECODE_WINDOW P=MAMBA_JAX_DECODE_WINDOW_PDL C=MAMBA_JAX_DECODE_WINDOW_ROWS
    step variants_window_b32 330 python3 decode_variants.py --model mamba2_2_7b --batch 32 --rounds 2 --reps 3 \
        --variant "per_token:$W=0" --variant "w8:" --variant "w16:$W=16" --out "$OUT/decode_variants_cuda_window_2_7b_b32_$gpu.json"
    [ "${VARIANTS_ONLY:-0}" = 1 ] && exit 0
    step generate_b32 300 python3 generate.py --model mamba2_2_7b --batch 32 \
        --state-dtype bfloat16 --peer --decode-impl auto --out "$OUT/generate_2_7b_b32_window_$gpu.json"
elif [ "$stage" = window2 ]; then  # (done) the coefficients in registers, the coalesced stream: tests, profile, A/B
    echo "stage window2: done on 2026-12-06 at 24c6d2f (results/decode_variants_window_regs_coalesced_2_7b_b32_h100.json, decode_profile_mamba2_2_7b_b32_window_v3_h100.json); the variants it compared were removed since"
    exit 0
elif [ "$stage" = window3 ]; then  # ≈ 8 minutes: the kernel and model tests of the default, then generate.py b32 + peer
    find_nvcc
    step window_tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_kernels.py \
        -k "cuda_window_update or real_widths_on_gpu and 1-8-xla-8"
    cd benchmarks || exit 1
    step generate_b32 330 python3 generate.py --model mamba2_2_7b --batch 32 \
        --state-dtype bfloat16 --peer --decode-impl auto --out "$OUT/generate_2_7b_b32_window_$gpu.json"
elif [ "$stage" = window4 ] || [ "$stage" = window5 ] || [ "$stage" = window6 ]; then
    # the A/B of 2026-12-06 (results/decode_variants_window_pdl_fused_2_7b_b32_h100.json) is done: PDL 1 is the
    # default, the fused prep (slower: 7,375 against 7,769 tok/s) and its variables removed
    echo "stage $stage: the PDL / fused-prep A/B of 2026-12-06 is done; the fused prep removed, PDL 1 the default"
    exit 0
else
    echo "unknown stage $stage (a … z, window, window2 … window6)" >&2
    exit 2
fi
