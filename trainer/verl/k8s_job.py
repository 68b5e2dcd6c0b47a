"""One Kubernetes Job per candidate: the VERL run as a pod of its own, created and watched by the trainer service
(docs/verl.md, "On Kubernetes"; POISE_VERL_LAUNCHER=kubernetes).

The Job's pod is the boundary around the candidate: the protocol's GPUs, no service-account token, no network at
all (label poise.io/network=isolated, which k8s/overlays/cluster/networkpolicies-gpu.yaml leaves without any
allow rule under the base's default deny), a restricted security context, the model cache and the training
data read-only, and of the shared work volume only the node's own training directory writable, mounted at the
path the trainer service sees, so the rendered overrides are the same as for a local process. The deadline is
Kubernetes' (activeDeadlineSeconds from the protocol) and Kubernetes does not retry (backoffLimit 0): retries
are the bus's.

`KubernetesLauncher` polls the Job and its pod through the official `kubernetes` client (any object with the
same methods will do: tests pass a fake): a Job that completes is read back (metrics, checkpoint); one that
fails, runs past its deadline, or whose pod is deleted fails the node with the reason Kubernetes gives. A
redelivered message finds its Job by name and follows it instead of starting a second run.
`rbac_manifests` is what the trainer's service account may do: Jobs in its namespace, and read their pods.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from poise.contracts import TrainingStep
from poise.early_abort import AbortWatch
from trainer.verl.launch import RunOutcome, StepFollower
from trainer.verl.protocol import GpuProtocol, TrainInputs, launch_command, run_env

log = logging.getLogger("trainer.verl.k8s")

SERVICE_ACCOUNT = "poise-trainer"
ISOLATED_LABELS = {"app.kubernetes.io/name": "verl-train", "app.kubernetes.io/part-of": "poise",
                   "poise.io/runs-candidate-code": "true", "poise.io/network": "isolated"}
MODEL_MOUNT = "/models"
POLL_S = 10.0
API_PATIENCE = 30       # consecutive failed API reads before the node fails (5 minutes at POLL_S)
TTL_AFTER_FINISHED_S = 86400


class JobError(RuntimeError):
    """The Job could not be created or followed; the message says what to change."""


def job_name(run_id: str, node_id: str, replicate: int, attempt: int) -> str:
    """A DNS-1123 name, unique per run, node, replicate and attempt (the same again for a redelivered message)."""
    key = f"{run_id}/{node_id}/r{replicate}/a{attempt}"
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{run_id}-{node_id}".lower()).strip("-")[:40].strip("-")
    return f"train-{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _label_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63].strip("-_.") or "x"


def job_manifest(protocol: GpuProtocol, inputs: TrainInputs, *, name: str, namespace: str, image: str,
                 work_dir: Path, work_claim: str, model_claim: str | None, run_id: str, node_id: str) -> dict:
    """The batch/v1 Job that runs `protocol` for one candidate (a plain dict: the client takes it as the body)."""
    resources = protocol.resources
    node_dir = inputs.run_dir.relative_to(work_dir)  # ValueError: the run directory must be on the work volume
    data_dir = work_dir / "data"
    for path in (*inputs.train_files, *inputs.val_files):
        if not Path(path).is_relative_to(data_dir):
            raise JobError(f"{path} is not under {data_dir}: a training Job mounts only POISE_WORK_DIR/data of the "
                           "work volume (read-only); put the parquet files there (POISE_VERL_TRAIN_FILES)")
    command = launch_command(protocol, inputs, python="python")
    env = {**run_env(inputs), "HOME": "/tmp", "HF_HUB_OFFLINE": "1", "HF_HOME": f"{MODEL_MOUNT}/huggingface",
           "PYTHONUNBUFFERED": "1"}
    gpus = str(resources.gpus)
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        # this node's training directory only: the candidate module, and where the checkpoint and metrics go
        {"name": "work", "mountPath": str(inputs.run_dir), "subPath": str(node_dir)},
        {"name": "work", "mountPath": str(data_dir), "subPath": "data", "readOnly": True},
    ]
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "200Gi"}},
        {"name": "work", "persistentVolumeClaim": {"claimName": work_claim}},
    ]
    if model_claim:
        mounts.append({"name": "model-cache", "mountPath": MODEL_MOUNT, "readOnly": True})
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": model_claim, "readOnly": True}})
    labels = {**ISOLATED_LABELS, "poise.io/run": _label_value(run_id), "poise.io/node": _label_value(node_id)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {"poise.io/run-id": run_id, "poise.io/node-id": node_id,
                                     "poise.io/protocol": f"{protocol.name} {protocol.sha256()[:12]}"}},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": int(resources.deadline_s),
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "train",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": command[:3],
                        "args": command[3:],
                        "workingDir": str(inputs.run_dir),
                        "env": [{"name": key, "value": value} for key, value in env.items()],
                        "resources": {
                            "requests": {"cpu": resources.cpu, "memory": resources.memory, "nvidia.com/gpu": gpus},
                            "limits": {"memory": resources.memory, "nvidia.com/gpu": gpus},
                        },
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    }


def rbac_manifests(namespace: str, service_account: str = SERVICE_ACCOUNT) -> list[dict]:
    """The trainer's ServiceAccount, a Role limited to Jobs (and reading their pods) in `namespace`, the binding."""
    meta = {"namespace": namespace, "labels": {"app.kubernetes.io/part-of": "poise"}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, **meta},
         "automountServiceAccountToken": False},  # mounted by the trainer's pod spec alone, not by every pod
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "verl-jobs", **meta},
         "rules": [
             {"apiGroups": ["batch"], "resources": ["jobs"],
              "verbs": ["create", "get", "list", "watch", "delete"]},
             {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "verl-jobs", **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "verl-jobs"},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
    ]


