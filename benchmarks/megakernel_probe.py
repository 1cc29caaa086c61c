"""Build and run `megakernel_probe.cu`: one CUDA launch per Mamba2 2.7B decode token at batch 1 (weights
streamed by a producer warp per SM through a shared-memory ring, the layers' phases chained through global
memory), checked bit for bit against the same math run as separate kernels, then timed per config.

    python benchmarks/megakernel_probe.py [--layers 64] [--tokens 20] [--configs 0:40960:5,5:40960:5:2,10:40960:5:2:1]
        [--trace] [--out results/megakernel_probe_h100.json]

Configs are MODE:SLOT_BYTES:STAGES[:PF] — mode 0 the full step (phases chained by per-layer counters: a
fence and an atomic to arrive, polling to wait), 1 the weight stream and its GEMVs alone (no waits, no SSM
step), 2 the counters' waits without the SSM step, 3 the ring alone (slots released unread), 4 the full step
chained by tagged data instead (each 8-byte word holds 4 bytes of data and the tag of the token and layer that
wrote it, polled until the tags match: no fence, no counter; the step's state, conv inputs and weights loaded
at the layer's start), 5 mode 4 with the step's state and conv inputs streamed through the ring as one more
slot, 6 mode 5 with each CTA's share of the B / C / dt rows first, 7 mode 5 with the in_proj rows split so that
every CTA streams the same bytes, 8 mode 5 without the step's arithmetic (timing only), 9 mode 5 with the
step's conv-ring stores issued after g is published, 10 the steps inside in_proj's stream and out_proj by
chunks of heads (MODE:SLOT:STAGES:PF:SLACK), 11 mode 5 with the state update as a rolled loop. PF > 0: the
producer also pulls the rows PF slots past the ring's into L2. Needs nvcc (CUDA_HOME, /usr/local/cuda or
PATH) and a Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench_util import write_result

HERE = os.path.dirname(os.path.abspath(__file__))


def nvcc() -> str:
    """The CUDA compiler the library's kernels are built with (`mamba_jax.kernels.cuda_build.nvcc`)."""
    from mamba_jax.kernels.cuda_build import nvcc as find

    if not (found := find()):
        sys.exit("megakernel_probe: no nvcc (set CUDA_HOME to a CUDA 12.4+ toolkit)")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--configs", default="")
    p.add_argument("--trace", action="store_true", help="one more traced launch per config: per-phase times")
    p.add_argument("--out", default="")
    args = p.parse_args()
    binary = os.path.join(tempfile.mkdtemp(), "megakernel_probe")
    cmd = [nvcc(), "-O3", "-std=c++17", "-arch=sm_90a", "--fmad=false", "-o", binary]
    subprocess.run([*cmd, os.path.join(HERE, "megakernel_probe.cu")], check=True)
    run = [binary, "--layers", str(args.layers), "--tokens", str(args.tokens)]
    if args.trace:
        run += ["--trace", "1"]
    if args.configs:
        run += ["--configs", args.configs]
    proc = subprocess.run(run, capture_output=True, text=True)
    rows = []
    for line in proc.stdout.splitlines():
        print(line, flush=True)
        rows.append(json.loads(line))
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
    write_result(args.out, {"nvcc": " ".join(cmd), "returncode": proc.returncode, "rows": rows, "stderr": proc.stderr})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
