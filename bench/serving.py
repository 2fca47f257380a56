"""Serving beside training on one island (issue 18): continuous batching throughput and
latency, alone and with a co-resident training job, and that job's retained throughput.

One process plays one island host: the real slot decoder and continuous batching loop
(model/decode.py, workers/serve_engine.py) and real training steps of the same model
(model/train.py's StepFunctions), both through the host's own gate (workers/serve_rpc.py's
`ServingHost.training_step`: a training step waits while requests decode). No gRPC: the
figures are the island's, not the wire's.

Measured side by side in one run:
- throughput (generated tokens per second) with 1, 8 and 32 closed-loop clients, each asking
  for `--tokens` tokens after a short random prompt; the baseline of `speedup_*` is the same
  resident service with one client; the one-off `sample` path (model/sampling.py's generate,
  one request at a time) is printed beside it;
- time to first token and per-token latency (p50/p99, client-side gaps between tokens) with
  8 clients, alone and with a training job looping its steps on the island;
- the training job's steps/s alone and while the service gets 1 request/s of `--tokens`
  tokens (training_retained_fraction).

Goals (issue 18): speedup_32_clients >= 8; token_p99_ms_with_training <= 1.5 x
token_p99_ms_alone; training_retained_fraction >= 0.8.

With `--through-controller` the same figures come through the controller instead: a local
cluster (Ray, an island host process, the controller), a `kind: serve` job answering
`Generate` streams routed by the controller, and a training job on the same island whose
slices the controller cuts while requests decode (bench/serving_controller.py).

Run: .venv/bin/python bench/serving.py [--json] [--model palm-small] [--seconds 6]
     .venv/bin/python bench/serving.py --through-controller [--json] [--model palm-tiny]
         [--devices-per-island 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def closed_loop(
    n: int,
    seconds: float,
    request: Callable[[Any, random.Random], tuple[float, list[float], int]],
    connect: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict:
    """n closed-loop clients for `seconds`, each on its own `connect()`ion, sending
    `request(connection, rng)` -> (ttft ms, per-token gaps ms, tokens) back to back: tokens/s
    and latency percentiles."""
    ttfts: list[float] = []
    gaps: list[float] = []
    count = [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        with connect() as connection:
            while time.perf_counter() < end:
                t, g, k = request(connection, rng)
                with lock:
                    ttfts.append(t)
                    gaps.extend(g)
                    count[0] += k

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": count[0] / wall,
        "ttft_p50_ms": pct(ttfts, 0.5),
        "ttft_p99_ms": pct(ttfts, 0.99),
        "token_p50_ms": pct(gaps, 0.5),
        "token_p99_ms": pct(gaps, 0.99),
        "requests": len(ttfts),
    }


class Island:
    """A model served and trained on one set of devices, through the host's gate."""

    def __init__(self, preset: str, max_batch: int, max_seq_len: int, train_batch: int) -> None:
        from pathways_lite.model.config import PalmConfig
        from pathways_lite.model.decode import SlotDecoder
        from pathways_lite.model.optim import OptimConfig
        from pathways_lite.model.train import StepFunctions
        from pathways_lite.workers.serve_engine import ServeEngine
        from pathways_lite.workers.serve_rpc import ServingHost

        self.cfg = PalmConfig.from_preset(preset)
        self.fns = StepFunctions(self.cfg, OptimConfig())
        self.state = self.fns.init(0)
        self.host = ServingHost()
        self.host._serving_init()
        # The serve job's own parameters (another job's than the trained ones: a training
        # step donates its state's buffers).
        self.served = self.fns.init(1)
        self.decoder = SlotDecoder(self.fns.model(self.served), max_batch, max_seq_len)
        self.engine = ServeEngine(
            self.decoder,
            lambda ids: " ".join(map(str, ids)),
            gate=self.host.gate,
            lock=self.host.device_thread_lock,
        )
        rng = np.random.default_rng(0)
        self.train_seq = min(256, self.cfg.max_seq_len)
        self.batch = rng.integers(0, self.cfg.vocab_size, (train_batch, self.train_seq + 1))
        self.batch = self.batch.astype(np.int32)
        self.train_steps = 0
        self._stop_training = threading.Event()

    def _step(self) -> None:
        import jax

        self.state, _ = self.fns.train_step(self.state, self.batch)
        jax.block_until_ready(self.state.params)  # as the host does with a service resident

    def train_for(self, seconds: float) -> float:
        """Steps per second of training alone (through the gate) over `seconds`."""
        end, n = time.perf_counter() + seconds, 0
        start = time.perf_counter()
        while time.perf_counter() < end:
            self.host.training_step(self._step)
            n += 1
        return n / (time.perf_counter() - start)

    def start_training(self) -> threading.Thread:
        self._stop_training.clear()
        self.train_steps = 0

        def loop() -> None:
            while not self._stop_training.is_set():
                self.host.training_step(self._step)
                self.train_steps += 1

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    def stop_training(self, t: threading.Thread) -> None:
        self._stop_training.set()
        t.join()

    def request(self, rng: random.Random, tokens: int) -> tuple[float, list[float], int]:
        """One request, blocking: (ttft ms, inter-token gaps ms, tokens)."""
        from pathways_lite.workers.serve_engine import Request

        prompt = [rng.randrange(3, self.cfg.vocab_size) for _ in range(rng.randint(4, 16))]
        sent = time.perf_counter()
        req = self.engine.submit(
            Request(prompt, max_tokens=tokens, temperature=0.0, seed=rng.randrange(1 << 30))
        )
        first, last, gaps, n = None, None, [], 0
        while True:
            ev = req.events.get(timeout=120)
            now = time.perf_counter()
            if ev[0] == "token":
                n += 1
                if first is None:
                    first = now
                else:
                    gaps.append((now - last) * 1e3)
                last = now
            elif ev[0] == "end":
                return ((first or now) - sent) * 1e3, gaps, n
            else:
                raise RuntimeError(ev[2])

    def clients(self, n: int, seconds: float, tokens: int) -> dict:
        """n closed-loop clients for `seconds`: tokens/s and latency percentiles."""
        return closed_loop(n, seconds, lambda _, rng: self.request(rng, tokens))

    def open_loop(self, rate: float, seconds: float, tokens: int) -> int:
        """Requests at `rate` per second for `seconds` (each in its own thread)."""
        rng = random.Random(99)
        threads, start = [], time.perf_counter()
        k = 0
        while time.perf_counter() - start < seconds:
            t = threading.Thread(target=self.request, args=(random.Random(k), tokens))
            t.start()
            threads.append(t)
            k += 1
            time.sleep(rng.expovariate(rate))
        for t in threads:
            t.join()
        return k

    def one_off(self, requests: int, tokens: int) -> float:
        """The one-off `sample` path (model/sampling.py's generate), one at a time: tokens/s."""
        from pathways_lite.model.sampling import generate

        model = self.fns.model(self.served)
        rng = random.Random(5)
        generate(model, [1, 2, 3, 4], tokens)  # compile
        start = time.perf_counter()
        for _ in range(requests):
            generate(model, [rng.randrange(3, self.cfg.vocab_size) for _ in range(8)], tokens)
        return requests * tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="palm-small", help="model preset (default palm-small)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement (6)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--through-controller",
        action="store_true",
        help="measure through a local cluster's controller (real gRPC, the controller's cut)",
    )
    parser.add_argument(
        "--devices-per-island",
        type=int,
        default=2,
        help="with --through-controller: the island's CPU devices, both jobs model parallel "
        "over all of them (default 2, as the test cluster)",
    )
    args = parser.parse_args(argv)
    if args.through_controller:
        return through_controller(args)

    isl = Island(args.model, args.max_batch, args.max_seq_len, args.train_batch)
    secs, tok = args.seconds, args.tokens
    # Warm-up: the training step, the one-off path, then every prefill bucket the runs use
    # and every decode bucket (the service's programs last: after a first training step one
    # prefill program was seen to compile again).
    from pathways_lite.model.decode import Sampling

    isl.train_for(1.0)
    one_off = isl.one_off(3, tok)
    for _ in range(2):
        for rows in isl.decoder.row_buckets:
            isl.decoder.prefill([[1] * 16] * rows, list(range(rows)), Sampling.zeros(rows))
        isl.decoder.warm()  # every decode bucket
        isl.clients(args.max_batch, 1.0, 4)
        isl.clients(1, 0.5, 4)
    traces = isl.decoder.traces
    runs = {n: isl.clients(n, secs, tok) for n in (1, 8, 32)}
    recompiles = isl.decoder.traces - traces
    # On a machine shared with other work, each "alone" figure is the mean of two runs that
    # bracket the shared one (their spread is printed).
    trainer = isl.start_training()
    time.sleep(0.5)
    with_training = isl.clients(8, secs, tok)
    isl.stop_training(trainer)
    alone_again = isl.clients(8, secs, tok)
    token_p99_alone = (runs[8]["token_p99_ms"] + alone_again["token_p99_ms"]) / 2
    train_alone_runs = [isl.train_for(secs)]
    trainer = isl.start_training()
    start = time.perf_counter()
    isl.open_loop(1.0, secs, tok)
    train_shared = isl.train_steps / (time.perf_counter() - start)
    isl.stop_training(trainer)
    train_alone_runs.append(isl.train_for(secs))
    train_alone = sum(train_alone_runs) / 2
    isl.engine.stop("bench over")

    base = runs[1]["tokens_per_s"]
    out = {
        "model": args.model,
        "max_batch": args.max_batch,
        "tokens_per_request": tok,
        "one_off_tokens_per_s": one_off,
        "tokens_per_s_1_client": base,
        "tokens_per_s_8_clients": runs[8]["tokens_per_s"],
        "tokens_per_s_32_clients": runs[32]["tokens_per_s"],
        "speedup_8_clients": runs[8]["tokens_per_s"] / base,
        "speedup_32_clients": runs[32]["tokens_per_s"] / base,
        "speedup_32_clients_vs_one_off": runs[32]["tokens_per_s"] / one_off,
        "ttft_p50_ms": runs[8]["ttft_p50_ms"],
        "ttft_p99_ms": runs[8]["ttft_p99_ms"],
        "token_p50_ms_alone": runs[8]["token_p50_ms"],
        "token_p99_ms_alone": token_p99_alone,
        "token_p99_ms_alone_runs": [runs[8]["token_p99_ms"], alone_again["token_p99_ms"]],
        "ttft_p99_ms_with_training": with_training["ttft_p99_ms"],
        "token_p50_ms_with_training": with_training["token_p50_ms"],
        "token_p99_ms_with_training": with_training["token_p99_ms"],
        "token_p99_ratio_with_training": with_training["token_p99_ms"] / runs[8]["token_p99_ms"],
        "training_steps_per_s_alone": train_alone,
        "training_steps_per_s_alone_runs": train_alone_runs,
        "training_steps_per_s_at_1_rps": train_shared,
        "training_retained_fraction": train_shared / train_alone,
        "recompiles_under_load": recompiles,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model {args.model}, {args.max_batch} slots, {tok} tokens per request")
    print(f"one-off sample path (one at a time): {one_off:8.1f} tokens/s")
    for n in (1, 8, 32):
        r = runs[n]
        print(
            f"{n:2d} clients: {r['tokens_per_s']:8.1f} tokens/s  x{r['tokens_per_s'] / base:5.2f}"
            f"  ttft p50/p99 {r['ttft_p50_ms']:.1f}/{r['ttft_p99_ms']:.1f} ms"
            f"  token p50/p99 {r['token_p50_ms']:.1f}/{r['token_p99_ms']:.1f} ms"
        )
    w = with_training
    print(
        f" 8 clients + training: ttft p99 {w['ttft_p99_ms']:.1f} ms, token p50/p99 "
        f"{w['token_p50_ms']:.1f}/{w['token_p99_ms']:.1f} ms "
        f"(x{out['token_p99_ratio_with_training']:.2f} of alone's "
        f"{token_p99_alone:.1f} ms, runs {runs[8]['token_p99_ms']:.1f} and "
        f"{alone_again['token_p99_ms']:.1f}; goal <= 1.5)"
    )
    print(
        f"training: {train_alone:.2f} steps/s alone (runs {train_alone_runs[0]:.2f}, "
        f"{train_alone_runs[1]:.2f}), {train_shared:.2f} at 1 request/s "
        f"-> retained {out['training_retained_fraction']:.2f} (goal >= 0.8)"
    )
    print(f"speedup at 32 clients: x{out['speedup_32_clients']:.2f} (goal >= 8)")
    late = isl.decoder.compiled[len(isl.decoder.compiled) - recompiles :]
    print(f"recompiles under load: {recompiles} {late if late else ''}")
    return 0


def through_controller(args: argparse.Namespace) -> int:
    from serving_controller import run

    out = run(
        args.model,
        args.max_batch,
        args.max_seq_len,
        args.tokens,
        args.seconds,
        args.devices_per_island,
    )
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"through the controller: model {args.model}, {args.max_batch} slots, {args.tokens} tokens,"
        f" one island of {args.devices_per_island} device(s)"
    )
    for n in (1, 8, 32):
        key = f"tokens_per_s_{n}_client" + ("s" if n > 1 else "")
        print(f"{n:2d} clients: {out[key]:8.1f} tokens/s")
    print(
        f" 8 clients: ttft p50/p99 {out['ttft_p50_ms']:.1f}/{out['ttft_p99_ms']:.1f} ms, token "
        f"p99 {out['token_p99_ms_alone']:.1f} ms alone, {out['token_p99_ms_with_training']:.1f} "
        f"with training (x{out['token_p99_ratio_with_training']:.2f}; goal <= 1.5), ttft p99 with "
        f"training {out['ttft_p99_ms_with_training']:.1f} ms"
    )
    print(
        f"training: {out['training_steps_per_s_alone']:.2f} steps/s alone, "
        f"{out['training_steps_per_s_at_1_rps']:.2f} at 1 request/s -> retained "
        f"{out['training_retained_fraction']:.2f} (goal >= 0.8)"
    )
    print(f"speedup at 32 clients: x{out['speedup_32_clients']:.2f} (goal >= 8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
