"""Offline checks of the deployment files: docker-compose.yml, the Dockerfiles and .dockerignore,
prometheus/prometheus.yml, grafana/, and the kustomize tree under k8s/; and of the one opt-in that loosens
the security posture, an implementer that calls the agent LLM (docker-compose.llm-implementer.yml,
k8s/components/llm-implementer): checked both merged/rendered and left out.

Nothing here needs a Docker engine or a cluster. The tools: check-jsonschema with its vendored compose-spec
schema, `kubectl kustomize` (renders offline) and kubernetes-validate (bundled OpenAPI schemas, strict mode);
`kubectl apply --dry-run=client` is not used because it needs a cluster. A test whose tool is missing is
skipped and says which tool; on the development machine all of them are installed (.venv, kubectl on PATH).
Everything else (cross-references, security posture, scrape targets, dashboard queries) is checked here in
Python. The evaluator and trainer of every compose profile and k8s overlay are also built from their settings
by the builders `poise serve` uses (app/serve.py), which start nothing.

Credentials: compose and k8s mount the files `poise secrets` writes (poise/credentials.py), each service exactly
its own (`files_of`), nats the users' configuration; the tests render k8s with freshly generated files and
give the settings checks those files in place of /run/secrets.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from base64 import b64decode
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

from app.serve import CANDIDATE_RUNNERS, evaluator_runtime, trainer_runtime
from poise.bus import InProcBus
from poise.credentials import ARCHIVE_READ_TOKEN, NATS_SERVER_CONF, files_of, write_secrets
from poise.sandbox import SECCOMP_PROFILE_PATH, container_seccomp_profile
from poise.settings import SERVICES, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "poise-loop.json"
K8S_DIR = ROOT / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.32"  # the cluster's minor version; kubernetes-validate bundles the schemas of each release

PROFILES = ("cpu", "gpu")
# (trainer, evaluator) backend of each compose profile and k8s overlay
BACKENDS = {"cpu": ("testbed", "testbed"), "gpu": ("verl", "vllm"),
            "workstation": ("testbed", "testbed"), "cluster": ("verl", "vllm")}
# The metric names of poise/metrics.py the dashboard may query (a contract with that module).
METRICS = {
    "poise_phase_duration_seconds": "histogram",
    "poise_phase_outcomes_total": "counter",
    "poise_candidates_in_flight": "gauge",
    "poise_bus_redeliveries_total": "counter",
    "poise_dead_letters_total": "counter",
    "poise_llm_tokens_total": "counter",
    "poise_llm_cost_usd_total": "counter",
    "poise_trainer_tokens_per_second": "gauge",
    "poise_evaluated_candidates_total": "counter",
    "poise_best_utility": "gauge",
}
CANDIDATE_LABEL = "poise.io/runs-candidate-code"  # pods that run LLM-written code
SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD)$")
LLM_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")
LLM_AGENTS = {"proposer", "reflector"}  # the only services given the agent LLM's API keys by default
# The opt-in that gives the implementer the keys and a route to the LLM API (its LLM coder), for compose and k8s.
LLM_IMPLEMENTER = "llm-implementer"
COMPOSE_LLM_IMPLEMENTER = ROOT / "docker-compose.llm-implementer.yml"
# compose reads these next to docker-compose.yml without being asked: the opt-in must not be one of them
COMPOSE_AUTO_OVERRIDES = ("docker-compose.override.yml", "docker-compose.override.yaml", "compose.override.yml",
                          "compose.override.yaml")


def llm_pods(opt_ins: tuple[str, ...] = ()) -> set[str]:
    """The POISE services that may hold the agent LLM's API keys, with the given opt-ins."""
    return LLM_AGENTS | ({"implementer"} if LLM_IMPLEMENTER in opt_ins else set())


# ------------------------------------------------------------------------------------------------ tools


def tool(name: str) -> str:
    """The path of a command-line tool (the project's .venv first), or skip the test that needs it."""
    for folder in (ROOT / ".venv" / "bin", Path(sys.executable).parent):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' for the Python tools; kubectl from the "
                    "Kubernetes release)")
    return found


