"""Mixtures, span corruption and masked text-to-text: the objectives, the dynamic weights rule,
and a 2-island job driven by the controller's Dispatcher over real gRPC hosts that matches the
reference trainer (replaying the recorded weights), also after a restore from a checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time

import numpy as np
import pytest

from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.dispatch import Dispatcher
from pathways_lite.controller.islands import Island, connect_host
from pathways_lite.controller.mixture_weights import MixtureSchedule, weights_by_step
from pathways_lite.controller.resolved import palm_program
from pathways_lite.model import mixture, objectives, tasks
from pathways_lite.model.corpus import DataError
from pathways_lite.model.data import prepare_dataset
from pathways_lite.model.train import ReferenceTrainer
from pathways_lite.spec import spec_from_dict
from pathways_lite.workers.checkpoint import checkpoint_path, is_committed

pytestmark = pytest.mark.timeout(300)

SEQ, BATCH, STEPS, EVERY = 32, 4, 8, 2
MIXTURE = {
    "mixture": [
        {"source": "stdlib", "objective": "lm", "weight": 2},
        {"source": "stdlib", "objective": "span_corruption", "weight": 1},
        {"source": "stdlib-tasks", "task": "name_from_docstring", "weight": 1},
    ],
    "mixture_weights": "dynamic",
    "mixture_every": EVERY,
    "vocab_size": 512,
    "max_bytes": 150_000,
}


def job_spec(data: dict, steps: int = STEPS, **train):
    return spec_from_dict(
        {
            "name": "mix",
            "model": {"preset": "palm-tiny"},
            "mesh": {"data": 1, "model": 1},
            "islands": 2,
            "devices_per_island": 1,
            "train": {"steps": steps, "global_batch": BATCH, "seq_len": SEQ, "seed": 3, **train},
            "data": data,
        }
    )


# ---- objectives and the weights rule ---------------------------------------------------------


def test_span_corruption_hides_spans_behind_sentinels_and_learns_only_the_targets():
    raw = np.arange(100, 100 + objectives.raw_length(SEQ, 8), dtype=np.int32)
    sentinels = list(range(10, 18))
    tokens, mask = objectives.span_corrupt(
        raw, np.random.default_rng(0), seq_len=SEQ, sep_id=2, eos_id=1, sentinel_ids=sentinels
    )
    sep = int(np.nonzero(tokens == 2)[0][0])
    inputs, targets = tokens[:sep], tokens[sep + 1 : sep + 1 + int(mask.sum())]
    assert mask[: sep + 1].sum() == 0 and targets[-1] == 1
    # Filling each sentinel of the inputs with its span from the targets gives the raw text.
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    rebuilt = [x for t in inputs for x in (spans[int(t)] if t in sentinels else [int(t)])]
    assert rebuilt == list(raw)
    noise = sum(len(v) for v in spans.values())
    assert noise == round(len(raw) * objectives.NOISE_DENSITY)


def test_packed_text_to_text_examples_get_their_own_segments_and_target_masks():
    tokens, mask, seg = objectives.pack_text2text(
        [([5, 6, 7], [8]), ([9], [10, 11]), (list(range(20, 60)), [61])],
        seq_len=15,
        sep_id=2,
        eos_id=1,
    )
    assert tokens[0, :12].tolist() == [5, 6, 7, 2, 8, 1, 9, 2, 10, 11, 1, 1]
    assert mask[0, :12].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    assert seg[0, :12].tolist() == [1] * 6 + [2] * 5 + [0]
    # Too long for a row: the end of the inputs is kept, the targets whole.
    assert tokens[1].tolist()[-3:] == [2, 61, 1] and tokens[1, 0] == 60 - 13


def test_dynamic_weights_favour_the_harder_source_within_bounds():
    base = [2.0, 1.0, 1.0]
    w = mixture.dynamic_weights(base, [10.0, 40.0, 5.0], [10, 10, 10])
    assert w == mixture.dynamic_weights(base, [10.0, 40.0, 5.0], [10, 10, 10])  # pure
    assert abs(sum(w) - 1) < 1e-12 and w[1] > 0.25 > w[2]
    p = np.asarray(base) / 4
    extreme = mixture.dynamic_weights(base, [0.0, 1e6, 0.0], [1, 1, 1])
    assert np.all(np.asarray(extreme) / p <= np.e**2 + 1e-9)
    assert np.all(np.asarray(extreme) / p >= np.e**-2 - 1e-9)
    # No targets of a source in the block: it keeps its base shift.
    assert mixture.dynamic_weights(base, [0, 0, 0], [0, 0, 0]) == tuple(p)


def test_stdlib_tasks_hold_out_whole_modules():
    train = tasks.task_pairs("stdlib-tasks", "name_from_docstring", [], "train", max_bytes=50_000)
    held = tasks.task_pairs("stdlib-tasks", "name_from_docstring", [], "heldout", max_bytes=50_000)
    assert train and held and not set(train) & set(held)
    assert all(p.targets.isidentifier() for p in train)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "pattern"),
    [
        (
            {"mixture": [{"source": "stdlib", "objective": "fill_in"}]},
            "data.mixture[0].objective",
            r"data.mixture\[0\].objective='fill_in' is not one of 'lm', 'span_corruption'",
        ),
        (
            {"mixture": [{"source": "stdlib", "weight": 0}, {"source": "stdlib", "weight": 0}]},
            "data.mixture",
            r"data.mixture weights \[0.0, 0.0\] must .* sum to a positive number",
        ),
        (
            {"source": "stdlib-tasks", "task": "summarise"},
            "data.task",
            r"data.task='summarise' is not one of",
        ),
    ],
)
def test_bad_mixtures_are_refused_naming_the_field_and_value(data, field, pattern):
    with pytest.raises(spec_lib.SpecError, match=pattern) as info:
        spec_lib.to_configs(job_spec(data))
    assert info.value.field == field


def test_a_task_file_without_targets_is_refused_naming_the_file_and_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"inputs": "a", "targets": "b"}\n' * 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": "2 + 2", "answer": "4"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl' row 0 has no field 'targets'"):
        tasks.task_pairs("text2text", None, [str(bad)], "train")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"inputs": ["x"], "label": ["y"]}), table)
    with pytest.raises(DataError, match=r"t.parquet' has no column 'targets'"):
        tasks.task_pairs("text2text", None, [str(table)], "train")
    from pathways_lite.controller.data_paths import check_data_paths

    spec = job_spec(
        {"mixture": [{"source": "stdlib"}, {"source": "text2text", "paths": [str(bad)]}]}
    )
    with pytest.raises(spec_lib.SpecError, match=r"data.mixture\[1\].paths: .*bad.jsonl' row 0"):
        check_data_paths(spec)  # at submit
    check_data_paths(
        job_spec({"source": "text2text", "paths": [str(good), str(table)[:0] or str(good)]})
    )
    spec = job_spec({"source": "text2text", "paths": [str(bad)], "vocab_size": 300})
    cfg = spec_lib.to_configs(spec)
    with pytest.raises(DataError, match=r"data: .*bad.jsonl' row 0 has no field 'targets'"):
        prepare_dataset(cfg.data, seq_len=SEQ, cache_dir=str(tmp_path))


# ---- 2 islands == reference, and a restore -------------------------------------------------


@dataclasses.dataclass
class Record:
    id: str
    spec: object
    generation: int = 0


async def _run(addresses, program, epoch, load_program=None):
    islands = [Island(f"mix-{i}", [await connect_host(a)]) for i, a in enumerate(addresses)]
    try:
        dispatcher = Dispatcher(epoch=epoch)
        await dispatcher.load(load_program or program, islands)
        reports = []
        await dispatcher.run(program, islands, on_step=reports.append)
        await dispatcher.unload(program.job_id, islands)
        return reports
    finally:
        for island in islands:
            await island.close()


def _reference(spec, events):
    configs = spec_lib.to_configs(spec)
    ds = prepare_dataset(configs.data, seq_len=SEQ)
    blocks = weights_by_step(events, EVERY)
    train = configs.train
    trainer = ReferenceTrainer(
        configs.model,
        configs.optim,
        train,
        num_sources=ds.num_sources,
        segmented=ds.segmented,
    )
    return [
        r.loss
        for r in trainer.run(
            lambda s: ds.global_batch(s, BATCH, train.seed, blocks.get(s // EVERY))
        )
    ]


@pytest.fixture(scope="module")
def hosts():
    from test_data_parallel import serve_hosts, stop_hosts

    served = serve_hosts([[0], [1]])
    try:
        yield served
    finally:
        stop_hosts(served)


@pytest.fixture(scope="module")
def two_island_run(hosts):
    """The dynamic mixture on 2 islands through the Dispatcher, checkpointing after step 4,
    and the reference trainer replaying the weights it recorded."""
    spec = job_spec(MIXTURE, checkpoint_every=4)
    program = palm_program(Record("mix2", spec))
    events: list[tuple[str, str]] = []
    program.mixture.record = lambda kind, message: events.append((kind, message))
    ckpt = tempfile.mkdtemp(prefix="mix-ckpt-")
    program = dataclasses.replace(program, checkpoint_dir=ckpt)
    reports = asyncio.run(_run([h.address for h in hosts], program, epoch=101))
    return program, reports, events, _reference(spec, events), ckpt


def test_a_dynamic_mixture_on_two_islands_matches_the_reference(two_island_run):
    program, reports, events, reference, _ = two_island_run
    losses = [r.loss for r in reports]
    assert [r.step for r in reports] == list(range(STEPS))
    decided = weights_by_step(events, EVERY)
    assert sorted(decided) == [2, 3], events  # blocks 2 and 3 of 4 were re-weighted
    assert decided[2] != tuple(program.mixture.base)
    diff = np.max(np.abs(np.asarray(losses) - reference) / np.abs(reference))
    assert diff <= 1e-5, (losses, reference)

    # Per-source metrics: every row's targets are counted under its source.
    names, counts = program.mixture.names, np.zeros(3)
    for r in reports:
        _, tokens = program.mixture.source_metrics(r.loss_stats)
        counts += [tokens[n] for n in names]
        assert abs(r.loss_stats[0] / r.loss_stats[1] - r.loss) < 1e-6
    assert np.all(counts > 0), counts


def test_a_mixture_restored_mid_way_gives_the_uninterrupted_losses(hosts, two_island_run):
    program, reports, events, _, ckpt = two_island_run
    losses = [r.loss for r in reports]
    addresses = [h.address for h in hosts]
    # Restore from the checkpoint after step 4 on a fresh schedule read from the events.
    path = checkpoint_path(ckpt, 0, 4)
    deadline = time.monotonic() + 60
    while not is_committed(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert is_committed(path), path
    fresh = MixtureSchedule(
        program.mixture.names, program.mixture.base, dynamic=True, every=EVERY
    ).load_events(events)
    resumed = dataclasses.replace(
        program, generation=1, start_step=4, restore_from=path, checkpoint_dir="", mixture=fresh
    )
    again = asyncio.run(_run(addresses, resumed, epoch=102))
    assert [r.step for r in again] == list(range(4, STEPS))
    assert np.max(np.abs(np.asarray([r.loss for r in again]) - losses[4:])) <= 1e-6


# ---- through the whole controller (the session's LocalCluster: 1 island x 2 devices) -------


@pytest.mark.slow
def test_a_submitted_mixture_job_records_its_weights_and_matches_the_reference(
    local_cluster, two_island_run
):
    """The same spec on the session's 1 island x 2 devices (mesh data 2): the controller's
    recorded weights and losses are the 2-island run's, hence the reference's."""
    from pathways_lite.client import ControllerClient, state_name

    _, _, island_events, reference, _ = two_island_run
    spec = job_spec(MIXTURE, checkpoint_every=4)
    spec.islands, spec.devices_per_island = 1, 2
    spec.mesh.data = 2
    with ControllerClient(local_cluster.state_dir) as client:
        job = client.wait(client.submit(spec).id, timeout_s=240)
        live = [u.metrics for u in client.watch(job.id) if u.HasField("metrics")]
    assert state_name(job.state) == "succeeded", job.message
    events = [(e.kind, e.message) for e in job.events]
    decided = weights_by_step(events, EVERY)
    expected = weights_by_step(island_events, EVERY)
    assert sorted(decided) == [2, 3], events
    assert any(kind == "mixture_losses" for kind, _ in events)
    for block, weights in expected.items():
        np.testing.assert_allclose(decided[block], weights, rtol=1e-6)
    diff = np.max(np.abs(np.asarray(job.losses) - reference) / np.abs(reference))
    assert diff <= 1e-5, (list(job.losses), reference)
    ds = prepare_dataset(spec_lib.to_configs(spec).data, seq_len=SEQ)

    # Per-source loss and target tokens are step metrics (stored: the watch replays them).
    assert [m.step for m in live] == list(range(STEPS))
    names = ds.source_names
    for m, loss in zip(live, job.losses, strict=True):
        assert set(m.source_tokens) == set(names) and sum(m.source_tokens.values()) > 0
        weighted = sum(m.source_loss[n] * m.source_tokens[n] for n in m.source_loss)
        assert abs(weighted / sum(m.source_tokens.values()) - loss) < 1e-4 * loss


# ---- the masked step: segments, and (sum, count) over any split of the batch -----------------


def _tiny_fns(mesh=None):
    from pathways_lite.model.config import PalmConfig
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.train import StepFunctions

    cfg = dataclasses.replace(PalmConfig.palm_tiny(), vocab_size=64, n_layers=1)
    return StepFunctions(cfg, OptimConfig(), mesh, num_sources=2, segmented=True)


def test_packed_examples_do_not_attend_across_their_boundaries():
    import jax
    import jax.numpy as jnp

    fns = _tiny_fns()
    state = fns.init(0)
    model = jax.jit(lambda tokens, segments=None: fns.model(state)(tokens, segments))
    rng = np.random.default_rng(0)
    first, second = rng.integers(3, 64, 7), rng.integers(3, 64, 9)
    packed = jnp.asarray(np.concatenate([first, second])[None], jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
    alone = model(jnp.asarray(second[None], jnp.int32))
    together = model(packed, segments)
    np.testing.assert_allclose(np.asarray(together[0, 7:]), np.asarray(alone[0]), atol=2e-5)
    # Without segment ids the second example sees the first: the model is today's.
    assert not np.allclose(np.asarray(model(packed)[0, 7:]), np.asarray(alone[0]), atol=1e-3)


def test_the_masked_loss_of_a_split_batch_adds_up_to_the_whole():
    from pathways_lite.model.mixture import Batch
    from pathways_lite.model.train import make_mesh

    rng = np.random.default_rng(1)
    b, t = 4, 16
    batch = Batch(
        tokens=rng.integers(3, 64, (b, t + 1)).astype(np.int32),
        weights=(rng.random((b, t)) < 0.4).astype(np.float32),
        sources=np.asarray([0, 1, 1, 0], np.int32),
        segments=np.repeat(np.arange(1, 3), t // 2)[None].repeat(b, 0).astype(np.int32),
        ids=np.arange(b),
    )
    fns = _tiny_fns(make_mesh(2, 1))
    state = fns.init(0)
    _, whole, grads = fns.grad_fn(state, fns.place_batch(batch))
    halves = []
    for lo in (0, 2):
        half = Batch(
            batch.tokens[lo : lo + 2],
            batch.weights[lo : lo + 2],
            batch.sources[lo : lo + 2],
            batch.segments[lo : lo + 2],
            batch.ids[lo : lo + 2],
        )
        halves.append(fns.grad_fn(state, fns.place_batch(half)))
    np.testing.assert_allclose(
        np.asarray(whole), np.asarray(halves[0][1]) + np.asarray(halves[1][1]), rtol=1e-5
    )
    assert float(whole[1]) == batch.weights.sum()  # the global target count
    g_whole = np.asarray(grads["embed"]["embedding"][...])
    g_sum = sum(np.asarray(h[2]["embed"]["embedding"][...]) for h in halves)
    np.testing.assert_allclose(g_whole, g_sum, rtol=1e-4, atol=1e-6)


def test_text2text_files_read_jsonl_and_parquet_with_a_stable_content_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"inputs": f"question {i}", "targets": f"answer {i}"} for i in range(200)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:100]) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[100:]), tmp_path / "b.parquet")
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    train = tasks.task_pairs("text2text", None, paths, "train")
    held = tasks.task_pairs("text2text", None, paths, "heldout")
    assert len(train) + len(held) == 200 and 5 <= len(held) <= 40
    assert not set(train) & set(held)
    swapped = tasks.task_pairs("text2text", None, paths[::-1], "heldout")
    assert set(swapped) == set(held)  # the split depends on content, not file order


def test_a_mixture_entry_naming_no_file_is_refused_at_submit(tmp_path):
    from pathways_lite.controller.data_paths import check_data_paths

    spec = job_spec(
        {
            "mixture": [
                {"source": "stdlib"},
                {"source": "text2text", "paths": [str(tmp_path / "missing-*.jsonl")]},
            ]
        }
    )
    with pytest.raises(spec_lib.SpecError, match=r"data.mixture\[1\].paths\[0\]=.*matches no"):
        check_data_paths(spec)


def test_a_given_tokenizer_is_used_instead_of_training_one(tmp_path, tokenizer):
    from pathways_lite.model.data import DataSpec

    spec = DataSpec(mixture=({"source": "stdlib-tasks", "task": "docstring_from_body"},))
    spec = dataclasses.replace(spec, max_bytes=20_000, vocab_size=tokenizer.vocab_size)
    ds = prepare_dataset(spec, seq_len=SEQ, cache_dir=str(tmp_path), tokenizer=tokenizer)
    assert ds.tokenizer.hash == tokenizer.hash
    assert not (tmp_path / "tokenizers").exists()  # nothing was trained
    row = ds.global_batch(0, 2, 0)
    assert tokenizer.sep_id in row.tokens[0]
