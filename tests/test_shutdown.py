"""Graceful shutdown and the fault points that make it testable (poise/faults.py, docs/operations.md).

A fault point blocks or crashes a process at a named moment, only with POISE_TESTING=1 as well. On SIGTERM a
`poise serve` service stops fetching and gives its handler POISE_SHUTDOWN_GRACE_S: a handler that finishes is
acknowledged as usual; one that does not has its message handed back at once (a nak, not the ack wait) and its
sandboxed child killed, the service exits 0, and a restarted service does the work once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_distributed import (
    WORKERS,
    Cluster,
    assert_fully_documented,
    child_pid,
    process_gone,
    run_settings,
    wait_reached,
)
from test_loop import ROOT
from test_nats_bus import drain_until, jetstream, make_bus, nats_server, work_train  # noqa: F401 - fixtures

from poise.contracts import EvtFailed, Failure, NodeStatus, Phase
from poise.faults import CRASH_STATUS, FaultSpecError, parse_points, reached, release
from poise.nats_bus import EVENT_STREAM, BusClosed

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 5.0
HAND_BACK_S = 20.0   # what closing the bus, killing the child and stopping HTTP may add to the grace period
ACK_WAIT_S = 600.0   # long: a message that comes back sooner was handed back, not timed out


# ----------------------------------------------------------------------------------------- fault points


def python_at_point(fault_dir: Path, code: str, **env: str) -> subprocess.Popen:
    """A Python process that imports poise.faults with `env` and runs `code`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POISE_")}
    environment.update({"POISE_FAULT_DIR": str(fault_dir), **env})
    return subprocess.Popen([sys.executable, "-c", f"from poise.faults import fault_point\n{code}"], cwd=REPO,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_blocked_point_announces_its_process_and_waits_for_its_release(tmp_path: Path):
    code = "fault_point('trainer.train', 'child=7')\nfault_point('trainer.train')\nprint('went on')"
    process = python_at_point(tmp_path, code, POISE_TESTING="1", POISE_FAULT_POINTS="trainer.train=block")
    deadline = time.monotonic() + 30
    while not reached(tmp_path, "trainer.train"):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    time.sleep(0.3)
    assert process.poll() is None  # still blocked
    release(tmp_path, "trainer.train")
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and out == "went on\n"
    assert [(r.pid, r.detail) for r in reached(tmp_path, "trainer.train")] == [(process.pid, "child=7")]


def test_a_crash_point_announces_itself_and_ends_the_process_at_once(tmp_path: Path):
    process = python_at_point(tmp_path, "fault_point('archive.publish', 'evt.trained r/n000')\nprint('went on')",
                              POISE_TESTING="1", POISE_FAULT_POINTS="archive.publish=crash")
    out, _ = process.communicate(timeout=30)
    assert process.returncode == CRASH_STATUS and out == ""
    assert [r.detail for r in reached(tmp_path, "archive.publish")] == ["evt.trained r/n000"]


def test_a_raise_point_raises_in_the_handler_every_time(tmp_path: Path):
    code = ("for _ in range(2):\n    try:\n        fault_point('trainer.received')\n"
            "    except Exception as err:\n        print(type(err).__name__)")
    process = python_at_point(tmp_path, code, POISE_TESTING="1", POISE_FAULT_POINTS="trainer.received=raise")
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and out == "FaultInjected\nFaultInjected\n"
    assert len(reached(tmp_path, "trainer.received")) == 2


def test_fault_points_stay_off_without_the_testing_switch(tmp_path: Path):
    process = python_at_point(tmp_path, "fault_point('trainer.train')\nprint('went on')",
                              POISE_FAULT_POINTS="trainer.train=block")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and out == "went on\n"
    assert "POISE_TESTING=1 is not" in err and not reached(tmp_path, "trainer.train")


def test_an_unknown_point_or_action_is_refused_with_the_known_ones():
    assert parse_points(" implementer.verify=block, trainer.train=crash ,") == {
        "implementer.verify": "block", "trainer.train": "crash"}
    with pytest.raises(FaultSpecError, match=r"unknown point 'trainer.trian'.*unknown action 'hang'.*points: "
                                             r"proposer.received"):
        parse_points("trainer.trian=block,trainer.train=hang")


# -------------------------------------------------------------------------------------------- the bus


@pytest.mark.nats
def test_close_hands_back_at_once_a_message_whose_handler_outlived_the_grace_period(make_bus):  # noqa: F811
    holder = make_bus(ack_wait_s=60.0)
    started, go_on = threading.Event(), threading.Event()
    refused: list[BusClosed] = []

    def hold(message) -> None:
        started.set()
        go_on.wait(30)
        failure = Failure(phase=Phase.TRAIN, reason="killed")  # what a handler cut short would report
        try:
            holder.publish(EvtFailed(run_id=message.run_id, node_id=message.node_id, failure=failure))
        except BusClosed as err:
            refused.append(err)

    holder.subscribe("work.train", hold)
    holder.publish(work_train())
    thread = threading.Thread(target=holder.drain_once, args=(10.0,), daemon=True)
    thread.start()
    assert started.wait(10)
    holder.stop_fetching()
    holder.close()
    assert holder.handed_back == 1
    other = make_bus(ack_wait_s=60.0)
    received = []
    other.subscribe("work.train", received.append)
    drain_until(other, lambda: bool(received), timeout_s=15)  # not after the 60 s ack wait
    assert received == [work_train()] and other.redelivered == 1
    go_on.set()
    thread.join(10)
    assert len(refused) == 1  # the closed bus published nothing for it


@pytest.mark.nats
def test_a_bus_told_to_stop_fetching_takes_no_new_message(make_bus):  # noqa: F811
    stopping = make_bus()
    taken = []
    stopping.subscribe("work.train", taken.append)
    stopping.stop_fetching()
    time.sleep(3.0)  # the pull requests in flight expire (FETCH_S)
    stopping.publish(work_train())
    assert stopping.drain_once(1.0) == 0 and taken == []
    other = make_bus()
    received = []
    other.subscribe("work.train", received.append)
    drain_until(other, lambda: bool(received))
    assert other.redelivered == 0  # it was never fetched by the stopping bus


# ------------------------------------------------------------------------------------- the services


def events_per_subject(url: str) -> dict[str, int]:
    async def count(js):
        return dict((await js.stream_info(EVENT_STREAM, subjects_filter="evt.>")).state.subjects or {})

    return jetstream(url, count)


def handled(cluster: Cluster, service: str, phase: str) -> float:
    """How many messages of its phase `service` (this process) handled, whatever the outcome."""
    return cluster[service].metric("poise_phase_duration_seconds_count", phase=phase)


@pytest.mark.nats
@pytest.mark.slow
def test_sigterm_in_each_phase_finishes_or_hands_the_work_back_and_a_restart_does_it_once(tmp_path: Path):
    faults = tmp_path / "cluster" / "faults"  # where wait_reached looks
    # service: where SIGTERM finds it (blocked on the root's job), its phase, the root's status meanwhile
    points = {"implementer": ("implementer.verify", "implement", NodeStatus.PROPOSED),
              "trainer": ("trainer.train", "train", NodeStatus.IMPLEMENTED),
              "evaluator": ("evaluator.publish", "evaluate", NodeStatus.TRAINED),
              "reflector": ("reflector.publish", "reflect", NodeStatus.EVALUATED)}
    cluster = Cluster(tmp_path / "cluster", POISE_ACK_WAIT_S=str(ACK_WAIT_S), POISE_SHUTDOWN_GRACE_S=str(GRACE_S),
                      POISE_TESTING="1", POISE_FAULT_DIR=str(faults),
                      POISE_FAULT_POINTS=",".join(f"{point}=block" for point, _, _ in points.values()))
    finishing = "reflector"  # released within the grace period: it publishes and acks; the others are handed back
    run_id = "sigterm"
    try:
        cluster.start(("archive", *WORKERS))
        cluster.post_run(run_settings(run_id, budget=1, seed=4))
        for service, (point, phase, status) in points.items():
            reach = wait_reached(cluster, service, point)
            assert {n.node_id: n.status for n in cluster.nodes(run_id)}[ROOT] == status
            process = cluster[service].process
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            finishes = service == finishing
            if finishes:
                release(faults, point)
            assert process.wait(GRACE_S + HAND_BACK_S) == 0
            took = time.monotonic() - sent
            handed_back = "its message is handed back to JetStream" in cluster[service].log_text()
            if finishes:
                assert not handed_back
            else:
                assert GRACE_S <= took < GRACE_S + HAND_BACK_S and handed_back, took
                if reach.detail.startswith("child="):
                    assert process_gone(child_pid(reach), timeout_s=5), f"{service}'s sandboxed child outlived it"
                release(faults, point)
            cluster.restart(service)
            if not finishes:  # handed back: the restarted service has it at once, not after the ack wait
                deadline = sent + ACK_WAIT_S / 2
                while cluster[service].metric("poise_bus_redeliveries_total", subject=f"work.{phase}") < 1:
                    assert time.monotonic() < deadline, f"work.{phase} not redelivered:\n{cluster.diagnose()}"
                    time.sleep(0.5)
        cluster.wait_finished(run_id)
        nodes = cluster.nodes(run_id)
        assert_fully_documented(nodes, budget=1)
        root = next(n for n in nodes if n.node_id == ROOT)
        assert len(root.implementation.attempts) == 1  # the interrupted verification left no trace
        # The restarted services published every event of the run (but the root's reflection, which the
        # reflector finished before it stopped), doing each piece of work once.
        events = events_per_subject(cluster.nats.admin_url)
        for service, (_, phase, _) in points.items():
            subject = {"implement": "evt.implemented", "train": "evt.trained", "evaluate": "evt.evaluated",
                       "reflect": "evt.reflected"}[phase]
            assert handled(cluster, service, phase) == events[subject] - (service == finishing), (service, events)
        assert cluster[finishing].metric("poise_bus_redeliveries_total", subject="work.reflect") == 0
    finally:
        cluster.stop()
