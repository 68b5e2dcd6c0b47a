"""The Kubernetes launcher of the VERL trainer against a fake API that answers like the official client (its own
model classes and ApiException), stepping through the states a real Job goes through: created, its pod pending,
running, then complete, failed (an OOM kill), past its deadline, deleted, or its pod deleted. The manifests
themselves are checked with kubernetes-validate in tests/test_deploy.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

kubernetes = pytest.importorskip("kubernetes", reason="the official kubernetes client (pip install -e '.[test]')")
from kubernetes.client import (  # noqa: E402
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1Job,
    V1JobCondition,
    V1JobSpec,
    V1JobStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodList,
    V1PodStatus,
    V1PodTemplateSpec,
)
from kubernetes.client.exceptions import ApiException  # noqa: E402

from trainer.verl.k8s_job import KubernetesLauncher, job_manifest, job_name  # noqa: E402
from trainer.verl.protocol import TrainInputs, load_gpu_protocol  # noqa: E402

pytestmark = pytest.mark.verl  # the VERL backend (docs/verl.md): runs in CI on this CPU

PAPER = load_gpu_protocol("paper")
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
IDS = ("r1", "n001", 0, 1)
NAME = job_name(*IDS)


def job(active: int = 0, condition: tuple[str, str, str] | None = None) -> V1Job:
    conditions = None
    if condition is not None:
        kind, reason, message = condition
        conditions = [V1JobCondition(type=kind, status="True", reason=reason, message=message)]
    return V1Job(metadata=V1ObjectMeta(name=NAME), spec=V1JobSpec(template=V1PodTemplateSpec(),
                                                                            active_deadline_seconds=43200),
                 status=V1JobStatus(active=active or None, conditions=conditions))


def pod(phase: str, running_s: float | None = None, ended: tuple[str, int, str] | None = None,
        deleting: bool = False, name: str = f"{NAME}-abcde") -> V1Pod:
    statuses = None
    if running_s is not None or ended is not None:
        if ended is not None:
            reason, code, message = ended
            state = V1ContainerState(terminated=V1ContainerStateTerminated(
                exit_code=code, reason=reason, message=message, finished_at=T0 + timedelta(seconds=running_s or 0)))
        else:
            state = V1ContainerState(running=V1ContainerStateRunning(started_at=T0))
        statuses = [V1ContainerStatus(name="train", image="poise-gpu", image_id="", ready=True, restart_count=0,
                                      state=state)]
    return V1Pod(metadata=V1ObjectMeta(name=name, deletion_timestamp=T0 if deleting else None),
                 status=V1PodStatus(phase=phase, start_time=T0 if phase != "Pending" else None,
                                    container_statuses=statuses))


class FakeApi:
    """BatchV1Api and CoreV1Api in one: each poll takes the next (job, pods) of the script; an exception in the
    script is raised by the read, as the client raises ApiException."""

    def __init__(self, script: list, on_poll=None, create_error: ApiException | None = None) -> None:
        self.script = list(script)
        self.on_poll = on_poll
        self.create_error = create_error
        self.created: list[dict] = []
        self.deleted: list[tuple[str, str]] = []
        self.polls = 0
        self.current: tuple = (None, [])

    def create_namespaced_job(self, namespace: str, body: dict) -> V1Job:
        self.created.append(json.loads(json.dumps(body)))  # a body the client can serialise
        if self.create_error is not None:
            raise self.create_error
        return job()

    def read_namespaced_job_status(self, name: str, namespace: str) -> V1Job:
        assert name == NAME and namespace == "poise"
        self.polls += 1
        if self.on_poll:
            self.on_poll(self.polls)
        entry = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(entry, Exception):
            raise entry
        self.current = entry
        return entry[0]

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> V1PodList:
        assert label_selector == f"job-name={NAME}"
        return V1PodList(items=self.current[1])

    def delete_namespaced_job(self, name: str, namespace: str, propagation_policy: str) -> None:
        self.deleted.append((name, propagation_policy))


def launcher(api: FakeApi, tmp_path: Path, now: datetime = T0 + timedelta(seconds=100)) -> KubernetesLauncher:
    return KubernetesLauncher(batch=api, core=api, namespace="poise", image="registry.example.com/poise-gpu:1",
                              work_dir=tmp_path, poll_s=0.0, sleep=lambda s: None, now=lambda: now)


def inputs(tmp_path: Path) -> TrainInputs:
    run_dir = tmp_path / "runs/r1/nodes/n001/train"
    return TrainInputs(model_path="Qwen/Qwen2.5-Math-1.5B", train_files=(str(tmp_path / "data/train.parquet"),),
                       val_files=(str(tmp_path / "data/val.parquet"),), candidate_module="poise_candidate",
                       candidate_dir=run_dir / "candidate", run_dir=run_dir, experiment_name="r1-n001")


def write_step(tmp_path: Path, step: int, **data) -> None:
    path = inputs(tmp_path).metrics_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, "data": {"critic/score/mean": 0.3, "actor/entropy": 0.5, **data}})
                     + "\n")


def test_a_job_that_completes_is_followed_step_by_step_and_books_its_gpu_seconds(tmp_path):
    script = [(job(active=1), [pod("Pending")]), (job(active=1), [pod("Running", running_s=0)]),
              (job(active=1), [pod("Running", running_s=0)]),
              (job(condition=("Complete", "", "")), [pod("Succeeded", 3600, ("Completed", 0, ""))])]
    api = FakeApi(script, on_poll=lambda n: write_step(tmp_path, n - 1) if n in (3, 4) else None)
    write_step(tmp_path, 7)  # an earlier attempt's metrics: set aside when a new Job starts
    seen = []
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), on_step=seen.append, ids=IDS)
    assert outcome.failure is None and outcome.aborted is None
    assert [s.step for s in outcome.steps] == [1, 2] and seen == outcome.steps
    assert outcome.gpu_seconds == 3600 * 8  # the pod's start to its container's end, x the protocol's GPUs
    (body,) = api.created
    assert body["metadata"]["name"] == NAME and api.deleted == []


def test_a_job_past_its_deadline_fails_the_node_saying_so(tmp_path):
    script = [(job(active=1), [pod("Running", running_s=0)]),
              (job(condition=("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")),
               [pod("Failed", 43200, ("Error", 137, ""))])]
    outcome = launcher(FakeApi(script), tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure.startswith("the training Job ran past its deadline (43200 s, the protocol's "
                                      "resources.deadline_s) and Kubernetes stopped it")


def test_an_oom_killed_pod_fails_the_node_with_the_containers_end(tmp_path):
    api = FakeApi([(job(active=1), [pod("Running", running_s=0)]),
                   (job(condition=("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")),
                    [pod("Failed", 600, ("OOMKilled", 137, "ray: worker died\nCUDA out of memory"))])])
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure == ("the training Job failed (BackoffLimitExceeded): OOMKilled with exit code 137; "
                               "CUDA out of memory")
    assert outcome.gpu_seconds == 600 * 8
    assert api.deleted == [(NAME, "Background")]


def test_a_deleted_pod_is_noticed(tmp_path):
    running = (job(active=1), [pod("Running", running_s=0)])
    api = FakeApi([running, running, (job(active=1), [])])
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure == f"the training Job's pod {NAME}-abcde was deleted while it ran"
    terminating = FakeApi([running, (job(active=1), [pod("Running", running_s=0, deleting=True)])])
    outcome = launcher(terminating, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert "is being deleted" in outcome.failure


def test_a_deleted_job_is_noticed(tmp_path):
    api = FakeApi([(job(active=1), [pod("Running", running_s=0)]), ApiException(status=404, reason="Not Found")])
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure == f"the training Job {NAME} was deleted before it finished"


def test_a_broken_curve_aborts_the_run_and_deletes_its_job(tmp_path):
    api = FakeApi([(job(active=1), [pod("Running", running_s=0)])],
                  on_poll=lambda n: write_step(tmp_path, n, **{"actor/grad_norm": None}) if n == 2 else None)
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.aborted == "grad_norm is nan at step 1: the run diverged" and outcome.failure is None
    assert api.deleted == [(NAME, "Background")]


def test_a_redelivered_message_follows_the_job_it_created_before(tmp_path):
    api = FakeApi([(job(condition=("Complete", "", "")), [])],
                  create_error=ApiException(status=409, reason="AlreadyExists"))
    write_step(tmp_path, 1)  # written by that Job before the trainer restarted: its own
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure is None and api.polls == 1 and [s.step for s in outcome.steps] == [0]


def test_a_job_the_service_account_may_not_create_fails_naming_the_role(tmp_path):
    api = FakeApi([], create_error=ApiException(status=403, reason="Forbidden"))
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure.startswith(f"Kubernetes refused the training Job {NAME} (HTTP 403): Forbidden")
    assert "k8s/components/verl-jobs" in outcome.failure


def test_the_api_going_away_for_a_while_is_waited_out(tmp_path):
    api = FakeApi([(job(active=1), [pod("Running", running_s=0)]), ApiException(status=500, reason="etcd"),
                   ApiException(status=503), (job(condition=("Complete", "", "")), [])])
    outcome = launcher(api, tmp_path).run(PAPER, inputs(tmp_path), ids=IDS)
    assert outcome.failure is None and api.polls == 4


def test_the_job_mounts_only_the_nodes_directory_writable_and_asks_for_the_protocols_gpus(tmp_path):
    body = job_manifest(PAPER, inputs(tmp_path), name=NAME, namespace="poise", image="poise-gpu",
                        work_dir=tmp_path, work_claim="poise-work", model_claim="poise-model-cache", run_id="r1",
                        node_id="n001")
    spec = body["spec"]
    pod_spec = spec["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert spec["activeDeadlineSeconds"] == 43200 and spec["backoffLimit"] == 0
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod_spec["automountServiceAccountToken"] is False
    writable = [m for m in container["volumeMounts"] if m["name"] == "work" and not m.get("readOnly")]
    assert writable == [{"name": "work", "mountPath": str(inputs(tmp_path).run_dir),
                         "subPath": "runs/r1/nodes/n001/train"}]
    assert container["command"] == ["python", "-m", "trainer.verl.main"]
    env = {v["name"]: v["value"] for v in container["env"]}
    assert env["VERL_USE_EXTERNAL_MODULES"] == "trainer.verl.plugin" and env["POISE_CANDIDATE_MODULE"]
    outside = inputs(tmp_path)
    outside = TrainInputs(**{**outside.__dict__, "train_files": ("/elsewhere/train.parquet",)})
    outcome = launcher(FakeApi([]), tmp_path).run(PAPER, outside, ids=IDS)
    assert "is not under" in outcome.failure and "POISE_VERL_TRAIN_FILES" in outcome.failure


def test_job_names_are_dns_labels_unique_per_attempt():
    names = {job_name("Run_With.Caps-and-a-very-long-name-indeed-0123456789", "n001", r, a)
             for r in (0, 1) for a in (1, 2)}
    assert len(names) == 4
    for name in names:
        assert len(name) <= 63 and name.replace("-", "").isalnum() and name == name.lower()
