"""The two ways to get gradients off a host while the backward pass runs, measured on CPU.

A stack of L residual MLP layers (d x 4d x d, batch B) trained by three programs:
- `one program`: the plain value_and_grad, the baseline (gradients only at the end);
- `host callbacks`: the same one compiled program, with an identity `custom_vjp` around
  each layer's parameters whose backward hands the finished gradient to the host
  (`io_callback`) -- what workers/exchange_overlap.py uses;
- `layer programs`: a forward program per layer that keeps its `jax.vjp` residuals and a
  backward program per layer, dispatched asynchronously, last layer first.

Printed per mechanism: step time over the baseline's, and when the first and the last
gradient reached the host, as a fraction of the step (earlier = more of the exchange can
hide under the rest of the backward).

Run: .venv/bin/python bench/overlap_mechanisms.py [--layers 8 --d 256 --batch 256]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import io_callback

    L, d, B = args.layers, args.d, args.batch
    keys = jax.random.split(jax.random.key(0), 2 * L)
    params = [
        (
            jax.random.normal(keys[2 * i], (d, 4 * d)) / np.sqrt(d),
            jax.random.normal(keys[2 * i + 1], (4 * d, d)) / np.sqrt(4 * d),
        )
        for i in range(L)
    ]
    x = jax.random.normal(jax.random.key(1), (B, d))

    def layer(p, h):
        return h + jnp.tanh(h @ p[0]) @ p[1]

    def loss(ps, h):
        for p in ps:
            h = layer(p, h)
        return jnp.mean(h * h)

    arrivals: list[float] = []

    def sink(_i, *_g):
        arrivals.append(time.perf_counter())

    def tap(i):
        @jax.custom_vjp
        def ident(p):
            return p

        def bwd(_, g):
            io_callback(functools.partial(sink, i), None, *g, ordered=False)
            return (g,)

        ident.defvjp(lambda p: (p, None), bwd)
        return ident

    taps = [tap(i) for i in range(L)]
    one = jax.jit(jax.value_and_grad(loss))
    tapped = jax.jit(
        jax.value_and_grad(lambda ps, h: loss([t(p) for t, p in zip(taps, ps, strict=True)], h))
    )

    fwd = jax.jit(lambda p, h: jax.vjp(layer, p, h))
    head = jax.jit(jax.value_and_grad(lambda h: jnp.mean(h * h)))
    back = jax.jit(lambda vjp, g: vjp(g))

    def layered(ps, h):
        vjps = []
        for p in ps:
            h, vjp = fwd(p, h)
            vjps.append(vjp)
        value, g = head(h)
        grads = [None] * len(ps)
        for i in reversed(range(len(ps))):
            grads[i], g = back(vjps[i], g)
            # The gradient reaches the host as soon as its program is done.
            jax.block_until_ready(grads[i])
            arrivals.append(time.perf_counter())
        return value, grads

    def timed(fn) -> tuple[float, float, float]:
        jax.block_until_ready(fn(params, x))
        steps, firsts, lasts = [], [], []
        for _ in range(args.repeats):
            arrivals.clear()
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            t1 = time.perf_counter()
            steps.append(t1 - t0)
            if arrivals:
                firsts.append((arrivals[0] - t0) / (t1 - t0))
                lasts.append((arrivals[-1] - t0) / (t1 - t0))
        return (
            statistics.median(steps),
            statistics.median(firsts) if firsts else 1.0,
            statistics.median(lasts) if lasts else 1.0,
        )

    results = {}
    # Interleaved rounds: the machine's load drifts.
    rounds = {"one_program": [], "host_callbacks": [], "layer_programs": []}
    for _ in range(3):
        rounds["one_program"].append(timed(one))
        rounds["host_callbacks"].append(timed(tapped))
        rounds["layer_programs"].append(timed(layered))
    base = statistics.median(r[0] for r in rounds["one_program"])
    for name, rs in rounds.items():
        step = statistics.median(r[0] for r in rs)
        results[name] = {
            "step_ms": round(step * 1e3, 2),
            "step_over_one_program": round(step / base, 3),
            "first_gradient_at": round(statistics.median(r[1] for r in rs), 3),
            "last_gradient_at": round(statistics.median(r[2] for r in rs), 3),
        }
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{L} layers of d={d} (4d MLP), batch {B}; baseline: one value_and_grad program")
    for name, r in results.items():
        print(
            f"{name:15s} step {r['step_ms']:8.2f} ms ({r['step_over_one_program']:.3f}x), "
            f"first gradient on the host at {r['first_gradient_at']:.0%} of the step, "
            f"last at {r['last_gradient_at']:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
