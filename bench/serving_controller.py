"""bench/serving.py's figures through the controller (`bench/serving.py --through-controller`).

A LocalCluster on this machine (Ray on loopback, one island host process, the controller):
a training job writes a checkpoint, a `kind: serve` job loads it and answers `Generate`
streams routed by the controller (real gRPC, the controller's token), and a second training
job shares the island, its slices cut by the controller while requests decode
(controller/serve_router.py's ServeArbiter). Closed-loop clients are threads of this process,
each with its own controller channel; latencies are measured on the client side.

Measured side by side in one run, as the in-process mode measures them:
- tokens/s with 1, 8 and 32 closed-loop clients (speedup: over the one-client figure, the
  mean of two one-client runs that bracket the others: this machine's load drifts between
  runs, and one lucky or unlucky baseline would move the ratio);
- ttft and per-token latency p50/p99 with 8 clients, alone and with the training job on the
  island (the "alone" figure is the mean of two runs that bracket the shared one);
- the training job's steps/s alone and while the service gets 1 request/s (its retained
  fraction; "alone" is again the mean of two bracketing runs).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time

# The serve job's island: one island of 2 devices (as the test cluster) unless told otherwise;
# both jobs use every device of it, model parallel (`mesh: {data: 1, model: N}`).
DEVICES = 2


def _spec(name: str, model: str, body: str, devices: int) -> str:
    return (
        f"name: {name}\nmodel: {{preset: {model}}}\nislands: 1\ndevices_per_island: {devices}\n"
        f"mesh: {{data: 1, model: {devices}}}\n"
        "data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}\n" + body
    )


class Bench:
    def __init__(
        self, state_dir: str, model: str, max_batch: int, max_seq_len: int, devices: int
    ) -> None:
        from pathways_lite.client import ControllerClient
        from pathways_lite.local import LocalCluster

        self.state_dir = state_dir
        self.devices = devices
        self.cluster = LocalCluster(islands=1, devices_per_island=devices, state_dir=state_dir)
        self.cluster.start()
        self.client = ControllerClient(state_dir)
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.train_id = ""

    def close(self) -> None:
        self.client.close()
        self.cluster.down()

    def start_service(self) -> str:
        from pathways_lite.client import ClientError, state_name
        from pathways_lite.spec import load_spec_text

        src = self.client.submit(
            load_spec_text(
                _spec(
                    "bench-src",
                    self.model,
                    "train: {steps: 2, global_batch: 4, seq_len: 64}\n",
                    self.devices,
                )
            )
        )
        state = state_name(self.client.wait(src.id, timeout_s=900).state)
        if state != "succeeded":
            raise RuntimeError(f"the source training job ended {state}")
        serve = _spec(
            "bench-srv",
            self.model,
            "kind: serve\ninit_from: {job: bench-src}\ntrain: {global_batch: 4, seq_len: 64}\n"
            f"serve: {{max_batch: {self.max_batch}, max_seq_len: {self.max_seq_len}}}\n",
            self.devices,
        )
        self.serve_id = self.client.submit(load_spec_text(serve)).id
        deadline = time.monotonic() + 900
        while True:
            try:
                for _ in self.client.generate(self.serve_id, "def f(", max_tokens=4):
                    pass
                return self.serve_id
            except ClientError as e:
                # Queued or compiling yet: ask again (a failed or stopped service: raise).
                waiting = "loading" in str(e) or "(serve, queued)" in str(e)
                if time.monotonic() > deadline or not waiting:
                    raise
                time.sleep(0.5)

    def start_training(self) -> None:
        from pathways_lite.spec import load_spec_text

        body = "train: {steps: 1000000, global_batch: 8, seq_len: 64, seed: 3}\n"
        self.train_id = self.client.submit(
            load_spec_text(_spec("bench-train", self.model, body, self.devices))
        ).id
        while self.steps() < 3:  # loaded, compiled, stepping
            time.sleep(0.2)

    def stop_training(self) -> None:
        self.client.cancel(self.train_id, reason="bench over")

    def steps(self) -> int:
        return self.client.get(self.train_id).steps_completed

    def train_rate(self, seconds: float, load=None) -> float:
        """The training job's steps/s over `seconds` (while `load(seconds)` runs, if any)."""
        first, start = self.steps(), time.perf_counter()
        if load is None:
            time.sleep(seconds)
        else:
            load(seconds)
        return (self.steps() - first) / (time.perf_counter() - start)

    def request(self, client, rng: random.Random, tokens: int) -> tuple[float, list[float], int]:
        prompt = " ".join(rng.choice(["def", "x", "=", "(", ")", "import", "os"]) for _ in "abcd")
        sent = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        n = 0
        for reply in client.generate(self.serve_id, prompt, max_tokens=tokens):
            if reply.done:
                break
            now = time.perf_counter()
            n += 1
            if first is None:
                first = now
            else:
                gaps.append((now - last) * 1e3)
            last = now
        return ((first or time.perf_counter()) - sent) * 1e3, gaps, n

    def clients(self, n: int, seconds: float, tokens: int) -> dict:
        """n closed-loop clients, each on its own controller connection."""
        from serving import closed_loop

        from pathways_lite.client import ControllerClient

        return closed_loop(
            n,
            seconds,
            lambda c, rng: self.request(c, rng, tokens),
            connect=lambda: ControllerClient(self.state_dir),
        )

    def open_loop(self, rate: float, seconds: float, tokens: int) -> None:
        """Requests at `rate` per second for `seconds`, each in its own thread."""
        from pathways_lite.client import ControllerClient

        rng = random.Random(99)

        def one(k: int) -> None:
            with ControllerClient(self.state_dir) as c:
                self.request(c, random.Random(k), tokens)

        threads, start, k = [], time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            t = threading.Thread(target=one, args=(k,))
            t.start()
            threads.append(t)
            k += 1
            time.sleep(rng.expovariate(rate))
        for t in threads:
            t.join()


