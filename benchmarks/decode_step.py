"""The SSD decode step (one token, state in → state out) against memory bandwidth.

  python benchmarks/decode_step.py [--batch 1,32] [--out benchmarks/results/decode_step_h100.json]

A decode step reads each layer's SSM state (B, H, P, N) and writes it back; everything else it touches is
(B, H, P) or smaller, so its floor is 2 × state bytes / bandwidth. Per layer that is microseconds, so the
step is timed over a stack of 64 layers (as Mamba2-2.7B) inside one jit, the states donated, in two layouts:
`per_layer` (one buffer per layer, updated in place: how the engine decodes, see `unstack_layers`) and
`scanned` (`lax.scan` over one stacked state, which XLA rebuilds every step); bytes moved are counted over
all layers. Shapes: the
Mamba2-2.7B layer (80 heads of 64, 1 group, state 128) and the Hybrid-8B layer (128 heads of 64, 8 groups,
state 128); state in float32 (our default) and bf16 (mamba_ssm's cache dtype). The bandwidth is measured
in the same run with a device copy.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
from bench_util import bandwidth_bytes_per_s, timed, write_result

from mamba_jax.ops import ssd_step

SHAPES = {"mamba2_2_7b": (80, 64, 1, 128), "hybrid_8b": (128, 64, 8, 128)}


@functools.partial(jax.jit, donate_argnums=0)
def step_all_layers(state_LBHPN, x_BHP, dt_BH, A_LH, B_BGN, C_BGN, D_LH, z_BHP, dt_bias_LH):
    """One token through every layer's state update (inputs shared by the layers: only the state differs)."""

    def body(carry, xs):
        state, A, D, dt_bias = xs
        y, new = ssd_step(state, carry, dt_BH, A, B_BGN, C_BGN, D=D, z_BHP=z_BHP, dt_bias=dt_bias, dt_softplus=True)
        return y, new.astype(state.dtype)

    y, new_state = jax.lax.scan(body, x_BHP, (state_LBHPN, A_LH, D_LH, dt_bias_LH))
    return new_state, y


@functools.partial(jax.jit, donate_argnums=0)
def step_per_layer(states, x_BHP, dt_BH, A_LH, B_BGN, C_BGN, D_LH, z_BHP, dt_bias_LH):
    """The same with one state buffer per layer (a tuple), unrolled."""
    new, y = [], x_BHP
    for i, state in enumerate(states):
        y, s = ssd_step(state, y, dt_BH, A_LH[i], B_BGN, C_BGN, D=D_LH[i], z_BHP=z_BHP, dt_bias=dt_bias_LH[i],
                        dt_softplus=True)  # fmt: skip
        new.append(s.astype(state.dtype))
    return tuple(new), y


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="1,32")
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--out", default="")
    args = p.parse_args()
    bw = bandwidth_bytes_per_s()[0]  # copy: the state update reads and writes
    rows = []
    k = jax.random.key(0)
    cases = [
        (name, layout, state_dtype, int(b))
        for name in SHAPES
        for layout in ("per_layer", "scanned")
        for state_dtype in ("float32", "bfloat16")
        for b in args.batch.split(",")
    ]
    for name, layout, state_dtype, b in cases:
        h, pd, g, n = SHAPES[name]
        L = args.layers
        ks = jax.random.split(k, 8)
        state = jax.random.normal(ks[0], (L, b, h, pd, n), state_dtype)
        if layout == "per_layer":
            state = tuple(state[i] for i in range(L))
        fn = step_per_layer if layout == "per_layer" else step_all_layers
        x = jax.random.normal(ks[1], (b, h, pd), jnp.bfloat16)
        dt = jax.random.normal(ks[2], (b, h), jnp.bfloat16)
        A = -jnp.exp(jax.random.normal(ks[3], (L, h)))
        Bm = jax.random.normal(ks[4], (b, g, n), jnp.bfloat16)
        Cm = jax.random.normal(ks[5], (b, g, n), jnp.bfloat16)
        D, z, dt_bias = jnp.ones((L, h)), jax.random.normal(ks[6], (b, h, pd), jnp.bfloat16), jnp.zeros((L, h))
        holder = [state]

        def run(holder=holder, fn=fn, x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, D=D, z=z, dt_bias=dt_bias):
            holder[0], y = fn(holder[0], x, dt, A, Bm, Cm, D, z, dt_bias)
            return y

        t = timed(run)
        state_bytes = L * b * h * pd * n * jnp.dtype(state_dtype).itemsize
        io_bytes = L * (3 * b * h * pd * 2 + 2 * b * g * n * 2 + b * h * 2)  # x, z, y; B, C; dt
        moved = 2 * state_bytes + io_bytes
        row = {
            "shape": name,
            "layout": layout,
            "heads_headdim_groups_state": [h, pd, g, n],
            "layers": L,
            "batch": b,
            "state_dtype": state_dtype,
            "us_per_layer": 1e6 * t / L,
            "bytes_per_layer": moved / L,
            "achieved_bytes_per_s": moved / t,
            "fraction_of_bandwidth": moved / t / bw,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del holder[0]
    print(f"\n{jax.devices()[0].device_kind}: measured bandwidth {bw / 1e12:.2f} TB/s")
    print(
        f"{'shape':>12} {'layout':>9} {'state':>9} {'batch':>5} {'µs/layer':>9} {'MB/layer':>9} {'TB/s':>6} {'× bw':>5}"
    )
    for r in rows:
        print(
            f"{r['shape']:>12} {r['layout']:>9} {r['state_dtype']:>9} {r['batch']:>5} {r['us_per_layer']:>9.2f} "
            f"{r['bytes_per_layer'] / 1e6:>9.2f} {r['achieved_bytes_per_s'] / 1e12:>6.2f} "
            f"{r['fraction_of_bandwidth']:>5.2f}"
        )
    write_result(args.out, {"bandwidth_bytes_per_s": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