def run_tool(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- compose

INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's variable substitution with an empty environment: each ${VAR:-default} becomes its default."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return match.group("default") or "" if match.group("op") in (":-", "-") else ""

    return INTERPOLATION.sub(substitute, value)


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice, where PyYAML silently keeps the last one (compose
    refuses such a file; an overlooked duplicate would override the line a reader sees first)."""


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` is how keys are meant to be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError("in a mapping", node.start_mark, f"duplicate key {key!r}",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the << merge keys as compose does


def services() -> dict[str, dict]:
    return compose()["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def poise_role(service: dict) -> str | None:
    """The POISE service a compose service runs (`poise serve <role>`), or None for infrastructure."""
    command = service.get("command")
    if isinstance(command, list) and len(command) == 2 and command[0] == "serve":
        return command[1]
    return None


def active(profile: str) -> dict[str, dict]:
    """The services `docker compose --profile <profile> up` starts."""
    return {name: svc for name, svc in services().items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def network_names(service: dict) -> dict[str, dict]:
    networks = service.get("networks") or {}
    if isinstance(networks, list):
        return {name: {} for name in networks}
    return {name: config or {} for name, config in networks.items()}


def hostnames() -> dict[str, set[str]]:
    """Each name a container can be reached by (service name or network alias) -> the services behind it."""
    names: dict[str, set[str]] = {}
    for name, svc in services().items():
        names.setdefault(name, set()).add(name)
        for config in network_names(svc).values():
            for alias in config.get("aliases", []):
                names.setdefault(alias, set()).add(name)
    return names


SECRETS_MOUNT = "/run/secrets"  # where compose and k8s mount a service's secret files


@cache
def generated_secrets() -> Path:
    """What `poise secrets` writes, once per test session, in a scratch directory."""
    directory = Path(tempfile.mkdtemp(prefix="poise-deploy-")) / "secrets"
    write_secrets(directory)
    return directory


def settings_under(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str):
    """What poise/settings.py makes of exactly `env` (every other POISE_* variable removed), a secret file under
    /run/secrets read from the files `poise secrets` writes; a clear failure naming the workload when it refuses
    it."""
    for variable in [v for v in os.environ if v.startswith("POISE_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        if variable.endswith("_FILE") and value.startswith(f"{SECRETS_MOUNT}/"):
            local = generated_secrets() / value.removeprefix(f"{SECRETS_MOUNT}/")
            assert local.is_file(), f"{name}: {variable}={value} is not a file `poise secrets` writes"
            value = str(local)
        monkeypatch.setenv(variable, value)
    try:
        return load_settings()
    except SettingsError as err:
        pytest.fail(f"{name}: poise/settings.py refuses its environment: {err}")

DEPLOY_YAML = [COMPOSE_FILE, ROOT / "docker-compose.llm-implementer.yml", *sorted(K8S_DIR.rglob("*.yaml"))]


@pytest.mark.parametrize("path", DEPLOY_YAML, ids=lambda path: str(path.relative_to(ROOT)))
def test_deploy_yaml_has_no_duplicate_keys(path):
    try:
        list(yaml.load_all(path.read_text(), Loader=UniqueKeyLoader))
    except yaml.constructor.ConstructorError as err:
        pytest.fail(f"{path.relative_to(ROOT)}: {err}")


def test_unique_key_loader_rejects_a_duplicate_but_not_a_merge():
    merged = "x: &x {a: 1}\ny:\n  <<: *x\n  a: 2\n"
    assert yaml.load(merged, Loader=UniqueKeyLoader)["y"] == {"a": 2}
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("y:\n  a: 1\n  b: 2\n  a: 3\n", Loader=UniqueKeyLoader)


def test_compose_file_matches_the_compose_spec():
    checker = tool("check-jsonschema")
    result = run_tool(checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_check_rejects_a_broken_file(tmp_path):
    # the validator must really run offline and catch errors, or the test above proves nothing
    checker = tool("check-jsonschema")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: service_happy", 1))
    result = run_tool(checker, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0 and "service_happy" in result.stdout + result.stderr


def test_compose_references_are_declared():
    declared = {kind: set(compose().get(kind) or {}) for kind in ("volumes", "networks", "secrets", "configs")}
    problems = []
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            kind = "tmpfs" if isinstance(volume, dict) and volume.get("type") == "tmpfs" else None
            if kind or source is None:
                continue
            if source.startswith((".", "/")):  # a bind mount: the path must exist in the repository
                if not (ROOT / source).exists():
                    problems.append(f"{name}: bind-mounted path {source} does not exist")
            elif source not in declared["volumes"]:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
        for network in network_names(svc):
            if network not in declared["networks"]:
                problems.append(f"{name}: network {network} is not declared under networks:")
        for kind in ("secrets", "configs"):
            for item in svc.get(kind, []):
                ref = item if isinstance(item, str) else item["source"]
                if ref not in declared[kind]:
                    problems.append(f"{name}: {kind[:-1]} {ref} is not declared under {kind}:")
        for dependency in svc.get("depends_on") or {}:
            if dependency not in services():
                problems.append(f"{name}: depends on {dependency}, which is not a service")
    assert not problems, "\n".join(problems)


def test_compose_dependencies_start_in_every_profile_that_needs_them():
    # compose refuses to start a service whose dependency is disabled by the chosen profile
    for profile in PROFILES:
        running = active(profile)
        for name, svc in running.items():
            for dependency in svc.get("depends_on") or {}:
                assert dependency in running, f"--profile {profile}: {name} depends on {dependency}, not started"


def test_compose_waits_for_health_not_just_start():
    for name, svc in services().items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (the long form)"
        for dependency, spec in depends.items():
            target = services()[dependency]
            expected = ("service_completed_successfully" if target.get("restart") == "no" else
                        "service_healthy" if "healthcheck" in target else "service_started")
            assert spec.get("condition") == expected, f"{name} -> {dependency}: condition should be {expected}"


def test_compose_profiles_are_cpu_or_gpu_and_each_runs_all_six_services():
    for name, svc in services().items():
        for profile in svc.get("profiles", []):
            assert profile in PROFILES, f"{name}: profile {profile!r} is not one of {PROFILES}"
    for profile in PROFILES:
        roles = sorted(role for svc in active(profile).values() if (role := poise_role(svc)))
        assert roles == sorted(SERVICES), f"--profile {profile} runs {roles}, expected each of {SERVICES} once"


def test_compose_poise_services_have_healthchecks_and_their_settings(monkeypatch):
    for name, svc in services().items():
        role = poise_role(svc)
        if role is None:
            continue
        env = {key: interpolate(value) for key, value in environment(svc).items()}
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        assert f"127.0.0.1:{env['POISE_HTTP_PORT']}/healthz" in test, f"{name}: no healthcheck on /healthz"
        assert f"{env['POISE_HTTP_PORT']}" in svc.get("expose", []), f"{name}: HTTP port not exposed"
        for variable in ("POISE_NATS_URL", "POISE_WORK_DIR", "POISE_HTTP_PORT"):
            assert env.get(variable), f"{name}: {variable} is not set"
        if role == "archive":
            assert "replicaSet=rs0" in env.get("POISE_MONGO_URL", ""), f"{name}: needs POISE_MONGO_URL (rs0)"
        else:
            assert "POISE_MONGO_URL" not in env, f"{name}: only the archive talks to MongoDB"
        if role in ("proposer", "implementer", "reflector"):
            assert env.get("POISE_ARCHIVE_URL") == "http://archive:8000", f"{name}: needs POISE_ARCHIVE_URL"
        for profile in svc.get("profiles", []):
            trainer, evaluator = BACKENDS[profile]
            if role == "trainer":
                assert env.get("POISE_TRAINER_BACKEND") == trainer, f"{name}: the {profile} trainer is {trainer}"
            if role == "evaluator":
                assert env.get("POISE_EVALUATOR_BACKEND") == evaluator, f"{name}: the {profile} evaluator"
        # what the service itself will make of it (poise/settings.py): an empty variable counts as unset
        settings = settings_under(env, monkeypatch, name)
        assert settings.http_port == int(env["POISE_HTTP_PORT"])


def test_compose_services_without_healthcheck_are_known():
    # the nats exporter image is FROM scratch (nothing to run a check with); one-shot jobs exit instead
    for name, svc in services().items():
        if name == "nats-exporter" or svc.get("restart") == "no":
            continue
        assert "healthcheck" in svc, f"{name}: no healthcheck"


def test_compose_build_contexts_and_dockerfiles_exist():
    built = {name: svc["build"] for name, svc in services().items() if "build" in svc}
    assert built, "no service is built from this repository"
    for name, build in built.items():
        context = ROOT / build.get("context", ".")
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: Dockerfile missing"
    for role in ("trainer", "evaluator"):  # the evaluator runs vLLM in its own container: the GPU image
        dockerfiles = {svc["build"].get("dockerfile") for svc in active("gpu").values()
                       if "build" in svc and poise_role(svc) == role}
        assert dockerfiles == {"Dockerfile.gpu"}, f"the gpu profile's {role} must be built from Dockerfile.gpu"


def test_compose_gpu_services_reserve_gpus_and_shared_memory():
    gpu_ids = {}
    for name, svc in active("gpu").items():
        if poise_role(svc) not in ("trainer", "evaluator"):
            continue
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert all("gpu" in device["capabilities"] for device in devices), f"{name}: GPU capabilities"
        gpu_ids[name] = {interpolate(i) for device in devices for i in device.get("device_ids", [])}
        assert gpu_ids[name], f"{name}: reserve GPUs by id (POISE_*_GPU), not every GPU of the host"
        assert svc.get("shm_size") or svc.get("ipc") == "host", f"{name}: needs a large /dev/shm"
        mounts = {v.split(":")[0]: v for v in svc["volumes"] if isinstance(v, str)}
        assert "poise-work" in mounts, f"{name}: the checkpoint volume"
        assert mounts.get("model-cache", "").endswith(":ro"), f"{name}: the model cache, read-only"
        assert environment(svc).get("HF_HUB_OFFLINE") == "1", f"{name}: reads the model cache, never the hub"
    assert len(gpu_ids) == 2 and not set.intersection(*gpu_ids.values()), \
        f"the trainer and the evaluator share a GPU by default: {gpu_ids}"


def test_compose_gpu_evaluator_runs_its_own_vllm_server():
    # a reload switches the weights under every client: no vLLM server shared by evaluators, no URL to one
    (evaluator,) = [svc for svc in active("gpu").values() if poise_role(svc) == "evaluator"]
    assert environment(evaluator)["POISE_EVALUATOR_BACKEND"] == "vllm"
    assert "evaluator" in network_names(evaluator)["internal"].get("aliases", []), "Prometheus scrapes evaluator"
    assert "vllm" not in hostnames(), "a service or alias named vllm"
    for name, svc in services().items():
        assert not svc.get("image", "").startswith("vllm/"), f"{name}: a vLLM server image"
        assert "POISE_VLLM_URL" not in environment(svc), f"{name}: POISE_VLLM_URL (a server the evaluator shares)"


def test_compose_images_are_pinned():
    for name, svc in services().items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_compose_has_no_literal_secrets_and_keys_reach_only_the_agents():
    for name, svc in services().items():
        for variable, value in environment(svc).items():
            if SECRET_NAME.search(variable):
                assert re.fullmatch(r"\$\{" + variable + r"(:?-)?\}", value), \
                    f"{name}: {variable} must come from the environment as ${{{variable}:-}}, not a value"
        has_keys = any(key in environment(svc) for key in LLM_KEYS)
        assert has_keys == (poise_role(svc) in LLM_AGENTS), f"{name}: API keys go to proposer and reflector only"


def test_compose_poise_services_drop_privileges_and_candidates_stay_on_the_internal_network():
    internal = {name for name, net in (compose().get("networks") or {}).items() if (net or {}).get("internal")}
    for name, svc in services().items():
        if poise_role(svc):
            assert svc.get("cap_drop") == ["ALL"], f"{name}: drop all capabilities"
            assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: no-new-privileges"
        if poise_role(svc) in ("implementer", "trainer"):
            assert set(network_names(svc)) <= internal, f"{name} runs candidate code: internal networks only"
        if poise_role(svc) in CANDIDATE_RUNNERS:  # the sandbox's user namespace: the shipped profile allows it
            assert f"seccomp=./{SECCOMP_PROFILE_PATH}" in svc["security_opt"], f"{name}: the sandbox's seccomp profile"
        elif poise_role(svc):
            assert not any(opt.startswith("seccomp") for opt in svc["security_opt"]), f"{name}: the default profile"


def test_the_shipped_seccomp_profile_is_the_one_the_code_writes():
    """deploy/seccomp/poise-sandbox.json is scripts/seccomp_profile.py's output: rerun it after a change."""
    shipped = json.loads((ROOT / SECCOMP_PROFILE_PATH).read_text())
    assert shipped == container_seccomp_profile()
    denied = set(shipped["syscalls"][0]["names"])
    assert {"unshare", "mount", "umount2", "pivot_root"}.isdisjoint(denied)  # the sandbox's builder needs them
    assert {"bpf", "keyctl", "kexec_load"} <= denied


# ------------------------------------------------------------- compose opt-in: the implementer calls the LLM

MERGED_BY_NAME = ("environment", "networks")  # list or mapping in a file, merged by name


def by_name(value: list | dict | None) -> dict:
    """`environment` or a service's `networks` in the expanded (mapping) form that compose merges."""
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in value)
    return dict(value or {})