# ---------------------------------------------------------------------------------------------- watching


def _status_of(err: Exception) -> int | None:
    """The HTTP status of a client error (kubernetes.client.ApiException has `.status`); None for anything else."""
    status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _condition(job: Any, kind: str) -> Any:
    for condition in _get(job, "status", "conditions") or []:
        if _get(condition, "type") == kind and _get(condition, "status") == "True":
            return condition
    return None


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


@dataclass
class JobState:
    """What one poll of the Job and its pod says: done (success), a failure reason, or still running."""

    done: bool = False
    failure: str | None = None


def job_state(job: Any, pods: list[Any], seen_pods: set[str]) -> JobState:
    """The Job's state from its status and its pods; `seen_pods` (updated) notices a pod that disappeared."""
    if _condition(job, "Complete") is not None or _condition(job, "SuccessCriteriaMet") is not None:
        return JobState(done=True)
    failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
    if failed is not None:
        reason, message = _get(failed, "reason") or "Failed", _get(failed, "message") or ""
        if reason == "DeadlineExceeded":
            deadline = _get(job, "spec", "active_deadline_seconds") or _get(job, "spec", "activeDeadlineSeconds")
            return JobState(failure=f"the training Job ran past its deadline ({deadline} s, the protocol's "
                                    f"resources.deadline_s) and Kubernetes stopped it: {message}".rstrip(": "))
        return JobState(failure=f"the training Job failed ({reason}): {pod_failure(pods) or message}".rstrip(": "))
    names = {_get(pod, "metadata", "name") for pod in pods}
    for pod in pods:
        name = _get(pod, "metadata", "name")
        if _get(pod, "metadata", "deletion_timestamp") or _get(pod, "metadata", "deletionTimestamp"):
            return JobState(failure=f"the training Job's pod {name} is being deleted (by someone or by the node's "
                                    "eviction); the run cannot finish")
        if _get(pod, "status", "phase") == "Failed":
            return JobState(failure=f"the training Job's pod {name} failed: {pod_failure([pod])}")
    gone = seen_pods - names
    if gone:
        return JobState(failure=f"the training Job's pod {', '.join(sorted(gone))} was deleted while it ran")
    seen_pods.update(n for n in names if n)
    return JobState()


