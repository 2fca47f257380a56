"""The continuous-batching loop of a served model on an island host.

Requests wait in a bounded queue (4 x max_batch); between decode steps the loop moves waiting
requests into free slots of the `SlotDecoder` (one batched prefill for all newcomers), then
runs one decode step for every occupied slot. A request leaves its slot at max tokens, a stop
string, the end-of-document token, the slot's last position, or when its client goes away.

Tokens go to each request's own unbounded queue and are never waited on: a slow or vanished
client cannot stall the batch. A request's own failure (its text could not be made) ends that
request INTERNAL and frees its slot; the others go on. While any request waits or decodes the
loop holds the island (`IslandGate.serving`): the host's backstop for a single-island training
job's next step (the controller has cut co-resident training before it forwards a request,
workers/serve_rpc.py); an idle service holds nothing.

Streaming: after each token the request's tokens are decoded again; the text that can no
longer change is sent: not the last (longest stop string - 1) characters, which may still
become a stop string, nor a trailing U+FFFD (a character whose UTF-8 bytes, byte-fallback
tokens, have not all come yet: its later bytes change it). At the end the rest is sent, so
the pieces make the final text.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

QUEUE_FACTOR = 4
# What one request may ask (checked by the controller's router and again here).
MAX_TEMPERATURE = 10.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**64
REPLACEMENT = "\ufffd"  # what a half-received UTF-8 character decodes to


# Tokens a request without max_tokens (0) gets: this many, or as many as its prompt leaves
# room for in serve.max_seq_len.
DEFAULT_MAX_TOKENS = 64


def check_sampling(
    *, temperature: float, top_k: int, top_p: float, seed: int, stop: Sequence[str]
) -> None:
    """A request's sampling settings and stop strings within what the engine serves.

    Every stop string is searched for after every token on the batch's one thread: their
    number and length are bounded.

    Raises:
        ValueError: naming the field and its value.
    """
    if not 0 <= temperature <= MAX_TEMPERATURE:  # NaN fails too
        raise ValueError(f"temperature={temperature} must be in [0, {MAX_TEMPERATURE:g}].")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in [0, 1].")
    if not 0 <= top_k < 2**31:  # (held as int32 by the batch: a larger one failed it all)
        raise ValueError(f"top_k={top_k} must be in [0, 2**31) (0: every token).")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed={seed} must be in [0, 2**64).")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}.")
    for i, s in enumerate(stop):
        if not s:
            raise ValueError(f"stop[{i}] is empty; a stop string needs a character.")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop[{i}] is {len(s)} characters long; at most {MAX_STOP_CHARS}.")


class ServeError(Exception):
    """A request refused or ended; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class IslandGate:
    """Who runs on the island: serving takes it at once, training steps wait between steps.

    `serving()` is held by the engine while requests are in flight; `training_step()` wraps
    one training step and waits while serving holds the island. `wants()` tells a training
    slice to end at the step boundary.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._serving = 0
        self.training_waits = 0

    def set_serving(self, on: bool) -> None:
        with self._cond:
            self._serving += 1 if on else -1
            self._cond.notify_all()

    def wants(self) -> bool:
        return self._serving > 0

    def wait_for_training(self, timeout_s: float | None = None) -> bool:
        """Block until no request is being served (True) or the timeout passes (False)."""
        with self._cond:
            if self._serving:
                self.training_waits += 1
            return self._cond.wait_for(lambda: self._serving == 0, timeout_s)


@dataclasses.dataclass
class Request:
    """One generation request and its output stream."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent_chars: int = 0
    slot: int = -1
    # The characters held back while they may still become a stop string.
    hold: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.hold = max((len(s) - 1 for s in self.stop), default=0)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class Stats:
    requests: int = 0
    tokens: int = 0
    steps: int = 0
    occupied_slot_steps: int = 0
    ttft_ms: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=2048)
    )
    token_ms: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=8192)
    )