def merge_compose(base: object, override: object, key: str | None = None) -> object:
    """`docker compose -f base -f override` (compose spec, merge rules) for what the override files here use:
    mappings merge by key, `environment` and `networks` by name, scalars are replaced. Other sequences
    (appended, or unique by target) are not modelled: a test fails rather than guess."""
    if key in MERGED_BY_NAME:
        base, override = by_name(base), by_name(override)
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge_compose(base[k], v, k) if k in base else v for k, v in override.items()}}
    if isinstance(base, list) or isinstance(override, list):
        pytest.fail(f"merging the sequence {key!r} is not modelled here; extend merge_compose (compose merge rules)")
    return override


@cache
def compose_with_llm_implementer() -> dict:
    return merge_compose(compose(), yaml.safe_load(COMPOSE_LLM_IMPLEMENTER.read_text()))


def test_compose_llm_implementer_override_and_the_merged_file_match_the_compose_spec(tmp_path):
    checker = tool("check-jsonschema")
    merged = tmp_path / "docker-compose.merged.yml"
    merged.write_text(yaml.safe_dump(compose_with_llm_implementer(), sort_keys=False))
    for path in (COMPOSE_LLM_IMPLEMENTER, merged):
        result = run_tool(checker, "--builtin-schema", "vendor.compose-spec", str(path))
        assert result.returncode == 0, f"{path.name}: " + result.stdout + result.stderr


def test_compose_llm_implementer_override_gives_keys_and_edge_to_the_implementer_only():
    default, merged = compose(), compose_with_llm_implementer()
    assert {k: v for k, v in merged.items() if k != "services"} == {k: v for k, v in default.items() if k != "services"}
    assert merged["services"].keys() == default["services"].keys(), "the override adds or removes services"
    changed = {name for name, svc in merged["services"].items() if svc != default["services"][name]}
    assert changed == {"implementer"}, f"the override changes {changed}, not the implementer alone"
    before, after = default["services"]["implementer"], merged["services"]["implementer"]
    assert {key for key in after if after.get(key) != before.get(key)} == {"environment", "networks"}
    added = dict(environment(after).items() - environment(before).items())
    assert added == {key: f"${{{key}:-}}" for key in LLM_KEYS}, "only the LLM keys, from the environment"
    networks = default.get("networks") or {}
    assert set(network_names(after)) == {"internal", "edge"} and not (networks["edge"] or {}).get("internal")
    internal = {name for name, net in networks.items() if (net or {}).get("internal")}
    for name, svc in merged["services"].items():
        has_keys = any(key in environment(svc) for key in LLM_KEYS)
        assert has_keys == (poise_role(svc) in llm_pods((LLM_IMPLEMENTER,))), f"{name}: API keys"
        if poise_role(svc) == "trainer":
            assert set(network_names(svc)) <= internal, f"{name} runs candidate code: internal networks only"


def test_compose_llm_implementer_is_off_unless_its_file_is_named():
    # `docker compose up` reads docker-compose.yml and an override file of a fixed name, nothing else
    assert COMPOSE_LLM_IMPLEMENTER.name not in COMPOSE_AUTO_OVERRIDES
    for name in COMPOSE_AUTO_OVERRIDES:
        assert not (ROOT / name).exists(), f"{name} is merged into every `docker compose up`"
    implementer = services()["implementer"]
    assert not any(key in environment(implementer) for key in LLM_KEYS), "the implementer has API keys by default"
    assert set(network_names(implementer)) == {"internal"}, "the implementer has a route off the host by default"


