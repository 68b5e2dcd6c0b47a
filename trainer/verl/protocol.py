"""The GPU training protocol as data, rendered into VERL 0.9.1's Hydra overrides (docs/verl.md).

A protocol is a TOML file under trainer/verl/protocols/ (shipped as package data): the paper's settings for
every candidate of a run (learning rate, batch, group size, epochs, token limits, GPUs, deadline, early-abort
thresholds). What belongs to the machine, the base model and the data files, comes from the settings
(POISE_BASE_MODEL, POISE_VERL_TRAIN_FILES, POISE_VERL_VAL_FILES), never from the file.

`hydra_overrides` renders protocol + inputs into the arguments of `python -m trainer.verl.main` (VERL's main_ppo
with the POISE trainer extension, same configuration); the POISE plugin reaches every Ray process of the run
through VERL's external-modules mechanism (VERL_USE_EXTERNAL_MODULES, also put into Ray's runtime env), and finds
the candidate's file through POISE_CANDIDATE_MODULE. `validate_overrides` composes VERL's `ppo_trainer` config
with those overrides through Hydra's compose API and runs VERL's `validate_config` on it, so a protocol VERL
would refuse is refused here, before a GPU is asked for.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poise.early_abort import AbortRules

PROTOCOL_DIR = Path(__file__).with_name("protocols")
DEFAULT_PROTOCOL = "paper"
ENTRY_MODULE = "trainer.verl.main"  # VERL's main_ppo with the POISE trainer extension (trainer/verl/main.py)
PLUGIN_MODULE = "trainer.verl.plugin"             # registers the estimator and the loss in every Ray process
CANDIDATE_ENV = "POISE_CANDIDATE_MODULE"  # the candidate's .py file, an absolute path (trainer/verl/plugin.py)
EXTERNAL_MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"  # verl/__init__.py imports each module listed here
FILE_LOGGER_ENV = "VERL_FILE_LOGGER_PATH"         # where VERL's FileLogger writes the metrics JSONL
ADV_ESTIMATOR = "poise"                           # the names the plugin registers its estimator and loss under
LOSS_MODE = "poise"
REWARD_FILE = "trainer/verl/reward.py"           # under the code root: VERL loads it by path in its reward workers
REWARD_FUNCTION = "compute_score"
CODE_ROOT = Path(__file__).resolve().parents[2]   # the checkout (or site-packages) that holds trainer/
# under the node's training directory
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "ckpt"
CANDIDATE_DIR = "candidate"
HF_DIR = "hf"                                     # the merged Hugging Face weights the evaluator serves


class ProtocolError(ValueError):
    """A protocol file (or what it renders to) VERL would refuse; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Training(_Section):
    lr: float = Field(gt=0, le=1e-2)
    train_batch_size: int = Field(ge=1, description="prompts per step (the global batch)")
    ppo_mini_batch_size: int = Field(ge=1, description="prompts per optimizer update")
    ppo_epochs: int = Field(1, ge=1)
    group_size: int = Field(ge=2, description="G responses per prompt (a group of one has no baseline)")
    total_epochs: int = Field(ge=1)
    total_training_steps: int | None = Field(None, ge=1, description="cut the run at this many steps")
    max_prompt_length: int = Field(ge=1)
    max_response_length: int = Field(ge=1)
    temperature: float = Field(1.0, gt=0)
    use_kl_loss: bool = True
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"] = "low_var_kl"
    kl_loss_coef: float = Field(0.001, ge=0)
    entropy_coeff: float = 0.0
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] \
        = "token-mean"
    clip_ratio_low: float = Field(0.2, ge=0)
    clip_ratio_high: float = Field(0.2, ge=0)
    ppo_max_token_len_per_gpu: int = Field(ge=1)
    rollout_gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    rollout_tensor_parallel_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _batches_fit(self) -> Training:
        if self.ppo_mini_batch_size > self.train_batch_size or self.train_batch_size % self.ppo_mini_batch_size:
            raise ValueError(f"ppo_mini_batch_size {self.ppo_mini_batch_size} must divide train_batch_size "
                             f"{self.train_batch_size}")
        if self.ppo_max_token_len_per_gpu < self.max_prompt_length + self.max_response_length:
            raise ValueError(f"ppo_max_token_len_per_gpu {self.ppo_max_token_len_per_gpu} is below one sequence "
                             f"({self.max_prompt_length} + {self.max_response_length} tokens)")
        return self


class Resources(_Section):
    nnodes: int = Field(1, ge=1, le=1, description="one node per run (the Job is one pod)")
    gpus_per_node: int = Field(ge=1, le=16)
    deadline_s: float = Field(gt=0, le=7 * 86400, description="the launcher kills the run after this long")
    cpu: str = "8"
    memory: str = "64Gi"
    shm: str = "16Gi"

    @property
    def gpus(self) -> int:
        return self.nnodes * self.gpus_per_node


