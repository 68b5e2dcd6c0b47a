"""`python -m trainer.verl.main <hydra overrides>`: verl's `main_ppo` with the POISE trainer extension (docs/verl.md).

The same Hydra configuration and validation as `python -m verl.trainer.main_ppo`; the only difference is the
TaskRunner, which imports trainer/verl/trainer.py (installing `PoiseTrainerSync` as verl's "sync" trainer) in its
own process before verl picks the trainer class. The plugin and the candidate still come through
`VERL_USE_EXTERNAL_MODULES` / `POISE_CANDIDATE_MODULE` in the Ray runtime environment (trainer/verl/plugin.py).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import ray
import verl.trainer.main_ppo as main_ppo
from omegaconf import DictConfig

CONFIG_DIR = str(Path(main_ppo.__file__).parent / "config")


class _PoiseTaskRunner(main_ppo.TaskRunnerV1.__ray_actor_class__):  # the class under verl's @ray.remote
    def run(self, config: DictConfig) -> None:
        import trainer.verl.trainer  # noqa: F401 - installs PoiseTrainerSync in this process (the TaskRunner)

        return super().run(config)


PoiseTaskRunner = ray.remote(_PoiseTaskRunner)


@hydra.main(config_path=CONFIG_DIR, config_name="ppo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    if not config.trainer.use_v1:
        raise SystemExit("trainer.verl.main runs verl's V1 trainer only: drop trainer.use_v1=False")
    main_ppo.run_ppo(config, task_runner_class=PoiseTaskRunner)


if __name__ == "__main__":
    main()