# ----------------------------------------------------------------------------------- Dockerfiles, context


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` any folders, `*` and `?` within one name, `[...]` a class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out.append(pattern[i: end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    """Whether the build context keeps `path`: the last pattern matching it or one of its parents wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        regex = dockerignore_regex(raw.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = raw.startswith("!")
    return included


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_only_what_the_context_keeps(dockerfile):
    text = (ROOT / dockerfile).read_text()
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert copies, f"{dockerfile} copies nothing"
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such path"
            assert dockerignore_includes(source, patterns), f"{dockerfile}: COPY {source} is excluded by .dockerignore"
    for private in (".git/config", ".venv/bin/python", "runs/x", ".env", "poise/.env", "poise/__pycache__/a.pyc",
                    "poise/a.pyc"):
        assert not dockerignore_includes(private, patterns), f".dockerignore lets {private} into the image"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_runs_poise_as_a_non_root_user(dockerfile):
    lines = [line.strip() for line in (ROOT / dockerfile).read_text().splitlines()]
    user = [line for line in lines if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0")), f"{dockerfile}: must end as a non-root USER"
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT "))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT "))[-1] == "poise"
    assert not re.search(r"(API_KEY|TOKEN|SECRET|PASSWORD)\w*\s*=", "\n".join(lines)), \
        f"{dockerfile}: no secret belongs in an image"


def test_cpu_image_pins_the_cpu_build_of_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text and "-c constraints/cpu.txt" in text


# ------------------------------------------------------------------------------------------- Prometheus

DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
PROMETHEUS_TOP_KEYS = {"global", "rule_files", "scrape_config_files", "scrape_configs", "alerting", "remote_write",
                       "remote_read", "storage", "tracing", "otlp", "runtime"}
SCRAPE_KEYS = {"job_name", "scrape_interval", "scrape_timeout", "metrics_path", "scheme", "honor_labels",
               "honor_timestamps", "params", "static_configs", "relabel_configs", "metric_relabel_configs",
               "basic_auth", "authorization", "tls_config", "follow_redirects", "sample_limit", "scrape_protocols"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod", "labelmap", "labeldrop",
                   "labelkeep", "lowercase", "uppercase"}


def seconds(duration: str) -> float:
    match = DURATION.match(duration)
    assert match and duration, f"{duration!r} is not a Prometheus duration"
    units = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
    return sum(int(match.group(2 * i + 2) or 0) * unit for i, unit in enumerate(units))


@cache
def prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS_FILE.read_text())


def scrape_targets() -> Iterator[tuple[str, str, str]]:
    for job in prometheus()["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                yield job["job_name"], host, port


def test_prometheus_config_is_well_formed():
    # promtool is not available here: this is the subset of `promtool check config` that matters for a
    # static-target file (known keys, unique jobs, valid durations, timeout <= interval, valid relabelling)
    config = prometheus()
    assert set(config) <= PROMETHEUS_TOP_KEYS, f"unknown top-level keys: {set(config) - PROMETHEUS_TOP_KEYS}"
    default_interval = config.get("global", {}).get("scrape_interval", "1m")
    default_timeout = config.get("global", {}).get("scrape_timeout", "10s")
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), f"duplicate job names: {jobs}"
    for job in config["scrape_configs"]:
        assert set(job) <= SCRAPE_KEYS, f"{job['job_name']}: unknown keys {set(job) - SCRAPE_KEYS}"
        interval = seconds(job.get("scrape_interval", default_interval))
        timeout = seconds(job.get("scrape_timeout", default_timeout))
        assert 0 < timeout <= interval, f"{job['job_name']}: scrape_timeout must not exceed scrape_interval"
        assert job.get("metrics_path", "/metrics").startswith("/")
        for relabel in job.get("relabel_configs", []) + job.get("metric_relabel_configs", []):
            assert relabel.get("action", "replace") in RELABEL_ACTIONS
            re.compile(relabel.get("regex", "(.*)"))
    for _, host, port in scrape_targets():
        assert host and port.isdigit(), f"target {host}:{port} is not host:port"


def test_prometheus_scrapes_every_compose_service_on_its_port():
    names = hostnames()
    scraped = set()
    for job, host, port in scrape_targets():
        if host == "localhost":
            continue
        assert host in names, f"job {job}: target {host} is no compose service or network alias"
        for name in names[host]:
            svc = services()[name]
            assert port in [str(p) for p in svc.get("expose", [])], f"job {job}: {name} does not listen on {port}"
            if poise_role(svc):
                assert environment(svc)["POISE_HTTP_PORT"] == port
                scraped.add(poise_role(svc))
        scraped.update(names[host])
    assert set(SERVICES) <= scraped, f"not scraped: {set(SERVICES) - scraped}"
    assert "nats-exporter" in scraped, "the NATS exporter is not scraped"
    assert all(job.get("metrics_path", "/metrics") in ("/metrics", "/metrics/")
               for job in prometheus()["scrape_configs"])


# ---------------------------------------------------------------------------------------------- Grafana

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes", "histogram_quantile",
    "clamp", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "exp", "ln", "log2", "log10", "sqrt",
    "scalar", "vector", "time", "timestamp", "sort", "sort_desc", "absent", "absent_over_time", "label_replace",
    "label_join", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "quantile_over_time", "present_over_time", "nan", "inf",
}
METRIC_NAME = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and variables removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\$\{?\w+(?::\w+)?\}?", "", expr)  # dashboard variables ($__rate_interval, ${phase})
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    return {word for word in METRIC_NAME.findall(expr) if word.lower() not in PROMQL_WORDS}


def base_metric(series: str) -> str:
    """poise_phase_duration_seconds_bucket -> poise_phase_duration_seconds (a histogram's series)."""
    for suffix in ("_bucket", "_sum", "_count"):
        stem = series.removesuffix(suffix)
        if stem != series and METRICS.get(stem) == "histogram":
            return stem
    return series


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of the dashboard."""
    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
            yield f"variable {variable['name']!r}", match.group(1) if match else query


def test_promql_metric_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, phase) (rate(poise_phase_duration_seconds_bucket'
            '{phase=~"$phase", outcome!="ok"}[$__rate_interval]))) / clamp_min(sum(up offset 5m), 1e-6)')
    assert promql_metrics(expr) == {"poise_phase_duration_seconds_bucket", "up"}


def test_dashboard_queries_only_the_poise_metrics_and_all_of_them():
    used = set()
    for where, expr in dashboard_queries():
        names = {base_metric(name) for name in promql_metrics(expr)}
        unknown = names - set(METRICS)
        assert not unknown, f"{where} queries {unknown}, which poise/metrics.py does not export"
        assert names, f"{where}: no metric in {expr!r}"
        used |= names
    assert used == set(METRICS), f"never shown: {set(METRICS) - used}"


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {variable["name"] for variable in board["templating"]["list"]}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']}: outside the 24-column grid"
        if panel["type"] != "row":
            assert panel["datasource"]["uid"].strip("${}") in variables, f"{panel['title']}: unknown datasource"
            for target in panel["targets"]:
                for ref in re.findall(r"\$\{?(\w+)", target["expr"]):
                    assert ref.startswith("__") or ref in variables, f"{panel['title']}: unknown variable ${ref}"


def test_grafana_provisioning_points_at_compose():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090" in services()["prometheus"]["expose"]
    default = next(v for v in dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert default["current"]["value"] == source["uid"], "the dashboard's default datasource is not provisioned"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "poise.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in services()["grafana"]["volumes"] if v.startswith("./"))
    for provider in providers["providers"]:
        assert mounts.get("./grafana/dashboards") == provider["options"]["path"]
    assert mounts.get("./grafana/provisioning") == "/etc/grafana/provisioning"


def test_dashboard_metric_names_are_exported_by_poise_metrics():
    from prometheus_client import CollectorRegistry

    from poise.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    exported = {family.name + ("_total" if family.type == "counter" else ""): family.type
                for family in registry.collect()}
    assert {name: exported.get(name) for name in METRICS} == METRICS


# ------------------------------------------------------------------------------------------- Kubernetes


@cache
def rendered(overlay: str, components: tuple[str, ...] = ()) -> str:
    """`kubectl kustomize` of an overlay, in a copy of k8s/ with the secret files `poise secrets k8s/base/secrets`
    writes; with `components` (k8s/components/<name>), the copy's overlay lists them under `components:`, the way
    an operator enables them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays offline)")
    with tempfile.TemporaryDirectory() as scratch:
        k8s = Path(scratch) / "k8s"
        shutil.copytree(K8S_DIR, k8s, ignore=lambda folder, names: ["secrets"] if Path(folder) == K8S_DIR / "base"
                        else [])
        shutil.copytree(generated_secrets(), k8s / "base" / "secrets")
        if components:
            kustomization = k8s / "overlays" / overlay / "kustomization.yaml"
            config = yaml.safe_load(kustomization.read_text())
            config["components"] = config.get("components", []) + [f"../../components/{c}" for c in components]
            kustomization.write_text(yaml.safe_dump(config, sort_keys=False))
        result = run_tool(kubectl, "kustomize", str(k8s / "overlays" / overlay))
    what = " with ".join((f"k8s/overlays/{overlay}", *components))
    assert result.returncode == 0, f"kubectl kustomize {what} failed:\n{result.stderr}"
    return result.stdout


def objects(overlay: str, components: tuple[str, ...] = ()) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered(overlay, components)) if doc]


def workloads(overlay: str, components: tuple[str, ...] = ()) -> Iterator[tuple[dict, dict]]:
    """(object, pod template) of every Deployment, StatefulSet and Job."""
    for obj in objects(overlay, components):
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if (operator == "In" and labels.get(key) not in values) or (operator == "NotIn" and labels.get(key) in values) \
                or (operator == "Exists" and key not in labels) or (operator == "DoesNotExist" and key in labels):
            return False
    return True


# Every overlay as shipped, and with the opt-in component (the security tests below cover both).
VARIANTS = [pytest.param(overlay, opt_ins, id="+".join((overlay, *opt_ins)))
            for overlay in OVERLAYS for opt_ins in ((), (LLM_IMPLEMENTER,))]


def test_overlays_exist():
    assert {"workstation", "cluster"} <= set(OVERLAYS)


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_overlay_renders_and_passes_strict_validation(overlay, components, tmp_path):
    validator = tool("kubernetes-validate")
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered(overlay, components))
    result = run_tool(validator, "--strict", "--quiet", "-k", K8S_VERSION, str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    # kubernetes-validate must catch a typo offline, or the test above proves nothing
    validator = tool("kubernetes-validate")
    manifest = tmp_path / "typo.yaml"
    manifest.write_text(rendered(OVERLAYS[0]).replace("readOnlyRootFilesystem:", "readOnlyRootFilesystm:", 1))
    result = run_tool(validator, "--strict", "--quiet", "-k", K8S_VERSION, str(manifest))
    assert result.returncode != 0 and "readOnlyRootFilesystm" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_probes_and_scrape_annotations(overlay):
    for obj, template in workloads(overlay):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Job":
            continue
        for container in template["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{name}/{container['name']}: no {probe}"
        if obj["kind"] == "Deployment":
            annotations = template["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", f"{name}: no scrape annotation"
            assert annotations.get("prometheus.io/path") == "/metrics", f"{name}: no metrics path"
            ports = {str(p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert annotations.get("prometheus.io/port") in ports, f"{name}: scrape port is not a container port"
            for container in template["spec"]["containers"]:
                if container.get("args", [None])[0] == "serve":
                    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz", name


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_every_object_lands_in_the_poise_namespace(overlay, components):
    # an overlay's or component's own resources miss the base's namespace transformer; outside the namespace a
    # pod escapes its default-deny NetworkPolicy, and a NetworkPolicy selects nothing it is meant to
    (namespace,) = [obj["metadata"]["name"] for obj in objects(overlay, components) if obj["kind"] == "Namespace"]
    elsewhere = [f"{obj['kind']}/{obj['metadata']['name']}" for obj in objects(overlay, components)
                 if obj["kind"] != "Namespace" and obj["metadata"].get("namespace") != namespace]
    assert not elsewhere, f"not in the namespace {namespace}: {elsewhere}"


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_every_pod_is_locked_down(overlay, components):
    for obj, template in workloads(overlay, components):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = template["spec"]
        assert spec.get("automountServiceAccountToken") is False, f"{name}: mounts a service-account token"
        assert spec["securityContext"].get("runAsNonRoot") is True, f"{name}: may run as root"
        profile = spec["securityContext"].get("seccompProfile")
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] in CANDIDATE_RUNNERS:  # the sandbox's userns
            assert profile == {"type": "Localhost", "localhostProfile": Path(SECCOMP_PROFILE_PATH).name}, name
        else:
            assert profile == {"type": "RuntimeDefault"}, f"{name}: no seccomp"
        assert not any("hostPath" in volume for volume in spec.get("volumes", [])), f"{name}: a hostPath volume"
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert context.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
            assert context.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits", {}).get("memory"), f"{where}: resources"


def llm_key_env(variable: dict) -> bool:
    """An env entry that is an agent LLM API key taken from the LLM Secret, as the agents get it."""
    ref = variable.get("valueFrom", {}).get("secretKeyRef", {})
    return variable["name"] in LLM_KEYS and ref == {"name": "poise-llm-api", "key": variable["name"], "optional": True}


def without_llm_keys(spec: dict) -> tuple[dict, set[str]]:
    """A pod spec with its agent-LLM key env entries removed, and the names of those removed."""
    spec, removed = copy.deepcopy(spec), set()
    for container in spec["containers"]:
        removed |= {v["name"] for v in container.get("env", []) if llm_key_env(v)}
        container["env"] = [v for v in container.get("env", []) if not llm_key_env(v)]
    return spec, removed


def llm_api_egress(policies: list[dict]) -> dict:
    """The agents' rule to the LLM API (TCP 443 outside the cluster's ranges) of the base's llm-agents policy."""
    (agents,) = [p for p in policies if p["metadata"]["name"] == "llm-agents"]
    (rule,) = [r for r in agents["spec"]["egress"] if any("ipBlock" in peer for peer in r["to"])]
    return rule


# The Secrets k8s/base/kustomization.yaml generates from the files of `poise secrets`, by their file
GENERATED_SECRETS = {f"poise-{name.removesuffix('.password').removesuffix('.conf')}": name
                     for name in {NATS_SERVER_CONF, *(f for service in SERVICES for f in files_of(service).values())}}


def generated_name(name: str) -> str:
    """A generated object's name without the hash suffix kustomize gives it."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def expected_secrets(workload: str) -> set[str]:
    """The Secrets a workload's credentials volume may project: a POISE service's own files (files_of)."""
    if workload == "nats":
        return {"poise-nats-server"}
    if workload in SERVICES:
        return {secret for secret, name in GENERATED_SECRETS.items() if name in files_of(workload).values()}
    return set()


def without_credentials(spec: dict) -> tuple[dict, set[str]]:
    """A pod spec without its `credentials` volume and mounts, and the Secrets that volume projects."""
    spec = copy.deepcopy(spec)
    volumes = [v for v in spec.get("volumes", []) if v["name"] == "credentials"]
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] != "credentials"]
    for container in spec["containers"]:
        container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] != "credentials"]
    return spec, {generated_name(source["secret"]["name"]) for v in volumes for source in v["projected"]["sources"]}


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_candidate_pods_have_no_token_no_secret_and_egress_only_to_nats_and_the_archive(overlay, components):
    everything = objects(overlay, components)
    pods = {obj["metadata"]["name"]: template["metadata"]["labels"]
            for obj, template in workloads(overlay, components)}
    policies = [obj for obj in everything if obj["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies), "no default deny"
    allowed_peers = {"nats", "archive"}
    opted_in = llm_pods(components) - LLM_AGENTS  # candidate pods that may also call the LLM API: keys and 443
    candidates = [(obj, template) for obj, template in workloads(overlay, components)
                  if template["metadata"]["labels"].get(CANDIDATE_LABEL) == "true"]
    assert {"implementer", "trainer"} <= {obj["metadata"]["name"] for obj, _ in candidates}
    for obj, template in candidates:
        name, labels, spec = obj["metadata"]["name"], template["metadata"]["labels"], template["spec"]
        assert spec.get("automountServiceAccountToken") is False, f"{name}: service-account token"
        if name in opted_in:  # exactly the agents' optional key references; the rest must pass as for any other
            spec, removed = without_llm_keys(spec)
            assert removed == set(LLM_KEYS), f"{name}: opted in, but gets {removed} of the LLM keys"
        spec, projected = without_credentials(spec)  # its own NATS password (and read token): checked below
        assert projected == expected_secrets(name), f"{name}: its credentials volume holds {projected}"
        text = json.dumps(spec)
        assert "secretKeyRef" not in text and "secretRef" not in text and '"secret"' not in text, f"{name}: a Secret"
        assert not any(key in text for key in LLM_KEYS), f"{name}: an LLM API key"
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert any("Egress" in p["spec"]["policyTypes"] for p in mine), f"{name}: no policy restricts its egress"
        for policy in mine:
            for rule in policy["spec"].get("egress", []):
                if name in opted_in and rule == llm_api_egress(policies):
                    continue  # the opt-in: the agents' own route to the LLM API, no wider
                assert rule.get("to"), f"{name}: policy {policy['metadata']['name']} allows egress anywhere"
                for peer in rule["to"]:
                    where = f"{name}: policy {policy['metadata']['name']}"
                    assert "ipBlock" not in peer, f"{where} allows egress to IP ranges"
                    if "namespaceSelector" in peer:  # only DNS, only kube-dns
                        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name":
                                                                             "kube-system"}}, where
                        assert peer.get("podSelector") == {"matchLabels": {"k8s-app": "kube-dns"}}, where
                        assert {p["port"] for p in rule["ports"]} == {53}, where
                        continue
                    reached = {pod for pod, pod_labels in pods.items() if selects(peer["podSelector"], pod_labels)}
                    assert reached and reached <= allowed_peers, f"{where} reaches {reached}"


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_llm_keys_are_placeholders_and_reach_only_the_agents(overlay, components):
    for obj in objects(overlay, components):
        if obj["kind"] == "Secret" and generated_name(obj["metadata"]["name"]) in GENERATED_SECRETS:
            continue  # from the files of `poise secrets` (test_k8s_secrets_come_from_the_generated_files)
        if obj["kind"] == "Secret":
            assert all(value == "" for value in obj.get("stringData", {}).values()), "a Secret holds a value"
            assert not obj.get("data"), "a Secret holds a value"
        if obj["kind"] == "ConfigMap":
            assert not any(SECRET_NAME.search(key) for key in obj.get("data", {})), "a secret in a ConfigMap"
    for obj, template in workloads(overlay, components):
        for container in template["spec"]["containers"]:
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable, f"{obj['metadata']['name']}: literal {variable['name']}"
            keys = {v["name"] for v in container.get("env", [])} & set(LLM_KEYS)
            assert bool(keys) == (obj["metadata"]["name"] in llm_pods(components)), \
                f"{obj['metadata']['name']}: API keys"


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_k8s_gives_each_pod_its_own_credentials_and_nats_its_users(overlay, components):
    for obj, template in workloads(overlay, components):
        name = obj["metadata"]["name"]
        _, projected = without_credentials(template["spec"])
        assert projected == expected_secrets(name), f"{name}: its credentials volume holds {projected}"
        for container in template["spec"]["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["name"] == "credentials"]
            where = f"{name}/{container['name']}"
            if container.get("args", [None])[0] == "serve":
                role = container["args"][1]
                assert mounts == [{"name": "credentials", "mountPath": SECRETS_MOUNT, "readOnly": True}], where
                env = {v["name"]: v.get("value") for v in container.get("env", [])}
                sources = {ref["configMapRef"]["name"] for ref in container.get("envFrom", [])}
                for setting, file in files_of(role).items():
                    if file == ARCHIVE_READ_TOKEN:  # off unless an overlay fills the ConfigMap (kustomization.yaml)
                        assert any(generated_name(s) == "poise-archive-read" for s in sources), where
                    else:
                        assert env.get(setting) == f"{SECRETS_MOUNT}/{file}", f"{where}: {setting}"
            elif name == "nats" and container["name"] == "nats":
                assert mounts and container["args"][container["args"].index("-c") + 1] == \
                    f"{SECRETS_MOUNT}/{NATS_SERVER_CONF}", where
            else:
                assert not mounts, f"{where} mounts credentials"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_secrets_come_from_the_generated_files_and_none_is_in_git(overlay):
    secrets = {generated_name(obj["metadata"]["name"]): obj for obj in objects(overlay) if obj["kind"] == "Secret"}
    for secret, file in GENERATED_SECRETS.items():
        data = secrets[secret]["data"]
        assert set(data) == {file}, f"{secret}: keys {set(data)}"
        assert b64decode(data[file]).decode() == (generated_secrets() / file).read_text(), secret
    (read,) = [obj for obj in objects(overlay) if generated_name(obj["metadata"]["name"]) == "poise-archive-read"]
    assert read["data"] == {"POISE_ARCHIVE_READ_TOKEN_FILE": ""}, "reads are open unless an overlay says otherwise"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/secrets/" in ignored and "/k8s/base/secrets/" in ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = run_tool("git", "ls-files", "secrets", "k8s/base/secrets").stdout
        assert not tracked.strip(), f"secrets in git: {tracked}"


def test_compose_secrets_are_the_files_poise_secrets_writes():
    declared = compose().get("secrets") or {}
    written = {path.name for path in generated_secrets().iterdir()}
    assert set(declared) <= written, f"declared but never written: {set(declared) - written}"
    for name, config in declared.items():
        assert config == {"file": f"./secrets/{name}"}, f"secret {name}: {config}"


def test_compose_gives_each_service_its_own_credentials_and_nats_its_users(monkeypatch):
    for name, svc in services().items():
        role = poise_role(svc)
        mounted = {item if isinstance(item, str) else item["source"] for item in svc.get("secrets", [])}
        env = environment(svc)
        if name == "nats":
            assert mounted == {NATS_SERVER_CONF}
            command = svc["command"]
            assert command[command.index("-c") + 1] == f"{SECRETS_MOUNT}/{NATS_SERVER_CONF}"
            continue
        if role is None:
            assert not mounted, f"{name} mounts {mounted}"
            continue
        expected = files_of(role)
        assert mounted == set(expected.values()), f"{name} mounts {mounted}"
        opted_in = {key: interpolate(value) for key, value in env.items()}
        for setting, file in expected.items():
            if file == ARCHIVE_READ_TOKEN:  # off unless .env sets it (the file is mounted either way)
                assert env[setting] == "${POISE_ARCHIVE_READ_TOKEN_FILE:-}", f"{name}: {setting}"
                opted_in[setting] = f"{SECRETS_MOUNT}/{file}"
            else:
                assert env[setting] == f"{SECRETS_MOUNT}/{file}", f"{name}: {setting}"
        settings = settings_under(opted_in, monkeypatch, name)
        assert settings.nats_credentials(role)[0] == f"poise-{role}" and settings.nats_password is not None
        assert (settings.archive_read_token is not None) == (ARCHIVE_READ_TOKEN in expected.values())
        assert (settings.archive_token is not None) == (role == "archive"), name


LLM_IMPLEMENTER_POLICY = ("NetworkPolicy", "implementer-llm-api")


def by_kind_and_name(overlay: str, components: tuple[str, ...] = ()) -> dict[tuple[str, str], dict]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects(overlay, components)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_llm_implementer_component_changes_the_implementer_alone(overlay):
    default, opted = by_kind_and_name(overlay), by_kind_and_name(overlay, (LLM_IMPLEMENTER,))
    assert default.keys() <= opted.keys(), f"the component removes {default.keys() - opted.keys()}"
    assert opted.keys() - default.keys() == {LLM_IMPLEMENTER_POLICY}
    changed = {key for key, obj in default.items() if opted[key] != obj}
    assert changed == {("Deployment", "implementer")}, f"the component changes {changed}, not the implementer alone"
    # the implementer: its pod's agent-LLM key references and the annotation that says so, nothing else
    before, after = default["Deployment", "implementer"], copy.deepcopy(opted["Deployment", "implementer"])
    template = after["spec"]["template"]
    template["spec"], removed = without_llm_keys(template["spec"])
    assert removed == set(LLM_KEYS)
    for container in template["spec"]["containers"]:
        if not container["env"]:
            del container["env"]
    annotation = template["metadata"]["annotations"].pop("poise.io/llm-api-access")
    assert "llm-implementer" in annotation, "the pod should say which opt-in gave it the keys"
    assert after == before


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_llm_implementer_policy_opens_the_agents_llm_route_to_the_implementer_only(overlay):
    everything = by_kind_and_name(overlay, (LLM_IMPLEMENTER,))
    policy = everything[LLM_IMPLEMENTER_POLICY]
    pods = {obj["metadata"]["name"]: template["metadata"]["labels"]
            for obj, template in workloads(overlay, (LLM_IMPLEMENTER,))}
    selected = {pod for pod, labels in pods.items() if selects(policy["spec"]["podSelector"], labels)}
    assert selected == {"implementer"}, f"{LLM_IMPLEMENTER_POLICY[1]} selects {selected}"
    assert policy["spec"]["policyTypes"] == ["Egress"] and "ingress" not in policy["spec"]
    policies = [obj for (kind, _), obj in everything.items() if kind == "NetworkPolicy"]
    assert policy["spec"]["egress"] == [llm_api_egress(policies)], "not the agents' rule (TCP 443, public ranges)"
    (rule,) = policy["spec"]["egress"]
    assert [port["port"] for port in rule["ports"]] == [443]
    assert "169.254.0.0/16" in rule["to"][0]["ipBlock"]["except"], "cloud metadata must stay unreachable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_llm_implementer_component_is_off_in_the_shipped_overlays(overlay):
    config = yaml.safe_load((K8S_DIR / "overlays" / overlay / "kustomization.yaml").read_text())
    assert not any(LLM_IMPLEMENTER in component for component in config.get("components", [])), \
        f"{overlay} enables the opt-in {LLM_IMPLEMENTER}"
    everything = by_kind_and_name(overlay)
    assert LLM_IMPLEMENTER_POLICY not in everything
    implementer = everything["Deployment", "implementer"]["spec"]["template"]["spec"]
    assert not any(key in json.dumps(implementer) for key in LLM_KEYS), "the implementer has API keys by default"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_poise_pods_get_settings_the_services_accept(overlay, monkeypatch):
    config = next(obj for obj in objects(overlay) if obj["kind"] == "ConfigMap"
                  and obj["metadata"]["name"].startswith("poise-config"))["data"]
    for obj, template in workloads(overlay):
        for container in template["spec"]["containers"]:
            if container.get("args", [None])[0] != "serve":
                continue
            env = {**config, **{v["name"]: v["value"] for v in container.get("env", []) if "value" in v}}
            env = {variable: value for variable, value in env.items() if variable.startswith("POISE_")}
            settings = settings_under(env, monkeypatch, obj["metadata"]["name"])
            assert settings.http_port == container["ports"][0]["containerPort"]
            if container["args"][1] == "archive":
                assert settings.mongo_url and "replicaSet=rs0" in settings.mongo_url


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_workstation_runs_the_cpu_trainer_with_one_replica_each():
    config = next(obj for obj in objects("workstation") if obj["kind"] == "ConfigMap"
                  and obj["metadata"]["name"].startswith("poise-config"))["data"]
    assert config["POISE_TRAINER_BACKEND"] == "testbed" and config["POISE_EVALUATOR_BACKEND"] == "testbed"
    for obj, template in workloads("workstation"):
        assert obj["spec"].get("replicas", 1) == 1, obj["metadata"]["name"]
        assert not any(gpus(c) for c in template["spec"]["containers"]), f"{obj['metadata']['name']} asks for GPUs"
    claims = [obj for obj in objects("workstation") if obj["kind"] == "PersistentVolumeClaim"]
    claims += [claim for obj in objects("workstation") if obj["kind"] == "StatefulSet"
               for claim in obj["spec"].get("volumeClaimTemplates", [])]
    for claim in claims:
        size = claim["spec"]["resources"]["requests"]["storage"]
        assert size.endswith("Gi") and int(size[:-2]) <= 10, f"{claim['metadata']['name']}: {size} on a workstation"


def test_cluster_runs_verl_and_vllm_on_gpus_with_a_model_cache():
    everything = by_kind_and_name("cluster")
    config = next(obj for (kind, name), obj in everything.items() if kind == "ConfigMap"
                  and name.startswith("poise-config"))["data"]
    assert config["POISE_TRAINER_BACKEND"] == "verl" and config["POISE_EVALUATOR_BACKEND"] == "vllm"
    trainer = everything["Deployment", "trainer"]["spec"]["template"]["spec"]
    assert gpus(trainer["containers"][0]) == 8
    # the evaluator runs its own vLLM server (the GPU image, one GPU per replica); there is no shared server
    evaluator = everything["Deployment", "evaluator"]["spec"]["template"]["spec"]
    (container,) = evaluator["containers"]
    assert gpus(container) == 1 and container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["image"].split(":")[0].endswith("/poise-gpu"), "the evaluator needs the image with vLLM"
    assert not [key for key in everything if key[1] == "vllm" or key[1].endswith("-vllm")], "a vLLM server"
    for name, spec in (("trainer", trainer), ("evaluator", evaluator)):
        claims = {v["persistentVolumeClaim"]["claimName"]: v for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims["poise-model-cache"]["persistentVolumeClaim"].get("readOnly") is True, name
        mounts = {m["mountPath"]: m for c in spec["containers"] for m in c["volumeMounts"]}
        assert mounts["/models"].get("readOnly") is True, f"{name}: the model cache must be read-only"
        shm = mounts["/dev/shm"]["name"]
        assert any(v["name"] == shm and v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"]), \
            f"{name}: no memory-backed /dev/shm"
    assert ("PersistentVolumeClaim", "poise-model-cache") in everything
    for name in ("proposer", "implementer"):
        assert everything["Deployment", name]["spec"]["replicas"] > 1, f"{name}: scale out on the cluster"
    assert everything["Deployment", "archive"]["spec"]["replicas"] == 1, "the archive is the single writer"


def test_cluster_verl_job_template_is_bounded_and_isolated():
    jobs = [obj for obj in objects("cluster") if obj["kind"] == "Job" and
            obj["spec"]["template"]["metadata"]["labels"].get(CANDIDATE_LABEL) == "true"]
    assert len(jobs) == 1, "one VERL training Job template"
    (job,) = jobs
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["suspend"] is True, "a template must not run when applied"
    assert spec["backoffLimit"] == 0 and 0 < spec["activeDeadlineSeconds"] <= 86400
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert gpus(container) == 8 and container["resources"]["requests"]["nvidia.com/gpu"] == 8
    shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert any(v["name"] in shm and v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    # no network at all: not even DNS
    labels = job["spec"]["template"]["metadata"]["labels"]
    policies = [obj for obj in objects("cluster") if obj["kind"] == "NetworkPolicy"
                and selects(obj["spec"]["podSelector"], labels)]
    assert policies and not any(rule for p in policies for rule in p["spec"].get("egress", [])), \
        f"the training Job may reach: {[p['metadata']['name'] for p in policies if p['spec'].get('egress')]}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_shipped_config_points_the_evaluator_at_a_shared_vllm_server(overlay):
    # POISE_VLLM_URL is for a server with exactly one evaluator as its client; the overlays let each evaluator
    # start its own
    for obj in objects(overlay):
        if obj["kind"] == "ConfigMap":
            assert "POISE_VLLM_URL" not in obj.get("data", {}), f"ConfigMap/{obj['metadata']['name']}"
    for obj, template in workloads(overlay):
        for container in template["spec"]["containers"]:
            names = {variable["name"] for variable in container.get("env", [])}
            assert "POISE_VLLM_URL" not in names, f"{obj['metadata']['name']}: POISE_VLLM_URL"


# ------------------------------------------------------------------- the services as `poise serve` builds them

DEPLOYMENTS = [("compose", profile) for profile in PROFILES] + [("k8s", overlay) for overlay in OVERLAYS]


def workload_env(kind: str, where: str, role: str) -> dict[str, str]:
    """The POISE_* environment the container of `role` gets: compose, the service's environment after
    interpolation; k8s, the ConfigMaps its envFrom names, then its own env values."""
    if kind == "compose":
        (svc,) = [svc for svc in active(where).values() if poise_role(svc) == role]
        env = {key: interpolate(value) for key, value in environment(svc).items()}
    else:
        configmaps = {obj["metadata"]["name"]: obj.get("data", {}) for obj in objects(where)
                      if obj["kind"] == "ConfigMap"}
        (container,) = [c for _, template in workloads(where) for c in template["spec"]["containers"]
                        if c.get("args") == ["serve", role]]
        env = {}
        for source in container.get("envFrom", []):
            env.update(configmaps[source["configMapRef"]["name"]])
        env.update({v["name"]: v["value"] for v in container.get("env", []) if "value" in v})
    return {variable: value for variable, value in env.items() if variable.startswith("POISE_")}


def backend_params(role: str) -> list:
    """One case per compose profile and k8s overlay."""
    params = []
    for kind, where in DEPLOYMENTS:
        trainer, evaluator = BACKENDS[where]
        params.append(pytest.param(kind, where, trainer if role == "trainer" else evaluator, id=f"{kind}-{where}"))
    return params


@pytest.mark.parametrize(("kind", "where", "backend"), backend_params("evaluator"))
def test_evaluator_of_every_deployment_is_built_by_serve(kind, where, backend, monkeypatch, tmp_path):
    env = workload_env(kind, where, "evaluator")
    settings = settings_under({**env, "POISE_WORK_DIR": str(tmp_path)}, monkeypatch, f"{kind} {where} evaluator")
    runtime = evaluator_runtime(InProcBus(), settings)  # builds the backend; starts nothing
    try:
        (handle,) = runtime.subscriptions.values()
        built = handle.__self__.backend
        assert built.name == backend, f"{kind} {where}: the evaluator is {built.name}, expected {backend}"
        if backend == "vllm":
            from evaluator.vllm_server import ManagedServer

            assert isinstance(built.server, ManagedServer), "each evaluator must start its own vLLM server"
            assert built.server.process is None, "building the evaluator started a vLLM server"
            assert runtime.checks["vllm"]() is None, "an idle evaluator (no server yet) must pass its probes"
    finally:
        for close in runtime.closers:
            close()


@pytest.mark.parametrize(("kind", "where", "backend"), backend_params("trainer"))
def test_trainer_of_every_deployment_is_built_by_serve(kind, where, backend, monkeypatch, tmp_path):
    env = workload_env(kind, where, "trainer")
    settings = settings_under({**env, "POISE_WORK_DIR": str(tmp_path)}, monkeypatch, f"{kind} {where} trainer")
    assert settings.trainer_backend == backend
    runtime = trainer_runtime(InProcBus(), settings)  # the VERL trainer: the GPU protocol loaded; nothing started
    try:
        assert list(runtime.subscriptions) == ["work.train"]
        (handle,) = runtime.subscriptions.values()
        built = handle.__self__.make("run")
        assert built.backend == backend, f"{kind} {where}: the trainer is {built.backend}, expected {backend}"
        if backend == "verl":
            assert runtime.checks["verl"]() is None
            assert built.protocol.name == settings.verl_protocol
            assert built.model_path == settings.base_model
    finally:
        for close in runtime.closers:
            close()


# -------------------------------------------------------------------------------- the VERL training Jobs

VERL_JOBS = "verl-jobs"


def test_the_verl_job_template_runs_the_paper_protocol_as_the_trainer_renders_it():
    from trainer.verl.protocol import (
        CANDIDATE_ENV,
        ENTRY_MODULE,
        EXTERNAL_MODULES_ENV,
        PLUGIN_MODULE,
        TrainInputs,
        hydra_overrides,
        load_gpu_protocol,
    )

    (job,) = [obj for obj in objects("cluster") if obj["kind"] == "Job" and obj["metadata"]["name"].endswith(
        "verl-train-template")]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    paper = load_gpu_protocol("paper")
    node = Path("/var/lib/poise/node")
    # the template's placeholders, and the code where the GPU image installs it (Dockerfile.gpu)
    inputs = TrainInputs(model_path="$(POISE_BASE_MODEL)", train_files=("/var/lib/poise/data/train.parquet",),
                         val_files=("/var/lib/poise/data/val.parquet",), candidate_module="poise_candidate",
                         candidate_dir=node / "candidate", run_dir=node, experiment_name="$(POISE_NODE_ID)",
                         code_root=Path("/opt/venv/lib/python3.12/site-packages"))
    assert container["command"] == ["python", "-m", ENTRY_MODULE]
    assert container["args"] == hydra_overrides(paper, inputs), "re-render verl-train-job.yaml's args"
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env[EXTERNAL_MODULES_ENV] == PLUGIN_MODULE
    assert env[CANDIDATE_ENV] == str(node / "candidate" / "poise_candidate.py")  # the file the plugin loads
    assert job["spec"]["activeDeadlineSeconds"] == paper.resources.deadline_s
    assert gpus(container) == paper.resources.gpus
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/poise/data"].get("readOnly") is True
    assert mounts[str(node)]["subPathExpr"].endswith("/nodes/$(POISE_NODE_ID)/train")


def service_job(tmp_path: Path) -> dict:
    from trainer.verl.k8s_job import job_manifest, job_name
    from trainer.verl.protocol import TrainInputs, load_gpu_protocol

    work = Path("/var/lib/poise")
    run_dir = work / "runs/r1/nodes/n001/train"
    inputs = TrainInputs(model_path="Qwen/Qwen2.5-Math-1.5B", train_files=(str(work / "data/train.parquet"),),
                         val_files=(str(work / "data/val.parquet"),), candidate_module="poise_candidate",
                         candidate_dir=run_dir / "candidate", run_dir=run_dir, experiment_name="r1-n001-r0")
    return job_manifest(load_gpu_protocol("paper"), inputs, name=job_name("r1", "n001", 0, 1), namespace="poise",
                        image="registry.example.com/poise/poise-gpu:0.1.0", work_dir=work, work_claim="poise-work",
                        model_claim="poise-model-cache", run_id="r1", node_id="n001")


def test_the_job_the_trainer_creates_passes_strict_validation_and_reaches_nothing(tmp_path):
    from trainer.verl.k8s_job import rbac_manifests

    validator = tool("kubernetes-validate")
    job = service_job(tmp_path)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump_all([job, *rbac_manifests("poise")]))
    result = run_tool(validator, "--strict", "--quiet", "-k", K8S_VERSION, str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 43200
    (container,) = pod["containers"]
    assert gpus(container) == 8 and container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "secret" not in json.dumps(pod).lower()
    # no network out, not even DNS: the cluster's policies select it to deny (the base's default deny), and the
    # only rule that applies lets Prometheus (namespace monitoring) in, as for every POISE pod (the template's too)
    labels = job["spec"]["template"]["metadata"]["labels"]
    policies = [obj for obj in objects("cluster") if obj["kind"] == "NetworkPolicy"
                and selects(obj["spec"]["podSelector"], labels)]
    assert any(p["spec"]["podSelector"] == {} for p in policies)
    egress = [p["metadata"]["name"] for p in policies if p["spec"].get("egress")]
    assert not egress, f"the training Job may reach out through {egress}"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert [peer.get("namespaceSelector") for peer in rule["from"]] == [
                {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}], policy["metadata"]["name"]


def test_strict_validation_catches_a_broken_job_manifest(tmp_path):
    validator = tool("kubernetes-validate")
    job = service_job(tmp_path)
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}  # "limits" misspelt
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    result = run_tool(validator, "--strict", "--quiet", "-k", K8S_VERSION, str(manifest))
    assert result.returncode != 0 and "limit" in result.stdout + result.stderr


def test_the_verl_jobs_component_validates_and_gives_the_trainer_jobs_and_nothing_more(tmp_path):
    from trainer.verl.k8s_job import SERVICE_ACCOUNT, rbac_manifests

    validator = tool("kubernetes-validate")
    manifest = tmp_path / "cluster-verl-jobs.yaml"
    manifest.write_text(rendered("cluster", (VERL_JOBS,)))
    result = run_tool(validator, "--strict", "--quiet", "-k", K8S_VERSION, str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = [doc for doc in yaml.safe_load_all((K8S_DIR / "components" / VERL_JOBS / "rbac.yaml").read_text())
               if doc]
    assert shipped == rbac_manifests("poise"), "k8s/components/verl-jobs/rbac.yaml: regenerate from rbac_manifests"
    default, opted = by_kind_and_name("cluster"), by_kind_and_name("cluster", (VERL_JOBS,))
    added = opted.keys() - default.keys()
    assert added == {("ServiceAccount", SERVICE_ACCOUNT), ("Role", "verl-jobs"), ("RoleBinding", "verl-jobs"),
                     ("NetworkPolicy", "trainer-kubernetes-api")}
    (rules,) = [opted["Role", "verl-jobs"]["rules"]]
    granted = {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert {(g, r) for g, r, _ in granted} == {("batch", "jobs"), ("batch", "jobs/status"), ("", "pods")}
    assert not any("*" in item for item in granted) and not {v for g, r, v in granted if r == "pods"} - {
        "get", "list", "watch"}, "pods: read only"
    binding = opted["RoleBinding", "verl-jobs"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": "poise"}]
    trainer = opted["Deployment", "trainer"]["spec"]["template"]
    spec, (container,) = trainer["spec"], trainer["spec"]["containers"]
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT and spec["automountServiceAccountToken"] is True
    assert gpus(container) == 0 and "nvidia.com/gpu" not in container["resources"].get("requests", {})
    assert {v["name"]: v.get("value") for v in container["env"]}["POISE_VERL_LAUNCHER"] == "kubernetes"
    assert trainer["metadata"]["labels"][CANDIDATE_LABEL] == "false", "the trainer no longer loads candidate code"
    for key in default.keys() - {("Deployment", "trainer")}:
        assert opted[key] == default[key], f"{key} changed by {VERL_JOBS}"
