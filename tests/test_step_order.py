"""StepOrder, without JAX or a server: epochs, island_seq contiguity and waiting, skips, and
RunStep's idempotent replay on (job, generation, step)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from pathways_lite.v1 import worker_pb2
from pathways_lite.workers.ordering import StepOrder, StepRecords, same_load
from pathways_lite.workers.rpc import RpcRejection

pytestmark = pytest.mark.timeout(60)


class Steps:
    """An `execute` factory that records the order steps ran in."""

    def __init__(self) -> None:
        self.ran: list[int] = []

    def __call__(self, step: int, *, delay_s: float = 0.0, fail: bool = False):
        async def execute():
            if delay_s:
                await asyncio.sleep(delay_s)
            self.ran.append(step)
            if fail:
                return RpcRejection(grpc.StatusCode.INTERNAL, f"step {step} failed")
            return worker_pb2.RunStepReply(step=step, loss=float(step) + 0.5)

        return execute


def run(coro):
    return asyncio.run(coro)


def test_a_retried_step_returns_the_recorded_reply_without_running_again() -> None:
    async def main():
        order, records, steps = StepOrder(), StepRecords(), Steps()
        order.check_epoch(1)
        first = await order.run_step(records, (0, 0), 0, 1, steps(0))
        retry = await order.run_step(records, (0, 0), 0, 1, steps(0))
        assert not first.replayed and retry.replayed
        assert retry.loss == first.loss and retry.step == 0
        assert steps.ran == [0] and order.next_seq == 1

    run(main())


def test_a_retry_while_the_step_runs_waits_for_it_and_replays() -> None:
    async def main():
        order, records, steps = StepOrder(), StepRecords(), Steps()
        first, retry = await asyncio.gather(
            order.run_step(records, (0, 0), 0, 0, steps(0, delay_s=0.05)),
            order.run_step(records, (0, 0), 0, 0, steps(0)),
        )
        assert not first.replayed and retry.replayed
        assert steps.ran == [0]

    run(main())


def test_a_recorded_rejection_is_replayed_as_the_same_rejection() -> None:
    async def main():
        order, records, steps = StepOrder(), StepRecords(), Steps()
        for _ in range(2):
            with pytest.raises(RpcRejection) as err:
                await order.run_step(records, (0, 0), 0, 0, steps(0, fail=True))
            assert err.value.code == grpc.StatusCode.INTERNAL
        assert steps.ran == [0]

    run(main())


def test_a_step_that_overtook_an_earlier_one_waits_and_runs_in_seq_order() -> None:
    async def main():
        order, records, steps = StepOrder(gap_wait_s=5.0), StepRecords(), Steps()
        late = asyncio.ensure_future(order.run_step(records, (0, 1), 1, 0, steps(1)))
        await asyncio.sleep(0.05)
        assert not late.done() and steps.ran == []
        await order.run_step(records, (0, 0), 0, 0, steps(0))
        assert (await late).step == 1
        assert steps.ran == [0, 1] and order.next_seq == 2

    run(main())


def test_a_gap_is_refused_after_the_wait_naming_both_numbers() -> None:
    async def main():
        order, records, steps = StepOrder(gap_wait_s=0.05), StepRecords(), Steps()
        await order.run_step(records, (0, 0), 0, 0, steps(0))
        with pytest.raises(RpcRejection) as err:
            await order.run_step(records, (0, 2), 2, 0, steps(2))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "island_seq=2 skips ahead" in err.value.message
        assert "expected island_seq=1" in err.value.message
        with pytest.raises(RpcRejection, match="was already used"):
            await order.run_step(records, (0, 7), 0, 0, steps(7))
        assert steps.ran == [0]

    run(main())


def test_skip_fills_the_next_number_once_and_refuses_to_skip_ahead() -> None:
    async def main():
        order = StepOrder(gap_wait_s=5.0)
        records, steps = StepRecords(), Steps()
        waiting = asyncio.ensure_future(order.run_step(records, (0, 1), 1, 0, steps(1)))
        await asyncio.sleep(0.02)
        assert order.skip(0) == (1, False)  # wakes the step waiting on number 0
        assert (await waiting).step == 1
        assert order.skip(0) == (2, True)
        with pytest.raises(RpcRejection, match="island_seq=5 skips ahead"):
            order.skip(5)

    run(main())


def test_a_stale_epoch_is_refused_and_a_newer_one_restarts_the_sequence() -> None:
    adopted: list[int] = []
    order = StepOrder(on_new_epoch=adopted.append)
    order.check_epoch(5)
    order.skip(0)
    order.skip(1)
    with pytest.raises(RpcRejection) as err:
        order.check_epoch(4)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch=4" in err.value.message and "5" in err.value.message
    assert order.is_stale(4) and not order.is_stale(5)
    order.check_epoch(6)
    assert (order.newest_epoch, order.next_seq, adopted) == (6, 0, [5, 6])


def test_a_step_cancelled_while_queued_is_recorded_as_aborted() -> None:
    async def main():
        order, records = StepOrder(), StepRecords()

        async def never():
            await asyncio.sleep(60)

        task = asyncio.ensure_future(order.run_step(records, (0, 0), 0, 0, never))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(RpcRejection) as err:
            await order.run_step(records, (0, 0), 0, 0, Steps()(0))
        assert err.value.code == grpc.StatusCode.ABORTED

    run(main())


def test_records_keep_only_the_newest_steps() -> None:
    async def main():
        order, records, steps = StepOrder(), StepRecords(limit=3), Steps()
        for k in range(5):
            await order.run_step(records, (0, k), k, 0, steps(k))
        assert list(records.results) == [(0, 2), (0, 3), (0, 4)]

    run(main())


def test_a_load_retried_under_a_new_epoch_is_the_same_load() -> None:
    a = worker_pb2.LoadJobRequest(job_id="j", epoch=1, seed=3)
    b = worker_pb2.LoadJobRequest(job_id="j", epoch=2, seed=3)
    c = worker_pb2.LoadJobRequest(job_id="j", epoch=1, seed=4)
    assert same_load(a, b) and not same_load(a, c)
    assert a.epoch == 1 and b.epoch == 2  # the comparison changes neither


def test_the_ordering_rules_import_no_jax() -> None:
    code = (
        "import sys\n"
        "import pathways_lite.workers.ordering\n"
        "assert 'jax' not in sys.modules, 'ordering imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_step_cut_while_queued_is_run_by_the_later_slice_waiting_for_it() -> None:
    """A slice's step queued (behind an Evaluate, say) is cut for serving (StepNotRun) while
    the job's next slice, granted from the cut, already waits for it (`replay`): that call
    runs the step under its own number, it is not refused with the cut's ABORTED."""
    from pathways_lite.workers.ordering import StepNotRun

    async def main():
        order, records, steps = StepOrder(), StepRecords(), Steps()
        order.check_epoch(1)
        (future,) = order.claim(records, [(0, 5)], 0)
        waiting = asyncio.ensure_future(order.run_step(records, (0, 5), 1, 1, steps(5)))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # step 5 is in flight in the first slice

        async def cut():
            raise StepNotRun("step 5 was cut (serving); it runs in a later slice.")

        with pytest.raises(StepNotRun):
            await records.run((0, 5), cut, future)
        reply = await waiting
        assert reply.step == 5 and not reply.replayed
        assert steps.ran == [5] and order.next_seq == 2

    run(main())


def test_claimed_steps_that_never_run_are_run_by_a_call_waiting_for_them() -> None:
    """A slice takes its numbers at once (`claim`); a step its slice ended before (released)
    is run by a RunStep that was waiting for it, under its own number, not refused."""

    async def main():
        order, records, steps = StepOrder(), StepRecords(), Steps()
        order.check_epoch(1)
        futures = order.claim(records, [(0, 0), (0, 1), (0, 2)], 0)
        assert order.next_seq == 3 and records.known((0, 2))
        ran = await records.run((0, 0), steps(0), futures[0])
        assert ran.step == 0
        waiting = asyncio.ensure_future(order.run_step(records, (0, 1), 3, 1, steps(1)))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # step 1 is in flight in the slice
        for key, future in zip([(0, 1), (0, 2)], futures[1:], strict=True):
            records.release(key, future)
        reply = await waiting
        assert reply.step == 1 and not reply.replayed
        assert steps.ran == [0, 1] and order.next_seq == 4
        assert not records.known((0, 2))  # released: nothing recorded
        assert (await order.run_step(records, (0, 0), 4, 1, steps(0))).replayed

    run(main())
