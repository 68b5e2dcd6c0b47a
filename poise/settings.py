"""What a service reads from its environment in distributed mode (`poise serve`): `POISE_*` variables.

Every variable is optional; the default hosts suit docker compose (service names as hosts), and each service
has an HTTP port of its own (`SERVICE_PORTS`), so that services started by hand on one machine do not collide
(compose and k8s set POISE_HTTP_PORT=8000 in every container). An empty variable counts as unset, so compose
files can pass `POISE_MONGO_URL: ${MONGO_URL:-}`. Bad values are refused at start-up with one line per variable
(`load_settings` raises `SettingsError`), never deep inside a handler.

Credentials (docs/operations.md, "Authentication") come from a file (`POISE_<NAME>_FILE`, a mounted secret) or
the variable itself, never both: the archive API's write token and optional read token, and the service's NATS
password (its user is poise-<service> unless POISE_NATS_USER says otherwise). Each file is read at start-up; one
that cannot be read is refused like any bad value.

The archive also reads the run it owns: `POISE_RUN_ID` and, optionally, any `RunConfig` setting
(`POISE_BUDGET`, `POISE_PARALLEL`, `POISE_SEED`, `POISE_PROTOCOL`, ...). Without `POISE_RUN_ID` it waits
for `POST /api/runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from poise.contracts import Backends, RunConfig, parse_llm_spec
from poise.credentials import MIN_TOKEN_CHARS, CredentialError, read_secret

ENV_PREFIX = "POISE_"
# `poise serve SERVICE` and the port it serves HTTP on without POISE_HTTP_PORT: one each, clear of `poise ui` (8420)
SERVICE_PORTS = {"archive": 8400, "proposer": 8401, "implementer": 8402, "trainer": 8403, "evaluator": 8404,
                 "reflector": 8405}
SERVICES = tuple(SERVICE_PORTS)
# credentials: each may come from POISE_<NAME> or from the file POISE_<NAME>_FILE names
SECRET_SETTINGS = ("archive_token", "archive_read_token", "nats_password")
TOKEN_SETTINGS = ("archive_token", "archive_read_token")  # one token a line (several while one is rotated out)
# RunConfig settings the archive takes from the environment (POISE_<NAME>); run_id names the run.
RUN_SETTINGS = ("budget", "parallel", "seed", "protocol", "parent_selection", "root_seeds", "replicate_seeds",
                "max_correction_attempts", "gpu_hours_budget")


class SettingsError(ValueError):
    """The environment does not describe a service that can start; the message names each bad variable."""


def _scheme(url: str, schemes: tuple[str, ...], what: str) -> str:
    if not url.startswith(tuple(f"{s}://" for s in schemes)):
        raise ValueError(f"{what} must start with {' or '.join(f'{s}://' for s in schemes)}, got {url!r}")
    return url


class ServiceSettings(BaseSettings):
    """One service's settings; the variable of each field is POISE_<FIELD> (e.g. POISE_NATS_URL)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore")

    nats_url: str = Field("nats://nats:4222", description="NATS server(s), comma-separated")
    mongo_url: str | None = Field(None, description="the archive's MongoDB; unset: SQLite under work_dir")
    work_dir: Path = Field(Path("/var/lib/poise"), description="shared volume: node directories, checkpoints")
    archive_url: str = Field(f"http://archive:{SERVICE_PORTS['archive']}",
                             description="the archive's HTTP API, for proposer, implementer and reflector")
    http_host: str = "0.0.0.0"
    http_port: int | None = Field(None, ge=0, le=65535, description="/healthz, /metrics and (archive) /api/; 0: any "
                                  "free; unset: the service's own port (SERVICE_PORTS)")
    trainer_backend: Literal["testbed", "verl"] = "testbed"
    evaluator_backend: Literal["testbed", "vllm"] = "testbed"
    vllm_url: str | None = Field(None, description="evaluator with vllm: a vLLM server someone else runs (dev mode "
                                 "on, reads the checkpoints); unset: the evaluator starts its own (docs/evaluation.md)")
    vllm_command: str | None = Field(None, description="evaluator with vllm and no URL: the command that starts a "
                                     "server, with {python} {model} {port} {served_name} (default: "
                                     "evaluator/vllm_server.py DEFAULT_COMMAND)")
    vllm_python: str | None = Field(None, description="the interpreter that has vLLM (default: .vllm-venv, else "
                                    "this one)")
    vllm_startup_timeout_s: float = Field(600.0, gt=0, description="how long a started vLLM server may take to "
                                          "answer /health")
    vllm_concurrency: int = Field(8, ge=1, description="vLLM requests in flight at once")
    vllm_request_timeout_s: float = Field(600.0, gt=0, description="one vLLM request (n samples of one prompt)")
    bench_data: str | None = Field(None, description="directory of the benchmark files (poise/benchmarks)")
    llm: str | None = Field(None, description="agent LLM spec (offline, anthropic:<model>, openai:<url>#<model>)")
    ack_wait_s: float = Field(300.0, gt=0, description="JetStream ack wait; handlers heartbeat within it")
    max_deliver: int = Field(3, ge=1, description="deliveries of a message before it is dead-lettered")
    nak_delay_s: float = Field(10.0, ge=0, description="delay before a failed message is redelivered")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long the current handler may finish")
    verify_wall_s: float = Field(120.0, gt=0, description="implementer: wall limit of one sandboxed verification")
    train_wall_s: float | None = Field(None, gt=0, description="trainer: wall limit of one sandboxed training run "
                                       "(default: trainer/testbed_runner.py training_limits, 30 s per protocol step "
                                       "+ 300 s)")
    # the VERL trainer (POISE_TRAINER_BACKEND=verl, docs/verl.md)
    verl_protocol: str = Field("paper", description="trainer with verl: the GPU protocol, a name under "
                               "trainer/verl/protocols/ or a path to a .toml file")
    base_model: str = Field("Qwen/Qwen2.5-Math-1.5B", description="trainer with verl: the base model, a local "
                            "directory or a hub id found in the offline cache (HF_HOME)")
    verl_train_files: str | None = Field(None, description="trainer with verl: training parquet file(s), "
                                         "comma-separated (default: POISE_WORK_DIR/data/train.parquet)")
    verl_val_files: str | None = Field(None, description="trainer with verl: validation parquet file(s) "
                                       "(default: POISE_WORK_DIR/data/val.parquet)")
    verl_launcher: Literal["process", "kubernetes"] = Field("process", description="trainer with verl: a process "
                                                            "group on this machine's GPUs, or a Kubernetes Job per "
                                                            "candidate")
    verl_python: str | None = Field(None, description="trainer with verl: the interpreter that has verl (default: "
                                    "this one)")
    verl_namespace: str | None = Field(None, description="kubernetes launcher: the Jobs' namespace (default: the "
                                       "pod's own)")
    verl_image: str | None = Field(None, description="kubernetes launcher: the Jobs' image (the GPU image)")
    verl_work_claim: str = Field("poise-work", description="kubernetes launcher: the PVC of POISE_WORK_DIR")
    verl_model_claim: str | None = Field("poise-model-cache", description="kubernetes launcher: the PVC of the "
                                         "model cache, mounted read-only at /models")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    archive_token: SecretStr | None = Field(None, description="the archive API's write token: the archive refuses "
                                            "POST /api/runs without it (unset: it refuses every write)")
    archive_token_file: Path | None = Field(None, description="a file holding archive_token (a mounted secret)")
    archive_read_token: SecretStr | None = Field(None, description="the archive API's read token (unset: reads "
                                                 "are open); proposer, implementer and reflector send it")
    archive_read_token_file: Path | None = Field(None, description="a file holding archive_read_token")
    nats_user: str | None = Field(None, description="the NATS user (default: poise-<service>, poise/nats_auth.py)")
    nats_password: SecretStr | None = Field(None, description="the NATS user's password (unset: no credentials)")
    nats_password_file: Path | None = Field(None, description="a file holding nats_password")

    run_id: str | None = Field(None, description="archive: the run to start or resume at start-up")
    budget: int | None = None
    parallel: int | None = None
    seed: int | None = None
    protocol: str | None = None
    parent_selection: str | None = None
    root_seeds: int | None = None
    replicate_seeds: int | None = None
    max_correction_attempts: int | None = None
    gpu_hours_budget: float | None = Field(None, ge=0, description="archive: the run stops proposing once its "
                                           "trainings have held GPUs this many GPU-hours (as `poise run "
                                           "--gpu-hours-budget`)")

    @field_validator("nats_url")
    @classmethod
    def _check_nats_url(cls, url: str) -> str:
        for server in url.split(","):
            _scheme(server.strip(), ("nats", "tls", "ws", "wss"), "each NATS server")
        return url

    @field_validator("mongo_url")
    @classmethod
    def _check_mongo_url(cls, url: str | None) -> str | None:
        return None if url is None else _scheme(url, ("mongodb", "mongodb+srv"), "the MongoDB URL")

    @field_validator("archive_url", "vllm_url")
    @classmethod
    def _check_http_url(cls, url: str | None) -> str | None:
        return None if url is None else _scheme(url, ("http", "https"), "the URL").rstrip("/")

    @field_validator("llm")
    @classmethod
    def _check_llm(cls, llm: str | None) -> str | None:
        if llm is not None:
            parse_llm_spec(llm)
        return llm

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _read_secret_files(self) -> ServiceSettings:
        """Each credential from its variable or its file, never both; a token long enough to resist guessing."""
        problems = []
        for name in SECRET_SETTINGS:
            variable, path = ENV_PREFIX + name.upper(), getattr(self, f"{name}_file")
            if path is not None:
                if getattr(self, name) is not None:
                    problems.append(f"{variable} and {variable}_FILE are both set; keep one")
                    continue
                try:
                    setattr(self, name, SecretStr(read_secret(path, f"{variable}_FILE")))
                except CredentialError as err:
                    problems.append(str(err))
                    continue
            value = getattr(self, name)
            tokens = value.get_secret_value().split() if value is not None and name in TOKEN_SETTINGS else []
            if any(len(token) < MIN_TOKEN_CHARS for token in tokens):
                problems.append(f"{variable}: a token of fewer than {MIN_TOKEN_CHARS} characters is too easy to "
                                "guess; `poise secrets` makes one")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> ServiceSettings:
        given = self.run_settings()
        if given and self.run_id is None:
            names = ", ".join(ENV_PREFIX + k.upper() for k in given)
            raise ValueError(f"{names} set without POISE_RUN_ID; name the run they describe")
        self.run_config()  # a run described by the environment must be a valid RunConfig now, not later
        return self

    def verl_files(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(training, validation) parquet files of the VERL trainer, as absolute paths."""
        def split(value: str | None, default: str) -> tuple[str, ...]:
            names = [v.strip() for v in (value or str(self.work_dir / "data" / default)).split(",") if v.strip()]
            return tuple(str(Path(name).absolute()) for name in names)

        return split(self.verl_train_files, "train.parquet"), split(self.verl_val_files, "val.parquet")

    def port_of(self, service: str) -> int:
        """Where `service` serves HTTP: POISE_HTTP_PORT, else the service's own port."""
        return SERVICE_PORTS[service] if self.http_port is None else self.http_port

    def nats_credentials(self, service: str) -> tuple[str | None, str | None]:
        """(user, password) `service` connects to NATS with; (None, None) without a password."""
        if self.nats_password is None:
            return None, None
        from poise.nats_auth import user_of

        return self.nats_user or user_of(service), self.nats_password.get_secret_value()

    def run_settings(self) -> dict[str, object]:
        """The RunConfig settings given in the environment (not the defaults)."""
        return {k: getattr(self, k) for k in RUN_SETTINGS if getattr(self, k) is not None}

    def backends(self) -> Backends:
        return Backends(trainer=self.trainer_backend, evaluator=self.evaluator_backend,
                        store="mongo" if self.mongo_url else "sqlite", bus="nats", llm=self.llm or "offline")

    def run_config(self) -> RunConfig | None:
        """The run the environment describes (POISE_RUN_ID and settings), or None without POISE_RUN_ID."""
        if self.run_id is None:
            return None
        try:
            return RunConfig(run_id=self.run_id, **self.run_settings(), backends=self.backends())
        except ValidationError as err:
            raise ValueError("the run described by the environment is invalid: " + "; ".join(
                f"{ENV_PREFIX}{str(e['loc'][-1]).upper()}: {e['msg']}" for e in err.errors())) from None


def load_settings(**overrides: object) -> ServiceSettings:
    """The settings from the environment (`overrides` win), or SettingsError naming every bad variable."""
    try:
        return ServiceSettings(**overrides)
    except ValidationError as err:
        raise SettingsError("invalid service settings:\n" + "\n".join(_describe(e) for e in err.errors())) from None


def _describe(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a whole-settings check: the message names its variables
        return f"  {message}"
    variable = ENV_PREFIX + ".".join(map(str, error["loc"])).upper()
    return f"  {variable}={error['input']!r}: {message}"
