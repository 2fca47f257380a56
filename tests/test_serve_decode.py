"""Slot KV-cache decoding and the continuous batching loop against a no-cache reference."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways_lite.model.config import PalmConfig
from pathways_lite.model.decode import Sampling, SlotDecoder
from pathways_lite.model.palm import Palm
from pathways_lite.workers.serve_engine import IslandGate, Request, ServeEngine, ServeError

pytestmark = pytest.mark.timeout(120)

SEQ = 64
TIE = 1e-4


@pytest.fixture(scope="module")
def model() -> Palm:
    return Palm(PalmConfig.palm_tiny(max_seq_len=SEQ), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def dec(model) -> SlotDecoder:
    """One slot decoder (4 slots) for every test: its programs compile once (the decode
    buckets here, as a service's do when it loads)."""
    dec = SlotDecoder(model, max_batch=4, max_seq_len=SEQ)
    dec.warm()
    return dec


@pytest.fixture(scope="module")
def forward(model):
    """No-cache logits at every position of a prompt padded to SEQ (causal: padding after
    the prompt changes nothing before it)."""
    fwd = nnx.jit(lambda m, t: m(t))

    def logits(ids: list[int]) -> np.ndarray:
        padded = np.zeros((1, SEQ), np.int32)
        padded[0, : len(ids)] = ids
        return np.asarray(fwd(model, jnp.asarray(padded)))[0, : len(ids)]

    return logits


def _text(ids) -> str:
    return "".join(chr(97 + i % 26) for i in ids)


def reference_greedy(forward, prompt: list[int], n: int) -> tuple[list[int], int]:
    """The no-cache greedy continuation and how many of its tokens are decisive (the top
    two logits differ by at least TIE; the comparison stops at the first near-tie)."""
    ids, out, decisive = list(prompt), [], None
    for _ in range(n):
        last = forward(ids)[-1]
        top2 = np.sort(last)[-2:]
        if decisive is None and top2[1] - top2[0] < TIE:
            decisive = len(out)
        tok = int(np.argmax(last))
        out.append(tok)
        ids.append(tok)
    return out, n if decisive is None else decisive


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 500, n)] for n in lengths]


@pytest.fixture(scope="module")
def chunked_dec(model) -> SlotDecoder:
    """A slot decoder whose steps read the cache 8 positions at a time: the requests below
    reach positions in the second and third chunks (the loop's length known at run time)."""
    dec = SlotDecoder(model, max_batch=4, max_seq_len=SEQ, chunk=8)
    dec.warm()
    return dec


@pytest.mark.parametrize("which", ["whole", "chunked"])
def test_slot_cache_logits_equal_the_no_cache_forward(which, dec, chunked_dec, forward):
    dec = {"whole": dec, "chunked": chunked_dec}[which]
    prompts = _prompts(0, [5, 11])
    slots = [3, 1]
    logits, first = dec.prefill(prompts, slots, Sampling.zeros(2))
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(logits[i], forward(p)[-1], atol=1e-5, rtol=0)
    seqs = [p + [int(f)] for p, f in zip(prompts, first, strict=True)]
    tokens, pos = np.zeros(4, np.int32), np.zeros(4, np.int32)
    for step in range(6):
        for s, seq in zip(slots, seqs, strict=True):
            tokens[s], pos[s] = seq[-1], len(seq) - 1
        logits, nxt = dec.step(tokens, pos, Sampling.zeros(4))
        for s, seq in zip(slots, seqs, strict=True):
            np.testing.assert_allclose(logits[s], forward(seq)[-1], atol=1e-5, rtol=0)
            seq.append(int(nxt[s]))
        if step == 2:  # a newcomer joins mid-way in slot 0; the others are unaffected
            [p0] = _prompts(1, [7])
            logits0, f0 = dec.prefill([p0], [0], Sampling.zeros(1))
            np.testing.assert_allclose(logits0[0], forward(p0)[-1], atol=1e-5, rtol=0)
            slots, seqs = [*slots, 0], [*seqs, p0 + [int(f0[0])]]


