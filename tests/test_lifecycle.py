"""The model's life cycle on a real cluster (issue 17): a chain of jobs submitted in one call,
fine-tuning from another job's checkpoint on another mesh, an eval job, and `after`'s
failure propagation; the errors name the field and value."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request

import grpc
import pytest

from pathways_lite import cli
from pathways_lite.client import ClientError, ControllerClient, state_name
from pathways_lite.controller import auth
from pathways_lite.spec import SpecError, chain_order, load_spec_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

COMMON = """\
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}
"""
PRE = f"""\
name: life-pre
{COMMON}mesh: {{data: 1, model: 2}}
train: {{steps: 4, global_batch: 4, seq_len: 64, seed: 1, eval_every: 4}}
optimizer: {{learning_rate: 0.01, warmup_steps: 0}}
eval: {{max_examples: 8}}
"""
# Resharded onto another mesh, with another optimizer setting and seed; a learning rate so
# small that its parameters stay within rounding of the checkpoint's.
FT = f"""\
name: life-ft
{COMMON}mesh: {{data: 2, model: 1}}
init_from: {{job: life-pre}}
train: {{steps: 2, global_batch: 4, seq_len: 64, seed: 7, eval_every: 2}}
optimizer: {{learning_rate: 1.0e-9, warmup_steps: 0, weight_decay: null}}
eval: {{max_examples: 8}}
"""
EV = f"""\
name: life-ev
kind: eval
{COMMON}mesh: {{data: 1, model: 2}}
init_from: {{job: life-ft}}
train: {{global_batch: 4, seq_len: 64}}
eval: {{max_examples: 8}}
"""


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_chain_fine_tunes_from_a_checkpoint_on_another_mesh_and_evaluates_it(
    local_cluster, tmp_path, capsys
) -> None:
    state = str(local_cluster.state_dir)
    paths = []
    for name, text in (("pre", PRE), ("ft", FT), ("ev", EV)):
        paths.append(str(tmp_path / f"{name}.yaml"))
        (tmp_path / f"{name}.yaml").write_text(text)
    code, out, err = run_cli(capsys, "submit", *paths, "--state-dir", state)
    assert code == 0, err
    ids = [line.split()[1] for line in out.splitlines() if line.startswith("submitted")]
    assert len(ids) == 3, out
    pre_id, ft_id, ev_id = ids
    with ControllerClient(state) as client:
        ft = client.get(ft_id)
        assert list(ft.depends_on) == [pre_id]  # init_from implies after, stored as the id
        if state_name(ft.state) == "queued":
            assert pre_id in ft.pending_reason and "init_from" in ft.pending_reason
        ev = client.wait(ev_id, timeout_s=300)
        assert state_name(ev.state) == "succeeded", ev.message
        pre, ft = client.get(pre_id), client.get(ft_id)
    assert state_name(pre.state) == state_name(ft.state) == "succeeded"
    # Parameters only, read onto another mesh: the fine-tuned job's evaluation is the
    # pre-trained one's (fresh parameters would score differently).
    assert ft.init_checkpoint.endswith("step4"), ft.init_checkpoint
    assert ft.steps_completed == 2
    assert [e.step for e in pre.evals] == [4] and [e.step for e in ft.evals] == [2]
    pre_loss = pre.evals[0].sources["stdlib"].loss
    assert abs(ft.evals[0].sources["stdlib"].loss - pre_loss) < 1e-3
    # The eval job reads the fine-tuned job's checkpoint (its step) on the first mesh again.
    (result,) = ev.evals
    assert result.step == 2
    lm = result.sources["stdlib"]
    assert lm.examples == 8 and 0 < lm.loss < 10
    assert math.isclose(lm.perplexity, math.exp(lm.loss), rel_tol=1e-9)
    assert not lm.HasField("exact_match")  # a language-model source
    assert abs(ft.evals[0].sources["stdlib"].loss - lm.loss) < 1e-4

    code, out, err = run_cli(capsys, "eval", ev_id, "--json", "--state-dir", state)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["step"] == 2 and set(printed["sources"]) == {"stdlib"}
    assert set(printed["sources"]["stdlib"]) == {"loss", "perplexity", "examples"}
    assert printed["sources"]["stdlib"]["loss"] == lm.loss

    # The dashboard's job page: the chain both ways, the evaluations; /metrics exports them.
    base = json.loads((local_cluster.state_dir / "controller.json").read_text())["dashboard"]
    headers = {"Authorization": auth.bearer(auth.read_token(local_cluster.state_dir / "token"))}

    def get(path: str) -> str:
        request = urllib.request.Request(base + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()

    detail = json.loads(get(f"api/jobs/{ft_id}"))
    chain = detail["chain"]
    assert chain["init_from"]["job"]["id"] == pre_id
    assert chain["init_from"]["checkpoint"] == ft.init_checkpoint
    assert [(c["id"], c["how"]) for c in chain["children"]] == [(ev_id, "init_from")]
    assert [e["step"] for e in detail["evals"]] == [2]
    metrics = get("metrics")
    assert re.search(
        rf'^pathways_lite_job_eval_loss\{{job="{ev_id}",name="life-ev",source="stdlib"\}} ',
        metrics,
        re.M,
    ), metrics


def test_a_job_after_a_cancelled_job_fails_with_its_reason(local_cluster) -> None:
    state = str(local_cluster.state_dir)
    first = load_spec_text(PRE.replace("life-pre", "life-long").replace("steps: 4", "steps: 500"))
    with ControllerClient(state) as client:
        a = client.submit(first)
        second = load_spec_text(PRE.replace("life-pre", "life-next"))
        second.after.append(a.id)
        b = client.submit(second)
        deadline = time.monotonic() + 60
        while state_name(client.get(b.id).state) != "queued" or not client.get(b.id).pending_reason:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert a.id in client.get(b.id).pending_reason
        client.cancel(a.id, reason="enough")
        b = client.wait(b.id, timeout_s=60)
    assert state_name(b.state) == "failed"
    assert b.reason == "dependency_cancelled"
    assert a.id in b.message and "enough" in b.message


def test_bad_references_are_refused_naming_the_field_and_value(local_cluster) -> None:
    state = str(local_cluster.state_dir)
    with ControllerClient(state) as client:
        spec = load_spec_text(PRE.replace("life-pre", "life-bad"))
        spec.after.append("no-such-job-xyz")
        with pytest.raises(ClientError) as e:
            client.submit(spec, validate_only=True)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "after[0]='no-such-job-xyz'" in str(e.value)

        source = client.submit(
            load_spec_text(PRE.replace("life-pre", "life-src").replace("steps: 4", "steps: 1"))
        )
        wider = load_spec_text(
            FT.replace("life-pre", source.id).replace(
                "palm-tiny}", "palm-tiny, overrides: {n_layers: 3}}"
            )
        )
        with pytest.raises(ClientError) as e:
            client.submit(wider, validate_only=True)
        assert "model.n_layers=3 differs from the checkpoint's n_layers=" in str(e.value)

        late = load_spec_text(FT.replace("life-pre", source.id))
        late.init_from.step = 5
        with pytest.raises(ClientError) as e:
            client.submit(late, validate_only=True)
        assert "init_from.step=5 is past job" in str(e.value)

        client.cancel(source.id)
        with pytest.raises(ClientError) as e:
            client.submit(load_spec_text(FT.replace("life-pre", source.id)), validate_only=True)
        assert f"init_from.job='{source.id}'" in str(e.value) and "cancelled" in str(e.value)


def test_a_dependency_cycle_among_the_files_of_one_submission_is_refused() -> None:
    a = load_spec_text(PRE.replace("life-pre", "cyc-a") + "after: [cyc-c]\n")
    b = load_spec_text(FT.replace("life-ft", "cyc-b").replace("life-pre", "cyc-a"))
    c = load_spec_text(EV.replace("life-ev", "cyc-c").replace("life-ft", "cyc-b"))
    with pytest.raises(
        SpecError, match=r"closes a dependency cycle: cyc-a -> cyc-c -> cyc-b -> cyc-a"
    ):
        chain_order([a, b, c])
    # Forward references without a cycle are submitted in dependency order.
    assert chain_order([c, b, load_spec_text(PRE.replace("life-pre", "cyc-a"))]) == [2, 1, 0]
