"""bench/chaos.py's kill schedule, its solo step time and its cached reference
(bench/chaos_reference.py): the gaps average exactly the interval asked; the solo step time is
the chaos job's own steps clear of its start-up and of every kill (the reference's only when
too few are); a cached reference gives back exactly the losses kept (bitwise), only for the
same determinants and only when it has the steps asked."""

from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def bench_modules(monkeypatch, tmp_path):
    """bench/chaos.py and bench/chaos_reference.py, imported with the environment they set
    undone afterwards, the cache in `tmp_path`."""
    monkeypatch.syspath_prepend(str(BENCH))
    saved = dict(os.environ)
    monkeypatch.setenv("PATHWAYS_LITE_CACHE", str(tmp_path))
    try:
        yield importlib.import_module("chaos"), importlib.import_module("chaos_reference")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for name in ("chaos", "chaos_reference"):
            sys.modules.pop(name, None)


def test_kill_gaps_average_exactly_the_interval_and_repeat_with_the_seed(bench_modules):
    chaos, _ = bench_modules
    for seed in range(5):
        schedule = chaos.draw_schedule(random.Random(seed), 21, 30.0, 2)
        gaps = [g for g, _ in schedule]
        assert min(gaps) >= 1.0
        # Scaled to a mean of 30 s (the 1 s floor may add a little).
        assert 30.0 * 21 - 1e-6 <= sum(gaps) <= 30.0 * 21 + 21
        assert {i for _, i in schedule} <= {0, 1}
        assert schedule == chaos.draw_schedule(random.Random(seed), 21, 30.0, 2)
    assert chaos.draw_schedule(random.Random(0), 21, 30.0, 2) != chaos.draw_schedule(
        random.Random(1), 21, 30.0, 2
    )


def test_a_cached_reference_gives_back_its_losses_bitwise_for_the_same_determinants_only(
    bench_modules, tmp_path
):
    _, reference = bench_modules
    fields = reference.determinants("model: {preset: palm-tiny}", ["a:1:2", "b:1:2"])
    assert fields["sources"] and fields["packages"]["jax"] != "absent"
    path = reference.cache_path(fields)
    assert path.is_relative_to(tmp_path)
    losses = [random.Random(0).random() * 7 for _ in range(50)] + [1e-300, 6.931471805599453]
    reference.save(path, fields, losses, solo_step_s=0.1, step_s_median=0.09, loadavg=[1, 2, 3])
    entry = reference.load(path, steps_needed=len(losses))
    assert entry["losses"] == losses  # floats through JSON: exact
    assert entry["solo_step_s"] == 0.1
    assert reference.load(path, steps_needed=len(losses) + 1) is None  # too short
    other = reference.determinants("model: {preset: palm-tiny}", ["a:2:1", "b:2:1"])
    assert reference.cache_path(other) != path  # another island layout: another reference
    assert reference.load(reference.cache_path(other)) is None


def test_the_solo_step_time_comes_from_the_chaos_runs_steps_clear_of_every_kill(bench_modules):
    chaos, _ = bench_modules
    settle_us = int(chaos.SETTLE_S * 1e6)
    # A job's steps: a slow start-up (0.5 s steps for SETTLE_S), then 0.1 s steps; a kill
    # stalls it 3 s, and the steps are 0.3 s while the new warm spares start (SETTLE_S).
    times, t = [], 0
    while t < settle_us:
        times.append(t)
        t += 500_000
    for _ in range(200):
        times.append(t)
        t += 100_000
    kill = t - 50_000  # mid-step
    t += 3_000_000
    recovered = t
    while t < recovered + settle_us:
        times.append(t)
        t += 300_000
    for _ in range(100):
        times.append(t)
        t += 100_000
    kills = [(kill, recovered)]

    step_s, source, counted = chaos.solo_step_time(times, kills, 0.25, "reference_cache")
    assert source == "chaos_run"
    assert step_s == pytest.approx(0.1)  # neither the start-up, the stall nor the settling
    assert counted == 199 + 99
    # Everything counted (the bias this avoids): a slower figure.
    assert chaos.undisturbed_step_s(times, times[0], [], 0.0)[0] > 0.13

    # Too few clear steps (kills close together): the reference's, and it says so.
    crowded = [(times[i], times[i + 1]) for i in range(0, len(times) - 1, 2)]
    assert chaos.solo_step_time(times, crowded, 0.25, "reference_cache") == (
        0.25,
        "reference_cache",
        0,
    )


def test_goodput_counts_each_step_at_the_solo_cost_of_its_conditions(bench_modules):
    """With the reference beside (paused from each kill to its recovery's settling), steps run
    while it was paused count at the job's clear steps alone, the others at its clear steps
    beside it; a steady run scores 1 and a stall costs exactly its length."""
    chaos, _ = bench_modules
    times, t = [], 0
    for _ in range(300):  # the start, reference paused: 0.1 s steps
        times.append(t)
        t += 100_000
    paused = [(0, t - 50_000)]
    for _ in range(200):  # beside the running reference: 0.2 s steps
        times.append(t)
        t += 200_000
    kill = t - 100_000
    start = kill
    t += 2_000_000  # the recovery's stall, paused
    recovered = t
    for _ in range(int(chaos.SETTLE_S / 0.1) + 1):  # settling, still paused
        times.append(t)
        t += 100_000
    paused.append((start, t - 50_000))
    for _ in range(100):
        times.append(t)
        t += 200_000
    kills = [(kill, recovered)]

    alone, source, n_alone = chaos.solo_step_time(times, kills, 9.9, "x", paused)
    beside, _, n_beside = chaos.solo_step_time(times, kills, 9.9, "x", paused, in_pause=False)
    assert source == "chaos_run"
    assert alone == pytest.approx(0.1) and beside == pytest.approx(0.2)
    assert n_alone > 150 and n_beside > 250
    ideal = chaos.ideal_s(times, paused, alone, beside)
    wall = (times[-1] - times[0]) / 1e6
    # The stall (2 s, plus the step it interrupted) is what the run lost.
    assert wall - ideal == pytest.approx(2.0 + 0.1 - 0.1, abs=0.25)
    assert ideal / wall < 1.0
    # Without pauses it reduces to one solo step time for every step.
    assert chaos.ideal_s(times, [], alone, beside) == pytest.approx(beside * (len(times) - 1))