def test_a_cache_read_in_chunks_equals_the_whole_caches_attention():
    """`cached_attention` reads the cache in chunks up to the furthest row's: rows at
    positions in different chunks (0, a chunk's last and first positions) get what
    attention over the whole cache gives, within float rounding, and the keys past the
    furthest row's chunk are never read (NaN there changes nothing)."""
    from pathways_lite.model.attention import cached_attention, causal_attention

    rng = np.random.default_rng(0)
    b, t, h, q = 5, 64, 4, 16
    q_bshq = jnp.asarray(rng.normal(size=(b, 1, h, q)), jnp.float32)
    k_btkq = rng.normal(size=(b, t, 1, q)).astype(np.float32)
    v_btkq = rng.normal(size=(b, t, 1, q)).astype(np.float32)
    pos_b = np.array([0, 15, 16, 40, 47], np.int32)  # chunks of 16: the third is the last read
    whole = causal_attention(q_bshq, jnp.asarray(k_btkq), jnp.asarray(v_btkq), pos_b[:, None])
    k_btkq[:, 48:], v_btkq[:, 48:] = np.nan, np.nan
    chunked = cached_attention(q_bshq, jnp.asarray(k_btkq), jnp.asarray(v_btkq), pos_b, chunk=16)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5, rtol=0)
    # Chunks of 24 at most: of 16 (the largest divisor from 13 to 24), none past position 47.
    wide = cached_attention(q_bshq, jnp.asarray(k_btkq), jnp.asarray(v_btkq), pos_b, chunk=24)
    np.testing.assert_allclose(np.asarray(wide), np.asarray(whole), atol=1e-5, rtol=0)
    # A cache of a length with no divisor from 9 to 16 (61 positions) is read whole.
    odd_k, odd_v = (jnp.asarray(a[:, :61]) for a in (k_btkq, v_btkq))
    assert np.isnan(np.asarray(cached_attention(q_bshq, odd_k, odd_v, pos_b, chunk=16))).any()


def _collect(req: Request, timeout_s: float = 60.0) -> tuple[list[int], str, str]:
    deadline = time.monotonic() + timeout_s
    toks = []
    while True:
        ev = req.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if ev[0] == "token":
            if ev[1] >= 0:
                toks.append(ev[1])
        elif ev[0] == "end":
            return toks, ev[1], ev[2]
        else:
            raise ServeError(ev[1], ev[2])


@pytest.mark.parametrize("batching", ["continuous", "one_at_a_time"])
def test_served_greedy_equals_the_reference_greedy(dec, forward, batching):
    n = 12
    prompts = _prompts(5, [4, 9, 6, 13, 3])
    refs = [reference_greedy(forward, p, n) for p in prompts]
    eng = ServeEngine(dec, _text)
    traces = dec.traces
    try:
        outs = []
        if batching == "continuous":
            first = eng.submit(Request(prompts[0], max_tokens=n))
            while len(first.tokens) < 3:  # the others join a batch already decoding
                time.sleep(0.005)
            rest = [eng.submit(Request(p, max_tokens=n)) for p in prompts[1:]]
            outs = [_collect(r)[0] for r in [first, *rest]]
        else:  # one request at a time: each waits for the previous one's end
            outs = [_collect(eng.submit(Request(p, max_tokens=n)))[0] for p in prompts]
    finally:
        eng.stop("test over")
    assert dec.traces - traces <= 2  # at most the 2- and 4-row prefill buckets are new
    compared = 0
    for out, (ref, decisive) in zip(outs, refs, strict=True):
        assert len(out) == n
        assert out[:decisive] == ref[:decisive]
        compared += decisive
    near_ties = sum(d < n for _, d in refs)
    print(f"{batching}: {compared} tokens compared, {near_ties} comparisons cut at a near-tie")
    assert compared >= 0.5 * n * len(prompts)