def run(
    model: str,
    max_batch: int,
    max_seq_len: int,
    tokens: int,
    seconds: float,
    devices: int = DEVICES,
) -> dict:
    """The figures through the controller (bench/serving.py's keys, plus `mode`)."""
    state_dir = tempfile.mkdtemp(prefix="plbench-", dir="/tmp")
    bench = Bench(state_dir, model, max_batch, max_seq_len, devices)
    try:
        bench.start_service()
        for n in (1, 2, 4, 8, 16, 32, max_batch):  # warm-up: every prefill row bucket
            bench.clients(n, 1.0, 4)
        load = [os.getloadavg()]
        runs = {n: bench.clients(n, seconds, tokens) for n in (1, 8, 32)}
        one_again = bench.clients(1, seconds, tokens)
        bench.start_training()
        with_training = bench.clients(8, seconds, tokens)
        bench.stop_training()
        alone_again = bench.clients(8, seconds, tokens)
        bench.start_training()
        train_alone = [bench.train_rate(seconds)]
        train_shared = bench.train_rate(seconds, lambda s: bench.open_loop(1.0, s, tokens))
        train_alone.append(bench.train_rate(seconds))
        bench.stop_training()
        islands = bench.client.islands(include_steps=True)
        load.append(os.getloadavg())
    finally:
        bench.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    base = (runs[1]["tokens_per_s"] + one_again["tokens_per_s"]) / 2
    token_p99_alone = (runs[8]["token_p99_ms"] + alone_again["token_p99_ms"]) / 2
    alone = sum(train_alone) / 2
    return {
        "mode": "controller",
        "model": model,
        "max_batch": max_batch,
        "devices_per_island": devices,
        "tokens_per_request": tokens,
        "tokens_per_s_1_client": base,
        "tokens_per_s_1_client_runs": [runs[1]["tokens_per_s"], one_again["tokens_per_s"]],
        "tokens_per_s_8_clients": runs[8]["tokens_per_s"],
        "tokens_per_s_32_clients": runs[32]["tokens_per_s"],
        "speedup_8_clients": runs[8]["tokens_per_s"] / base,
        "speedup_32_clients": runs[32]["tokens_per_s"] / base,
        "ttft_p50_ms": runs[8]["ttft_p50_ms"],
        "ttft_p99_ms": runs[8]["ttft_p99_ms"],
        "token_p50_ms_alone": runs[8]["token_p50_ms"],
        "token_p99_ms_alone": token_p99_alone,
        "token_p99_ms_alone_runs": [runs[8]["token_p99_ms"], alone_again["token_p99_ms"]],
        "ttft_p99_ms_with_training": with_training["ttft_p99_ms"],
        "token_p50_ms_with_training": with_training["token_p50_ms"],
        "token_p99_ms_with_training": with_training["token_p99_ms"],
        "token_p99_ratio_with_training": with_training["token_p99_ms"] / token_p99_alone,
        "training_steps_per_s_alone": alone,
        "training_steps_per_s_alone_runs": train_alone,
        "training_steps_per_s_at_1_rps": train_shared,
        "training_retained_fraction": train_shared / alone if alone else float("nan"),
        "island_timeline_entries": sum(len(i.recent_steps) for i in islands),
        # This machine is shared: its load average (1, 5, 15 min) before and after.
        "load_average": load,
    }