class Abort(_Section):
    kl: float = Field(gt=0)
    format_valid: float = Field(ge=0, le=1)
    patience: int = Field(ge=1)


class GpuProtocol(_Section):
    """A named GPU protocol (one TOML file); `sha256` identifies its settings."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    training: Training
    resources: Resources
    abort: Abort

    def abort_rules(self) -> AbortRules:
        return AbortRules(kl=self.abort.kl, format_valid=self.abort.format_valid, patience=self.abort.patience)

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def protocol_names() -> list[str]:
    return sorted(path.stem for path in PROTOCOL_DIR.glob("*.toml"))


def load_gpu_protocol(name: str) -> GpuProtocol:
    """The shipped protocol `name` (trainer/verl/protocols/<name>.toml), or a path to a TOML file."""
    path = Path(name) if name.endswith(".toml") else PROTOCOL_DIR / f"{name}.toml"
    if not path.is_file():
        raise ProtocolError(f"no GPU protocol {name!r}: {path} does not exist; one of {', '.join(protocol_names())}, "
                            "or a path to a .toml file (POISE_VERL_PROTOCOL)")
    return parse_gpu_protocol(path.read_text(encoding="utf-8"), source=str(path))


def parse_gpu_protocol(text: str, source: str = "<protocol>") -> GpuProtocol:
    """A protocol from TOML text; ProtocolError naming every bad field (as section.field)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProtocolError(f"GPU protocol {source} is not valid TOML: {err}") from None
    try:
        return GpuProtocol.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise ProtocolError(f"GPU protocol {source} refused: {problems}") from None


# --------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class TrainInputs:
    """What one run needs beside the protocol: the machine's model and data, the candidate, where to write."""

    model_path: str                  # a local directory or a hub id resolvable offline (HF_HOME cache)
    train_files: tuple[str, ...]     # parquet files, absolute paths
    val_files: tuple[str, ...]
    candidate_module: str            # importable from candidate_dir
    candidate_dir: Path
    run_dir: Path                    # the node's training directory: metrics, checkpoint, Hydra's files
    experiment_name: str
    seed: int = 0
    code_root: Path = CODE_ROOT

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR


_PLAIN = re.compile(r"^[A-Za-z0-9_./@+-]+$")