def test_sampled_tokens_depend_only_on_prompt_and_seed(dec):
    eng = ServeEngine(dec, _text)
    try:
        [p, q, r] = _prompts(9, [6, 8, 5])

        def req(prompt, seed):
            return Request(prompt, max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=seed)

        alone = _collect(eng.submit(req(p, 7)))[0]
        crowd = [eng.submit(req(q, 1)), eng.submit(req(p, 7)), eng.submit(req(r, 2))]
        together = [_collect(x)[0] for x in crowd]
        other_seed = _collect(eng.submit(req(p, 8)))[0]
    finally:
        eng.stop("test over")
    assert together[1] == alone
    assert other_seed != alone


def test_stop_strings_limits_queue_and_stop(dec):
    eng = ServeEngine(dec, _text)
    try:
        [p] = _prompts(2, [5])
        full = _collect(eng.submit(Request(p, max_tokens=10)))
        stop = full[2][3:5]
        cut = _collect(eng.submit(Request(p, max_tokens=10, stop=(stop,))))
        assert cut[1] == "stop" and cut[2] == full[2][: full[2].find(stop)]
        with pytest.raises(ServeError, match="prompt is empty"):
            eng.submit(Request([], max_tokens=1))
        with pytest.raises(ServeError, match="max_seq_len=64"):
            eng.submit(Request([1] * 64, max_tokens=1))
        with pytest.raises(ServeError, match="max_tokens=60"):
            eng.submit(Request([1] * 5, max_tokens=60))
        # No max_tokens (0): 64 tokens, or as many as the prompt leaves room for (before, the
        # router's default of 64 was refused on a service of max_seq_len 64 or less).
        short = _collect(eng.submit(Request([1] * 60, max_tokens=0)))
        assert len(short[0]) <= 4 and (len(short[0]) == 4 or short[1] != "length"), short
        # A cancelled (disconnected) client frees its slot; the others finish.
        gone = eng.submit(Request(p, max_tokens=50))
        gone.cancel()
        kept = _collect(eng.submit(Request(p, max_tokens=10)))
        assert kept[0] == full[0]
        # Fill both slots and the queue (4 x 2): the next request is refused.
        open_reqs = [eng.submit(Request(p, max_tokens=50)) for _ in range(4)]
        while eng.load() and any(not r.tokens for r in open_reqs):
            time.sleep(0.002)
        queued = []
        with pytest.raises(ServeError, match="queue is full") as refused:
            for _ in range(30):
                queued.append(eng.submit(Request(p, max_tokens=50)))
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert len(queued) >= eng.queue_limit
        # Clients that went away while queued free their places at once.
        for r in queued[:3]:
            r.cancel()
        queued += [eng.submit(Request(p, max_tokens=50)) for _ in range(3)]
        with pytest.raises(ServeError, match="queue is full"):
            eng.submit(Request(p, max_tokens=50))
    finally:
        eng.stop("preempted by job x")
    with pytest.raises(ServeError, match="preempted by job x") as ended:
        _collect(queued[-1])
    assert ended.value.code == "UNAVAILABLE"


class _Freed:
    """The slot decoder whose parameters a suspend freed: every later call fails, as a read
    of a deleted device buffer does."""

    def __init__(self, dec: SlotDecoder) -> None:
        self.dec, self.freed = dec, False
        self.max_batch, self.max_seq_len = dec.max_batch, dec.max_seq_len

    def prefill(self, *a):
        if self.freed:
            raise RuntimeError("Array has been deleted")
        return self.dec.prefill(*a)

    def step(self, *a):
        if self.freed:
            raise RuntimeError("Array has been deleted")
        return self.dec.step(*a)


