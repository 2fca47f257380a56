"""Benchmark: tokens/s and MFU of palm-small in the reference trainer.

Baseline: this machine's float32 matmul peak, measured in the same run (a large square matmul
in the same JAX runtime). MFU = tokens/s x FLOPs per token (6N + 12 L H Q T) / that peak.
PaLM 540B reached 46.2% on TPU v4; the ratio against that figure is printed too.

Usage: python bench/reference_mfu.py [--steps 20] [--batch 8] [--seq-len 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PALM_540B_MFU = 0.462


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="palm-small")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from pathways_lite.model import estimates
    from pathways_lite.model.config import PalmConfig
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.train import StepFunctions

    cfg = PalmConfig.from_preset(args.preset)
    fns = StepFunctions(cfg, OptimConfig())
    state = fns.init(0)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq_len + 1), dtype=np.int32)

    for _ in range(2):  # compile and warm up
        state, _ = fns.train_step(state, batch)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, loss = fns.train_step(state, batch)
    seconds = time.perf_counter() - start

    peak = estimates.measure_cpu_peak_flops()
    tokens_per_s = args.steps * args.batch * args.seq_len / seconds
    fpt = estimates.flops_per_token(cfg, args.seq_len)
    mfu = estimates.mfu(tokens_per_s, fpt, peak)
    result = {
        "preset": args.preset,
        "params": estimates.param_count(cfg),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "step_ms": 1000 * seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "baseline": "float32 matmul peak measured in this run",
        "peak_flops": peak,
        "mfu": mfu,
        "mfu_vs_palm_540b": mfu / PALM_540B_MFU,
        "final_loss": loss,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset}: {result['params']:,} params, batch {args.batch} x {args.seq_len}")
    print(f"step {result['step_ms']:.1f} ms, {tokens_per_s:,.0f} tokens/s")
    print(f"baseline: matmul peak {peak / 1e9:.1f} GFLOP/s (measured in this run)")
    print(
        f"MFU = {mfu:.1%}  (ours / matmul peak); vs PaLM 540B's 46.2%: {mfu / PALM_540B_MFU:.2f}x"
    )


if __name__ == "__main__":
    main()