def hydra_value(value: Any) -> str:
    """One value as Hydra's override grammar reads it back unchanged: lists in brackets, other strings quoted
    unless plain (a path with ':' or ',' would otherwise be parsed as something else)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_env(inputs: TrainInputs) -> dict[str, str]:
    """The environment every process of the run needs: the plugin (imported by `import verl`), the candidate,
    where the metrics go, and a PYTHONPATH that reaches POISE's code and the candidate's directory."""
    return {
        EXTERNAL_MODULES_ENV: PLUGIN_MODULE,
        CANDIDATE_ENV: str(inputs.candidate_dir / f"{inputs.candidate_module}.py"),
        FILE_LOGGER_ENV: str(inputs.metrics_path),
        "PYTHONPATH": f"{inputs.code_root}:{inputs.candidate_dir}",
    }


def hydra_overrides(protocol: GpuProtocol, inputs: TrainInputs) -> list[str]:
    """VERL 0.9.1 Hydra overrides for one run of `protocol` (research notes §6; docs/verl.md)."""
    t, r = protocol.training, protocol.resources
    files = {"data.train_files": list(inputs.train_files), "data.val_files": list(inputs.val_files)}
    settings: dict[str, Any] = {
        "algorithm.adv_estimator": ADV_ESTIMATOR,
        "algorithm.norm_adv_by_std_in_grpo": True,
        "algorithm.use_kl_in_reward": False,
        **{key: value[0] if len(value) == 1 else value for key, value in files.items()},
        "data.train_batch_size": t.train_batch_size,
        "data.max_prompt_length": t.max_prompt_length,
        "data.max_response_length": t.max_response_length,
        "data.filter_overlong_prompts": True,
        "data.truncation": "error",
        "data.seed": inputs.seed,
        "actor_rollout_ref.model.path": inputs.model_path,
        "actor_rollout_ref.model.use_remove_padding": True,
        "actor_rollout_ref.model.enable_gradient_checkpointing": True,
        "actor_rollout_ref.actor.optim.lr": t.lr,
        "actor_rollout_ref.actor.ppo_mini_batch_size": t.ppo_mini_batch_size,
        "actor_rollout_ref.actor.ppo_epochs": t.ppo_epochs,
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": t.ppo_max_token_len_per_gpu,
        "actor_rollout_ref.actor.policy_loss.loss_mode": LOSS_MODE,
        "actor_rollout_ref.actor.loss_agg_mode": t.loss_agg_mode,
        "actor_rollout_ref.actor.clip_ratio_low": t.clip_ratio_low,
        "actor_rollout_ref.actor.clip_ratio_high": t.clip_ratio_high,
        "actor_rollout_ref.actor.use_kl_loss": t.use_kl_loss,
        "actor_rollout_ref.actor.kl_loss_type": t.kl_loss_type,
        "actor_rollout_ref.actor.kl_loss_coef": t.kl_loss_coef,
        "actor_rollout_ref.actor.entropy_coeff": t.entropy_coeff,
        # full HF weights beside the shards; the model merger (trainer/verl/launch.py) still runs when absent
        "actor_rollout_ref.actor.checkpoint.save_contents": ["model", "hf_model"],
        "actor_rollout_ref.ref.fsdp_config.param_offload": True,
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.n": t.group_size,
        "actor_rollout_ref.rollout.temperature": t.temperature,
        "actor_rollout_ref.rollout.top_p": 1.0,
        "actor_rollout_ref.rollout.top_k": -1,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": t.rollout_tensor_parallel_size,
        "actor_rollout_ref.rollout.gpu_memory_utilization": t.rollout_gpu_memory_utilization,
        "reward.custom_reward_function.path": str(inputs.code_root / REWARD_FILE),
        "reward.custom_reward_function.name": REWARD_FUNCTION,
        "trainer.use_v1": True,
        "trainer.v1.trainer_mode": "sync",
        "trainer.total_epochs": t.total_epochs,
        "trainer.nnodes": r.nnodes,
        "trainer.n_gpus_per_node": r.gpus_per_node,
        "trainer.logger": ["console", "file"],
        "trainer.project_name": "poise",
        "trainer.experiment_name": inputs.experiment_name,
        "trainer.default_local_dir": str(inputs.checkpoint_dir),
        "trainer.resume_mode": "disable",
        "trainer.save_freq": 1_000_000,  # > 0: the last step is always saved (-1 saves nothing)
        "trainer.test_freq": -1,
        "trainer.val_before_train": False,
        "hydra.run.dir": str(inputs.run_dir / "hydra"),
    }
    if t.total_training_steps is not None:
        settings["trainer.total_training_steps"] = t.total_training_steps
    overrides = [f"{key}={hydra_value(value)}" for key, value in settings.items()]
    # new keys need '+': the Ray runtime env of every process (env vars given only to the driver may miss a
    # Ray cluster started elsewhere)
    overrides += [f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}={hydra_value(value)}"
                  for key, value in run_env(inputs).items()]
    return overrides


def launch_command(protocol: GpuProtocol, inputs: TrainInputs, python: str = sys.executable) -> list[str]:
    return [python, "-m", ENTRY_MODULE, *hydra_overrides(protocol, inputs)]


# ---------------------------------------------------------------------------------------------- validation

_compose_lock = threading.Lock()  # Hydra's global state: one composition at a time


def verl_config_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ProtocolError("verl is not installed in this interpreter; the VERL trainer needs verl==0.9.1 "
                            "(pip install '.[gpu]', or the poise-gpu image)")
    return Path(next(iter(spec.submodule_search_locations))) / "trainer" / "config"


def validate_overrides(overrides: list[str]) -> Any:
    """Compose VERL's `ppo_trainer` config with `overrides` and run VERL's `validate_config` on it, as
    `verl.trainer.main_ppo.main` would; the composed config (a DictConfig), or ProtocolError with VERL's
    reason. Hydra's own keys (hydra.*) are left out: compose has no run directory."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = verl_config_dir()
    wanted = [o for o in overrides if not o.startswith("hydra.")]
    with _compose_lock:
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base=None):
                config = compose(config_name="ppo_trainer", overrides=wanted)
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise ProtocolError(f"VERL's config composition refused the rendered protocol: {_one_line(err)}") from None
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    try:
        _check_types(config)
        validate_config(config=config, use_reference_policy=need_reference_policy(config),
                        use_critic=need_critic(config))
    except (AssertionError, ValueError, TypeError, KeyError, OmegaConfBaseException, HydraException) as err:
        raise ProtocolError(f"VERL's validate_config refused the rendered protocol: {_one_line(err)}") from None
    return config


# keys VERL reads as numbers: compose does not type-check (VERL's yaml is untyped), so a string slipping
# through would fail deep inside a Ray actor on the GPU machine instead of here
_NUMERIC_KEYS = ("data.train_batch_size", "data.max_prompt_length", "data.max_response_length",
                 "actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.actor.ppo_mini_batch_size",
                 "actor_rollout_ref.rollout.n", "trainer.n_gpus_per_node", "trainer.nnodes", "trainer.total_epochs")


def _check_types(config: Any) -> None:
    from omegaconf import OmegaConf

    for key in _NUMERIC_KEYS:
        value = OmegaConf.select(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