def test_stop_waits_for_a_decode_step_blocked_on_the_device_lock(dec):
    """A stop returns only after the loop ended (a co-resident training step holds the device
    lock for longer than any fixed join), and a failure after the stop keeps its reason."""
    lock, gate = threading.Lock(), IslandGate()
    freed = _Freed(dec)
    eng = ServeEngine(freed, _text, lock=lock, gate=gate)
    [p] = _prompts(4, [5])
    lock.acquire()  # the training step: the request's prefill waits for it
    req = eng.submit(Request(p, max_tokens=50))
    while not gate.wants():  # the loop took the island; it goes on to the device lock
        time.sleep(0.002)
    time.sleep(0.1)
    stopper = threading.Thread(target=eng.stop, args=("the serve job was preempted",))
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive()  # still waiting for the loop
    freed.freed = True  # what the suspend would do if stop had returned
    lock.release()
    stopper.join(30)
    assert not stopper.is_alive() and not eng.running
    with pytest.raises(ServeError, match="the serve job was preempted"):
        _collect(req)
    assert eng.failure is None


def test_a_failed_loop_is_not_running_and_names_its_failure(dec):
    freed = _Freed(dec)
    freed.freed = True
    eng = ServeEngine(freed, _text)
    [p] = _prompts(4, [5])
    with pytest.raises(ServeError, match="serve loop failed") as ended:
        _collect(eng.submit(Request(p, max_tokens=5)))
    assert ended.value.code == "UNAVAILABLE"
    eng._thread.join(10)
    assert not eng.running and "Array has been deleted" in eng.failure
    with pytest.raises(ServeError, match="serve loop failed"):
        eng.submit(Request(p, max_tokens=5))


def test_a_training_step_starts_after_its_wait_at_the_serve_gate():
    """The step's start timestamp (its timings, the scheduler's charge) leaves out the time
    the island served requests."""
    from pathways_lite.workers.serve_rpc import ServingHost

    host = ServingHost()
    host._serving_init()
    host.gate.set_serving(True)  # a request is decoding
    marks: dict[str, float] = {}
    stepper = threading.Thread(
        target=host.training_step,
        args=(lambda: marks.setdefault("ran", time.monotonic()),),
        kwargs={"on_start": lambda: marks.setdefault("start", time.monotonic())},
    )
    stepper.start()
    time.sleep(0.3)
    assert not marks  # waiting at the gate
    released = time.monotonic()
    host.gate.set_serving(False)
    stepper.join(10)
    assert released <= marks["start"] <= marks["ran"]
    assert host.gate.training_waits == 1


def test_a_multi_island_step_never_waits_at_one_hosts_serve_gate():
    """Its peers would wait for it in the exchange (review finding 4): the controller cuts
    the whole job at one step instead; a one-island step still waits at the gate (the
    host's backstop)."""
    import types

    from pathways_lite.workers.runtime import IslandJobSpec
    from pathways_lite.workers.serve_rpc import ServingHost

    host = ServingHost()
    host._serving_init()
    host.gate.set_serving(True)  # the service never goes idle
    spec = IslandJobSpec(job_id="dp", generation=0, preset="palm-tiny", num_islands=2)
    started = time.monotonic()
    assert host.training_step(lambda: 7, types.SimpleNamespace(spec=spec)) == 7
    assert time.monotonic() - started < 0.5
    alone = dataclasses.replace(spec, num_islands=1)  # a one-island step waits for the gate
    stepper = threading.Thread(
        target=host.training_step, args=(lambda: None, types.SimpleNamespace(spec=alone))
    )
    stepper.start()
    stepper.join(0.5)
    assert stepper.is_alive()
    host.gate.set_serving(False)
    stepper.join(10)
    assert not stepper.is_alive()