def pod_failure(pods: list[Any]) -> str:
    """How the pods' training container ended (OOMKilled, exit code, the end of its log), in one line."""
    for pod in pods:
        for status in _get(pod, "status", "container_statuses") or _get(pod, "status", "containerStatuses") or []:
            ended = _get(status, "state", "terminated")
            if ended is not None:
                code = _get(ended, "exit_code") if _get(ended, "exit_code") is not None else _get(ended, "exitCode")
                words = [f"{_get(ended, 'reason') or 'terminated'} with exit code {code}"]
                message = (_get(ended, "message") or "").strip().splitlines()
                if message:
                    words.append(message[-1][:300])
                return "; ".join(words)
        reason = _get(pod, "status", "reason")
        if reason:
            return f"{reason}: {_get(pod, 'status', 'message') or ''}".rstrip(": ")
    return ""


def pod_gpu_seconds(pods: list[Any], gpus: int, now: datetime) -> float:
    """GPUs x seconds the pods held them: from the pod's start to its container's end (or now)."""
    total = 0.0
    for pod in pods:
        started = _as_datetime(_get(pod, "status", "start_time") or _get(pod, "status", "startTime"))
        if started is None:
            continue
        ended = None
        for status in _get(pod, "status", "container_statuses") or _get(pod, "status", "containerStatuses") or []:
            ended = _as_datetime(_get(status, "state", "terminated", "finished_at")
                                 or _get(status, "state", "terminated", "finishedAt")) or ended
        total += max(0.0, ((ended or now) - started).total_seconds()) * gpus
    return total


@dataclass
class KubernetesLauncher:
    """Creates the Job of a run and follows it until it ends (see the module's docstring)."""

    batch: Any                    # kubernetes.client.BatchV1Api (or a stand-in with the same methods)
    core: Any                     # kubernetes.client.CoreV1Api
    namespace: str
    image: str | None
    work_dir: Path
    work_claim: str = "poise-work"
    model_claim: str | None = "poise-model-cache"
    poll_s: float = POLL_S
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = lambda: datetime.now(UTC)

    name = "kubernetes"

    def preflight(self, protocol: GpuProtocol) -> str | None:
        if not self.image:
            return "POISE_VERL_IMAGE is unset: the training Jobs need the GPU image (poise-gpu) to run VERL in"
        return None

    def run(self, protocol: GpuProtocol, inputs: TrainInputs, on_step: Callable[[TrainingStep], None] | None = None,
            ids: tuple[str, str, int, int] | None = None) -> RunOutcome:
        run_id, node_id, replicate, attempt = ids or (inputs.experiment_name, inputs.experiment_name, 0, 1)
        name = job_name(run_id, node_id, replicate, attempt)
        started = self.clock()
        try:
            body = job_manifest(protocol, inputs, name=name, namespace=self.namespace, image=self.image or "",
                                work_dir=self.work_dir, work_claim=self.work_claim, model_claim=self.model_claim,
                                run_id=run_id, node_id=node_id)
        except (JobError, ValueError) as err:
            return RunOutcome(failure=f"no training Job for {node_id}: {err}")
        inputs.run_dir.mkdir(parents=True, exist_ok=True)
        stale = inputs.metrics_path.with_suffix(".jsonl.stale")
        if inputs.metrics_path.exists():  # set aside: an earlier attempt's, unless the Job below is that attempt's
            inputs.metrics_path.replace(stale)
        try:
            self.batch.create_namespaced_job(namespace=self.namespace, body=body)
            stale.unlink(missing_ok=True)
            log.info("created Job %s/%s for %s/%s", self.namespace, name, run_id, node_id)
        except Exception as err:  # noqa: BLE001 - the client's ApiException, judged by its HTTP status
            status = _status_of(err)
            if status == 409:
                log.info("Job %s/%s exists (a redelivered message): following it", self.namespace, name)
                if stale.exists():
                    stale.replace(inputs.metrics_path)
            elif status is None:
                raise
            else:
                return RunOutcome(failure=f"Kubernetes refused the training Job {name} (HTTP {status}): "
                                          f"{getattr(err, 'reason', '')}; {_rbac_hint(status)}")
        follower = StepFollower(inputs.metrics_path, AbortWatch(protocol.abort_rules()), on_step)
        outcome = self._follow(name, protocol, follower)
        outcome.steps = follower.steps
        outcome.wall_s = self.clock() - started
        return outcome

    def _follow(self, name: str, protocol: GpuProtocol, follower: StepFollower) -> RunOutcome:
        seen_pods: set[str] = set()
        pods: list[Any] = []
        api_failures = 0
        while True:
            try:
                job = self.batch.read_namespaced_job_status(name=name, namespace=self.namespace)
                pods = list(self.core.list_namespaced_pod(namespace=self.namespace,
                                                          label_selector=f"job-name={name}").items)
                api_failures = 0
            except Exception as err:  # noqa: BLE001 - the API or the network: judged by the HTTP status, if any
                if _status_of(err) == 404:
                    return self._ended(RunOutcome(failure=f"the training Job {name} was deleted before it finished"),
                                       protocol, pods)
                api_failures += 1  # anything else may pass (a restarting API server, a network blip)
                if api_failures >= API_PATIENCE:
                    return self._ended(RunOutcome(failure=f"lost the Kubernetes API while following Job {name}: "
                                                          f"{err}"), protocol, pods, delete=name)
                self.sleep(self.poll_s)
                continue
            abort = follower.poll()
            if abort is not None:
                return self._ended(RunOutcome(aborted=abort), protocol, pods, delete=name)
            state = job_state(job, pods, seen_pods)
            if state.done:
                follower.poll()  # the last lines VERL wrote before it exited
                return self._ended(RunOutcome(), protocol, pods)
            if state.failure is not None:
                return self._ended(RunOutcome(failure=state.failure), protocol, pods, delete=name)
            self.sleep(self.poll_s)

    def _ended(self, outcome: RunOutcome, protocol: GpuProtocol, pods: list[Any],
               delete: str | None = None) -> RunOutcome:
        outcome.gpu_seconds = pod_gpu_seconds(pods, protocol.resources.gpus, self.now())
        if delete is not None:
            try:  # Background: the pod goes too; the GPUs are free for the next candidate
                self.batch.delete_namespaced_job(name=delete, namespace=self.namespace,
                                                 propagation_policy="Background")
            except Exception as err:  # noqa: BLE001 - already gone, or the API is away: the TTL cleans up
                log.warning("could not delete Job %s/%s: %s", self.namespace, delete, err)
        return outcome