class ServeEngine:
    """A continuous batching loop over a `SlotDecoder` in its own thread.

    Args:
        decoder: the slot decoder (its max_batch and max_seq_len size the batch).
        decode_text: token ids -> text (the job's tokenizer), for stop strings and streaming.
        eos_id: the end-of-document token (ends a request), or None.
        gate: the island's gate shared with training, or None.
        lock: held around every prefill and decode (the host's device lock), or None.
    """

    def __init__(
        self,
        decoder,
        decode_text: Callable[[Sequence[int]], str],
        *,
        eos_id: int | None = None,
        gate: IslandGate | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.decoder = decoder
        self.decode_text = decode_text
        self.eos_id = eos_id
        self.gate = gate
        self.lock = lock or threading.Lock()
        self.max_batch = decoder.max_batch
        self.max_seq_len = decoder.max_seq_len
        self.queue_limit = QUEUE_FACTOR * self.max_batch
        self.stats = Stats()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: list[Request | None] = [None] * self.max_batch
        self._next = np.zeros(self.max_batch, np.int32)
        self._pos = np.zeros(self.max_batch, np.int32)
        self._stop_reason: str | None = None
        self._failure: str | None = None
        self._holding = False
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    # -- the callers' side ---------------------------------------------------------------

    def load(self) -> int:
        """Requests waiting or decoding."""
        with self._cond:
            return len(self._waiting) + sum(r is not None for r in self._slots)

    def submit(self, req: Request) -> Request:
        """Queue a request (checked against the slot size). Raises ServeError."""
        try:
            check_sampling(
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                seed=req.seed,
                stop=req.stop,
            )
        except ValueError as e:
            raise ServeError("INVALID_ARGUMENT", str(e)) from None
        if not req.prompt_ids:
            raise ServeError("INVALID_ARGUMENT", "prompt is empty; give some text to continue.")
        if len(req.prompt_ids) >= self.max_seq_len:
            raise ServeError(
                "INVALID_ARGUMENT",
                f"prompt is {len(req.prompt_ids)} tokens; serve.max_seq_len="
                f"{self.max_seq_len} leaves room for at most {self.max_seq_len - 1}.",
            )
        if req.max_tokens == 0:
            req.max_tokens = min(DEFAULT_MAX_TOKENS, self.max_seq_len - len(req.prompt_ids))
        if req.max_tokens < 1 or len(req.prompt_ids) + req.max_tokens > self.max_seq_len:
            raise ServeError(
                "INVALID_ARGUMENT",
                f"max_tokens={req.max_tokens} with a prompt of {len(req.prompt_ids)} tokens "
                f"exceeds serve.max_seq_len={self.max_seq_len} (at most "
                f"{self.max_seq_len - len(req.prompt_ids)}).",
            )
        with self._cond:
            if self._stop_reason is not None:
                raise ServeError("UNAVAILABLE", self._stop_reason)
            if len(self._waiting) >= self.queue_limit:
                # Requests whose clients went away hold no place in the queue.
                self._waiting = collections.deque(
                    r for r in self._waiting if not r.cancelled.is_set()
                )
            if len(self._waiting) >= self.queue_limit:
                raise ServeError(
                    "RESOURCE_EXHAUSTED",
                    f"the serve queue is full ({self.queue_limit} requests = 4 x "
                    f"serve.max_batch={self.max_batch} waiting); retry later.",
                )
            self._waiting.append(req)
            self.stats.requests += 1
            self._cond.notify_all()
        return req

    @property
    def running(self) -> bool:
        """The loop is alive and was neither stopped nor failed."""
        return self._thread.is_alive() and self._stop_reason is None

    @property
    def failure(self) -> str | None:
        """Why the loop failed on its own (None while running or after a `stop`)."""
        return self._failure

    def stop(self, reason: str, timeout_s: float | None = None) -> None:
        """End every open request with UNAVAILABLE naming `reason`; stop the loop.

        Waits for the loop's thread to end (by default without a limit): a prefill or
        decode step in progress (or waiting for the device lock) finishes before the caller
        may free the parameters it reads.
        """
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- the loop ------------------------------------------------------------------------

    def _hold(self, on: bool) -> None:
        if self.gate is not None and on != self._holding:
            self.gate.set_serving(on)
        self._holding = on

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: (
                            self._stop_reason is not None
                            or self._waiting
                            or any(r is not None for r in self._slots)
                        )
                    )
                    if self._stop_reason is not None:
                        break
                    self._hold(True)
                    newcomers = self._admit()
                if newcomers:
                    self._prefill(newcomers)
                if any(r is not None for r in self._slots):
                    self._step()
                with self._cond:
                    if not self._waiting and all(r is None for r in self._slots):
                        self._hold(False)
        except Exception as e:  # the loop's own failure ends every request
            with self._cond:
                if self._stop_reason is None:  # a stop's own reason stays (finding 5)
                    logger.exception("serve loop failed")
                    self._failure = self._stop_reason = f"the serve loop failed: {e!r}"
                else:
                    logger.warning("serve loop ended (%s) with %r", self._stop_reason, e)
        finally:
            self._end_all()

    def _end_all(self) -> None:
        with self._cond:
            reason = self._stop_reason or "the service stopped"
            reqs = [r for r in self._slots if r is not None] + list(self._waiting)
            self._waiting.clear()
            self._slots = [None] * self.max_batch
            self._hold(False)
        for r in reqs:
            r.events.put(("error", "UNAVAILABLE", reason))

    def _admit(self) -> list[Request]:
        out = []
        for s in range(self.max_batch):
            while self._slots[s] is None and self._waiting:
                r = self._waiting.popleft()
                if r.cancelled.is_set():
                    continue
                r.slot = s
                self._slots[s] = r
                out.append(r)
        return out

    def _sampling(self, reqs: Sequence[Request | None]):
        from pathways_lite.model.decode import Sampling

        samp = Sampling.zeros(len(reqs))
        for i, r in enumerate(reqs):
            if r is not None:
                samp.temperature[i] = r.temperature
                samp.top_k[i] = r.top_k
                samp.top_p[i] = r.top_p
                samp.seed[i] = (r.seed >> 32, r.seed & 0xFFFFFFFF)
                samp.count[i] = len(r.tokens)
        return samp

    def _prefill(self, reqs: list[Request]) -> None:
        samp = self._sampling(reqs)
        with self.lock:
            _, first = self.decoder.prefill(
                [r.prompt_ids for r in reqs], [r.slot for r in reqs], samp
            )
        now = time.perf_counter()
        for r, tok in zip(reqs, first, strict=True):
            r.first_token_at = now
            self.stats.ttft_ms.append((now - r.submitted) * 1e3)
            self._pos[r.slot] = len(r.prompt_ids)
            self._emit(r, int(tok), now)

    def _step(self) -> None:
        reqs = list(self._slots)
        samp = self._sampling(reqs)
        t0 = time.perf_counter()
        # The slots up to the last occupied one (requests take the lowest free slots).
        rows = max((i for i, r in enumerate(reqs) if r is not None), default=0) + 1
        with self.lock:
            _, nxt = self.decoder.step(self._next, self._pos, samp, rows=rows)
        now = time.perf_counter()
        self.stats.steps += 1
        occupied = [r for r in reqs if r is not None]
        self.stats.occupied_slot_steps += len(occupied)
        for r in occupied:
            self._pos[r.slot] += 1
            self.stats.token_ms.append((now - t0) * 1e3)
            self._emit(r, int(nxt[r.slot]), now)

    def _emit(self, r: Request, tok: int, now: float) -> None:
        """Record a sampled token and stream what it settles; free the slot when the request
        is done. A failure of this request's own (its text) ends it alone, INTERNAL."""
        if r.cancelled.is_set():
            self._free(r)
            return
        try:
            self._advance(r, tok)
        except Exception as e:  # noqa: BLE001 - this request ends; the batch goes on
            logger.exception("a request in slot %d failed at token %d", r.slot, tok)
            r.events.put(("error", "INTERNAL", f"the generation failed at token {tok}: {e}"))
            self._free(r)

    def _advance(self, r: Request, tok: int) -> None:
        done = None
        if self.eos_id is not None and tok == self.eos_id:
            done = "eos"
        else:
            r.tokens.append(tok)
            self.stats.tokens += 1
            self._next[r.slot] = tok
            r.text = self.decode_text(r.tokens)
            # A stop string wholly in the text sent so far would have ended the request when
            # its last character came: search only from there.
            found = [at for s in r.stop if (at := r.text.find(s, r.sent_chars)) >= 0]
            if found:
                r.text, done = r.text[: min(found)], "stop"
            if done is None and len(r.tokens) >= r.max_tokens:
                done = "length"
            if done is None and self._pos[r.slot] + 1 >= self.max_seq_len:
                done = "length"
        if done:
            upto = len(r.text)
        else:
            settled = min(len(r.text) - r.hold, len(r.text.rstrip(REPLACEMENT)))
            upto = max(r.sent_chars, settled)
        piece = r.text[r.sent_chars : upto]
        r.sent_chars = upto
        if done != "eos":
            r.events.put(("token", tok, piece))
        elif piece:  # the held-back text, flushed at the end
            r.events.put(("token", -1, piece))
        if done:
            r.events.put(("end", done, r.text))
            self._free(r)

    def _free(self, r: Request) -> None:
        with self._cond:
            if r.slot >= 0 and self._slots[r.slot] is r:
                self._slots[r.slot] = None
                # A free slot among the rows decoded sits at position 0: the decode step
                # reads the cache up to its furthest row (model/attention.py's
                # cached_attention), and a finished long request's position would keep it
                # reading that far until the slot is taken again.
                self._pos[r.slot] = 0