def test_a_hosts_slice_cut_holds_cuts_releases_and_lapses_only_for_its_own_slices():
    """CutSlice on one host (workers/serve_rpc.py's SliceCut): HOLD stops the job's steps
    from the first one not started and answers it; CUT lets the steps before it run and
    refuses the rest (StepNotRun); RELEASE lets a held step go; a hold whose CUT never
    comes lapses; slices sent after the cut (a higher island_seq, or a later controller's
    epoch) are never concerned."""
    import asyncio

    from pathways_lite.v1 import worker_pb2
    from pathways_lite.workers.ordering import StepNotRun
    from pathways_lite.workers.serve_rpc import SliceCut

    Phase = worker_pb2.CutSliceRequest

    def phase(kind: int, before: int = 0, hold_s: float = 5.0, epoch: int = 1):
        return worker_pb2.CutSliceRequest(
            generation=0, epoch=epoch, phase=kind, before_step=before, seq_below=10, hold_s=hold_s
        )

    async def main() -> None:
        cut = SliceCut()
        for step in range(3):
            await cut.admit(0, step, step, 1)
        assert cut.apply(phase(Phase.HOLD)) == 3
        held = asyncio.ensure_future(cut.admit(0, 3, 3, 1))
        await asyncio.sleep(0.05)
        assert not held.done()  # held before step 3
        await cut.admit(0, 3, 12, 1)  # a slice sent after the cut runs
        await cut.admit(0, 3, 3, 2)  # so does a later controller's
        cut.apply(phase(Phase.CUT, before=4))
        await asyncio.wait_for(held, 1)  # step 3 runs (a peer had started it)
        with pytest.raises(StepNotRun):
            await cut.admit(0, 4, 4, 1)
        assert cut.apply(phase(Phase.HOLD)) == 4
        released = asyncio.ensure_future(cut.admit(0, 4, 5, 1))
        await asyncio.sleep(0.02)
        cut.apply(phase(Phase.RELEASE))
        await asyncio.wait_for(released, 1)
        cut.apply(phase(Phase.HOLD, hold_s=0.1))
        started = time.monotonic()
        await asyncio.wait_for(cut.admit(0, 5, 6, 1), 2)  # lapses without its cut
        assert time.monotonic() - started >= 0.09

    asyncio.run(main())


def test_a_decode_of_the_first_rows_equals_the_whole_caches_and_keeps_the_rest(model):
    """A step of a decode bucket (the slots up to the last occupied one) gives those slots
    the logits and the cache rows that a step of every slot gives them, and leaves the
    other slots' rows as they were."""
    import jax

    assert SlotDecoder(model, max_batch=32, max_seq_len=16).decode_buckets == (1, 4, 16, 32)
    whole, part = (SlotDecoder(model, max_batch=4, max_seq_len=16) for _ in range(2))
    assert whole.decode_buckets == (1, 4)
    prompts = [[3, 1, 4], [1, 5], [9, 2, 6, 5], [3, 5]]
    for d in (whole, part):
        d.prefill(prompts, [0, 1, 2, 3], Sampling.zeros(4))
    tokens = np.array([7, 8, 9, 10], np.int32)
    pos = np.array([len(p) for p in prompts], np.int32)
    logits_all, next_all = whole.step(tokens, pos, Sampling.zeros(4))
    before = [np.asarray(x) for x in jax.tree.leaves(part.cache)]
    logits_one, next_one = part.step(tokens, pos, Sampling.zeros(4), rows=1)
    assert logits_one.shape == (1, logits_all.shape[1]) and next_one.shape == (1,)
    np.testing.assert_allclose(logits_one[0], logits_all[0], rtol=1e-5, atol=1e-5)
    assert next_one[0] == next_all[0]
    for old, new, ref in zip(
        before, jax.tree.leaves(part.cache), jax.tree.leaves(whole.cache), strict=True
    ):
        new, ref = np.asarray(new), np.asarray(ref)
        np.testing.assert_allclose(new[0], ref[0], rtol=1e-6, atol=1e-6)  # row 0 written
        np.testing.assert_array_equal(new[1:], old[1:])  # the others untouched