def _rbac_hint(status: int) -> str:
    if status in (401, 403):
        return ("the trainer's service account may not create Jobs here: apply k8s/components/verl-jobs (its Role) "
                "and set POISE_VERL_NAMESPACE to that namespace")
    return "check the Job manifest (trainer/verl/k8s_job.py) against this cluster's API"


def in_cluster_launcher(namespace: str | None, image: str | None, work_dir: Path, work_claim: str,
                        model_claim: str | None) -> KubernetesLauncher:
    """The launcher on the official client, configured from the pod's service account."""
    try:
        from kubernetes import client, config
    except ImportError as err:
        raise JobError("the kubernetes client is not installed (pip install '.[gpu]', or the poise-gpu image); it "
                       "is needed for POISE_VERL_LAUNCHER=kubernetes") from err
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise JobError(f"no Kubernetes credentials: not in a pod with a service-account token, and no "
                           f"kubeconfig ({err})") from err
    if namespace is None:
        path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        namespace = path.read_text().strip() if path.is_file() else "poise"
    core = client.CoreV1Api()
    image = image or own_image(core, namespace)
    return KubernetesLauncher(batch=client.BatchV1Api(), core=core, namespace=namespace, image=image,
                              work_dir=work_dir, work_claim=work_claim, model_claim=model_claim)


def own_image(core: Any, namespace: str, pod_name: str | None = None) -> str | None:
    """The image of the trainer's own container (the GPU image, which has VERL): the Jobs run the same one. None
    when it cannot be read (then POISE_VERL_IMAGE must say it; preflight fails each node saying so)."""
    pod_name = pod_name or os.environ.get("HOSTNAME", "")
    try:
        pod = core.read_namespaced_pod(name=pod_name, namespace=namespace)
    except Exception as err:  # noqa: BLE001 - no such pod (not in a pod), or no right to read it
        log.warning("cannot read this pod's image (%s); set POISE_VERL_IMAGE to the GPU image", err)
        return None
    containers = _get(pod, "spec", "containers") or []
    named = [c for c in containers if _get(c, "name") == "trainer"] or containers
    return _get(named[0], "image") if named else None
