"""`submit` of several files, client errors and `dashboard --open`, against a stand-in
controller on a real gRPC port (tests/fake_controller.py): one JSON document per command, the
ids of a chain refused part way, a lost submission retried without a second job, a deadline
that names its rpc, and no token on a browser's command line.
"""

from __future__ import annotations

import json
import stat
import time
import webbrowser
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from fake_controller import serve_fake

from pathways_lite import cli, client
from pathways_lite.client import ClientError, ControllerClient

pytestmark = pytest.mark.timeout(60)

SPEC = """\
name: {name}
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 1
mesh: {{data: 1, model: 1}}
train: {{steps: 3, global_batch: 4, seq_len: 64, seed: 1}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


@pytest.fixture
def fake(tmp_path):
    fake, server = serve_fake(tmp_path / "state")
    yield fake
    server.stop(0)


def specs(tmp_path: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = tmp_path / f"{name}.yaml"
        path.write_text(SPEC.format(name=name))
        paths.append(str(path))
    return paths


def main(capsys, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main([*args, "--state-dir", str(tmp_path / "state")])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_prints_one_json_document_for_one_file_and_for_several(
    fake, tmp_path, capsys
) -> None:
    code, out, _ = main(capsys, tmp_path, "submit", *specs(tmp_path, "one"), "--json")
    assert code == 0 and json.loads(out)["name"] == "one"  # one file: the job's record
    for wait in ((), ("--wait",)):
        paths = specs(tmp_path, "first", "second", "third")
        code, out, _ = main(capsys, tmp_path, "submit", *paths, "--json", *wait)
        assert code == 0, wait
        jobs = json.loads(out)["jobs"]
        assert [j["name"] for j in jobs] == ["first", "second", "third"], wait
        assert all(j["state"] == "succeeded" for j in jobs)


def test_a_chain_refused_part_way_prints_the_jobs_submitted_and_fails(
    fake, tmp_path, capsys
) -> None:
    fake.refuse.add("third")
    paths = specs(tmp_path, "first", "second", "third")
    code, out, err = main(capsys, tmp_path, "submit", *paths, "--json")
    record = json.loads(out)
    assert code != 0 and [j["name"] for j in record["jobs"]] == ["first", "second"]
    ids = [j["id"] for j in record["jobs"]]
    assert "'third' is refused" in err and all(i in err for i in ids), err
    code, out, err = main(capsys, tmp_path, "submit", *paths)
    assert code != 0 and out.count("submitted ") == 2 and "'third' is refused" in err


def test_a_submission_whose_answer_was_lost_is_retried_and_makes_one_job(
    fake, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(client, "SUBMIT_RETRY_DELAY_S", 0.01)
    fake.lose_answers = 1
    code, out, err = main(capsys, tmp_path, "submit", *specs(tmp_path, "once"), "--json")
    assert code == 0, err
    first, retry = fake.submits
    assert first.request_id and retry.request_id == first.request_id
    assert len(fake.jobs) == 1 and json.loads(out)["id"] in fake.jobs


def test_a_submission_unanswered_every_time_says_its_request_id_which_gets_its_job(
    fake, tmp_path, capsys, monkeypatch
) -> None:
    # Every try's answer lost: the job exists. Submitting again with a new key made a second.
    monkeypatch.setattr(client, "SUBMIT_RETRY_DELAY_S", 0.01)
    fake.lose_answers = client.SUBMIT_ATTEMPTS
    path = specs(tmp_path, "lost")
    code, out, err = main(capsys, tmp_path, "submit", *path, "--json")
    key = fake.submits[0].request_id
    assert code != 0 and f"request id {key}" in err and "--request-id" in err, err
    assert len(fake.jobs) == 1 and {s.request_id for s in fake.submits} == {key}
    code, out, err = main(capsys, tmp_path, "submit", *path, "--json", "--request-id", key)
    assert code == 0, err
    assert len(fake.jobs) == 1 and json.loads(out)["id"] in fake.jobs
    # A chain: the key said is the chain's, which gets each file's job again.
    fake.lose_answers = client.SUBMIT_ATTEMPTS
    paths = specs(tmp_path, "c1", "c2")
    code, out, err = main(capsys, tmp_path, "submit", *paths)
    chain_key = fake.submits[-1].request_id.rsplit("-", 1)[0]
    assert code != 0 and f"request id {chain_key} " in err, err
    assert len(fake.jobs) == 2  # c1's, its answer lost
    code, out, err = main(capsys, tmp_path, "submit", *paths, "--json", "--request-id", chain_key)
    assert code == 0, err
    assert len(fake.jobs) == 3 and [j["name"] for j in json.loads(out)["jobs"]] == ["c1", "c2"]


def test_a_deadline_names_the_rpc_its_limit_and_the_address(fake, tmp_path) -> None:
    fake.get_delay_s = 2.0
    with ControllerClient(tmp_path / "state", timeout_s=0.3) as c:
        with pytest.raises(ClientError) as caught:
            c.get("job-1")
    message = caught.value.message
    assert "GetJob" in message and "0.3 s" in message and c.address in message, message


def test_a_controller_whose_database_is_busy_is_not_called_unreachable(fake, tmp_path) -> None:
    fake.get_unavailable = "database is locked"
    with ControllerClient(tmp_path / "state") as c:
        with pytest.raises(ClientError) as caught:
            c.get("job-1")
    message = caught.value.message
    assert "could not write its job database now (database is locked)" in message, message
    assert "not reachable" not in message and caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_dashboard_open_keeps_the_token_off_the_browsers_command_line(
    fake, tmp_path, capsys, monkeypatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **kw: opened.append(url))
    code, out, _ = main(capsys, tmp_path, "dashboard", "--open")
    token = (tmp_path / "state" / "token").read_text().strip()
    assert code == 0 and token in out  # printed for the user, as before
    (url,) = opened
    assert token not in url and urlparse(url).scheme == "file"
    page = Path(urlparse(url).path)
    assert page.parent == (tmp_path / "state").resolve()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert f"?token={token}" in page.read_text()


def test_a_seed_outside_64_bits_is_refused_naming_it_before_anything_is_sent(
    fake, tmp_path, capsys
) -> None:
    """Seeds are uint64 end to end: a negative one was silently 0 for `sample` (int64 on the
    wire) and 2**63 and above could not be sent at all."""
    for command in ("sample", "generate"):
        with pytest.raises(SystemExit) as refused:
            main(capsys, tmp_path, command, "job-1", "hi", "--seed", "-1")
        assert refused.value.code == 2
        assert "argument --seed: -1 must be in [0, 2**64)" in capsys.readouterr().err
    with ControllerClient(tmp_path / "state") as c:
        for seed in (-1, 2**64):
            with pytest.raises(ValueError, match=f"seed={seed} must be in"):
                c.sample("job-1", "hi", seed=seed)
            with pytest.raises(ValueError, match=f"seed={seed} must be in"):
                next(c.generate("job-1", "hi", seed=seed))


def test_sizes_outside_int32_are_refused_naming_their_field(fake, tmp_path) -> None:
    # protobuf's own error said "Value out of range: 3000000000", naming no field.
    with ControllerClient(tmp_path / "state") as c:
        with pytest.raises(ValueError, match="max_new_tokens=3000000000 is out of range"):
            c.sample("job-1", "hi", max_new_tokens=3_000_000_000)
        with pytest.raises(ValueError, match="top_k=-2147483649 is out of range"):
            c.sample("job-1", "hi", top_k=-(2**31) - 1)
        with pytest.raises(ValueError, match="max_tokens=2147483648 is out of range"):
            next(c.generate("job-1", "hi", max_tokens=2**31))


def test_watch_and_followed_logs_go_on_with_the_controller_that_takes_over(
    tmp_path, monkeypatch
) -> None:
    """The controller a stream follows goes away (UNAVAILABLE) and another takes its place
    in the state dir (a standby's takeover): `watch` goes on from the next step and
    `logs --follow` from the next record, nothing given twice or skipped. A client given
    its address keeps to it and fails."""
    monkeypatch.setattr(client, "RECONNECT_POLL_S", 0.05)
    state = tmp_path / "state"
    first, first_server = serve_fake(state)
    servers = [first_server]
    try:
        c = ControllerClient(state)
        pinned = ControllerClient(state, address=c.address)
        first.watch_steps, first.gone_after_step = range(5), 2
        # Host lines come stamped with their step's end, written when their batch is: the
        # buffer is not in time order (line 2 is older than line 1).
        lines = [(1000, "line 0"), (3000, "line 1"), (2000, "line 2"), (4000, "line 3")]
        first.log_records, first.gone_after_log = lines[:3], 2
        with pytest.raises(ClientError) as pinned_failed:
            list(pinned.watch("job-1"))
        assert pinned_failed.value.code == grpc.StatusCode.UNAVAILABLE
        second, second_server = serve_fake(state)  # the takeover: the state dir names it
        servers.append(second_server)
        second.watch_steps = range(8)
        second.log_records = lines
        steps = [r.metrics.step for r in c.watch("job-1") if r.HasField("metrics")]
        assert steps == list(range(8))
        assert [r.from_step for r in second.watch_requests] == [3]
        assert c.address != pinned.address
        c.close()
        c = ControllerClient(state, address=pinned.address)  # back to the first
        c.follows_state_dir = True
        messages = [r.message for r in c.logs("job-1", follow=True)]
        assert messages == [f"line {i}" for i in range(4)]
        assert second.logs_requests[-1].tail == client.LOGS_RESUME_TAIL
        # A wait with a timeout keeps to it while no controller answers the stream.
        second.gone_after_step = -1
        started = time.monotonic()
        with pytest.raises(ClientError):
            c.wait("job-1", timeout_s=1.0)
        assert time.monotonic() - started < 5
        c.close()
        pinned.close()
    finally:
        for server in servers:
            server.stop(0)