def test_a_closed_decoder_frees_its_slot_cache_at_once(model):
    """A stopped service's KV cache is freed when the host closes its decoder, not at the
    next garbage collection (its compiled programs' closures hold it in a cycle)."""
    import jax

    dec = SlotDecoder(model, max_batch=2, max_seq_len=16)
    leaves = [x for x in jax.tree.leaves(dec.cache) if isinstance(x, jax.Array)]
    assert leaves and not any(x.is_deleted() for x in leaves)
    dec.close()
    assert all(x.is_deleted() for x in leaves)


def test_the_engine_threads_events_reach_each_stream_in_order_in_few_loop_wakeups():
    import asyncio

    from pathways_lite.workers.serve_rpc import _Inbox, _ToLoop

    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop)
        wakeups = [0]
        deliver = inbox._deliver

        def counted() -> None:
            wakeups[0] += 1
            deliver()

        inbox._deliver = counted
        streams = [_ToLoop(inbox) for _ in range(8)]

        def engine() -> None:  # 50 decode steps of 8 streams, from another thread
            for n in range(50):
                for s in streams:
                    s.put(n)

        await asyncio.to_thread(engine)
        got = []
        for s in streams:
            got.append([await asyncio.wait_for(s.queue.get(), 10) for _ in range(50)])
        return got, wakeups[0]

    got, wakeups = asyncio.run(main())
    assert got == [list(range(50))] * 8
    assert wakeups < 8 * 50  # the loop is woken per batch of events, not per event


def test_no_id_at_or_above_the_tokenizers_vocabulary_is_ever_chosen(model, dec):
    """A model may embed more ids than its tokenizer has pieces (model.overrides.vocab_size):
    greedy and sampled tokens alike come from the tokenizer's ids only."""
    from pathways_lite.model.decode import sample_rows

    rows = 64
    logits_bv = np.tile(np.arange(12, dtype=np.float32), (rows, 1))  # id 11 the most likely
    drawn = sample_rows(
        logits_bv,
        np.where(np.arange(rows) < 2, 0.0, 5.0).astype(np.float32),  # 2 greedy rows
        np.arange(rows, dtype=np.int32) % 3 * 10,  # top_k 0 (all), 10, 20
        np.where(np.arange(rows) % 2, 0.99, 0.0).astype(np.float32),
        np.zeros((rows, 2), np.uint32),
        np.arange(rows, dtype=np.int32),
        vocab_size=8,
    )
    assert list(drawn[:2]) == [7, 7] and all(0 <= t < 8 for t in drawn), drawn
    assert len(set(drawn.tolist())) > 3  # sampled, not all greedy
    # The slot decoder samples below its `vocab_size`: its greedy first token is the best
    # of the ids below the unrestricted one.
    prompts = _prompts(11, [5, 7, 9, 4])
    logits, first = dec.prefill(prompts, [0, 1, 2, 3], Sampling.zeros(4))
    i = int(np.argmax(first))
    limit = int(first[i])
    assert limit > 0
    narrow = SlotDecoder(model, max_batch=1, max_seq_len=16, vocab_size=limit)
    _, [tok] = narrow.prefill([prompts[i]], [0], Sampling.zeros(1))
    assert tok == int(np.argmax(logits[i][:limit]))


def test_a_request_whose_text_fails_ends_alone_and_the_batch_goes_on(dec):
    """An exception of one request's own (its tokens' text) ends that stream INTERNAL naming
    why and frees its slot; the other requests and the loop go on."""
    [p, q] = _prompts(12, [6, 8])
    eng = ServeEngine(dec, _text)
    try:
        alone = [_collect(eng.submit(Request(x, max_tokens=8)))[0] for x in (p, q)]
    finally:
        eng.stop("test over")
    assert alone[0][0] != alone[1][0]
    bad = alone[0][0]

    def decode(ids) -> str:  # as Tokenizer.decode does for an id it has no piece for
        if ids[0] == bad:
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary of 7.")
        return _text(ids)

    eng = ServeEngine(dec, decode)
    try:
        failing, other = (eng.submit(Request(x, max_tokens=8)) for x in (p, q))
        with pytest.raises(ServeError, match=f"token id {bad} is outside") as ended:
            _collect(failing)
        assert ended.value.code == "INTERNAL"
        assert _collect(other)[0] == alone[1]
        assert eng.running and eng.load() == 0
        assert _collect(eng.submit(Request(q, max_tokens=8)))[0] == alone[1]
    finally:
        eng.stop("test over")


def test_a_seeds_64_bits_all_choose_its_tokens_and_bad_seeds_are_refused(dec):
    eng = ServeEngine(dec, _text)
    [p] = _prompts(13, [6])

    def tokens(seed: int) -> list[int]:
        req = Request(p, max_tokens=10, temperature=1.0, seed=seed)
        return _collect(eng.submit(req))[0]

    try:
        low = tokens(5)
        assert tokens(5 + 2**32) != low  # the high word counts
        assert tokens(5) == low
        for seed in (-1, 2**64):
            with pytest.raises(ServeError, match=f"seed={seed} must be in") as refused:
                eng.submit(Request(p, max_tokens=1, seed=seed))
            assert refused.value.code == "INVALID_ARGUMENT"
    finally:
        eng.stop("test over")


def test_stop_strings_are_bounded_in_number_and_length_naming_the_bad_one(dec):
    eng = ServeEngine(dec, _text)
    [p] = _prompts(14, [4])
    try:
        for stop, message in (
            (("x",) * 17, "stop has 17 strings; at most 16"),
            (("a", "b", "c", "y" * 300), r"stop\[3\] is 300 characters long; at most 256"),
            (("a", ""), r"stop\[1\] is empty"),
        ):
            with pytest.raises(ServeError, match=message) as refused:
                eng.submit(Request(p, max_tokens=4, stop=stop))
            assert refused.value.code == "INVALID_ARGUMENT"
        assert Request(p, max_tokens=4, stop=("abc", "de")).hold == 2  # once per request
    finally:
        eng.stop("test over")


def test_streamed_text_never_holds_a_character_whose_bytes_are_still_coming(dec):
    """Byte-fallback tokens: a character's first UTF-8 bytes decode to U+FFFD until its
    last one comes. Only text the decoder can no longer change is sent; the pieces make the
    final text."""

    def decode(ids) -> str:  # each token one byte of "ééé...": every other one ends a char
        return ("é" * len(ids)).encode()[: len(ids)].decode("utf-8", errors="replace")

    eng = ServeEngine(dec, decode)
    [p] = _prompts(15, [5])
    try:
        req = eng.submit(Request(p, max_tokens=7))
        pieces, final = [], None
        while final is None:
            ev = req.events.get(timeout=60)
            if ev[0] == "token":
                pieces.append(ev[2])
            else:
                assert ev[0] == "end", ev
                final = ev[2]
    finally:
        eng.stop("test over")
    assert final == "ééé\ufffd"  # the last character's second byte never came
    sent = ""
    for piece in pieces:
        sent += piece
        assert final.startswith(sent), (sent, final)
    assert sent == final


def test_a_top_k_past_what_the_batch_holds_is_refused_at_the_host():
    """The worker's top_k is uint32 and the batch holds it as int32: a request (a direct
    host Generate) of top_k 2**31 is refused naming it. Before, it passed the check and
    failed the whole serve loop at its prefill, ending every stream in flight."""
    from pathways_lite.workers.serve_engine import check_sampling

    kw = {"temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ()}
    check_sampling(top_k=2**31 - 1, **kw)
    with pytest.raises(ValueError, match=r"top_k=2147483648 must be in \[0, 2\*\*31\)"):
        check_sampling(top_k=2**31, **kw)
