"""The V1 trainer extension: the candidate's estimator sees the testbed's batch keys under verl (docs/verl.md).

verl 0.9.1's V1 trainer calls an estimator with rewards, mask, uids and config only. The reward extras
(`format_valid`, from trainer/verl/reward.py), the old-policy token entropy and the reference log-probs are in
TransferQueue too; `PoiseTrainerSync._compute_advantage` fetches them for the step's rows (in the order of
`batch.keys`, the order verl's own method uses), hands them to the plugin's estimator, runs verl's method unchanged,
and logs the candidate's advantage metrics under `poise/adv/`.

Heavy (the V1 trainer, TransferQueue): imported only in the TaskRunner, by trainer/verl/main.py. Importing it
installs the class under verl's mode name "sync": verl branches on that literal, so a new name would silently
switch to asynchronous behaviour.
"""

from __future__ import annotations

from typing import Any

import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from trainer.verl import plugin
from trainer.verl.batch import STEP_FIELDS, step_fields

METRIC_PREFIX = "poise/adv/"


class PoiseTrainerSync(PPOTrainerSync):
    """verl's synchronous V1 trainer, with the POISE batch for the `poise` advantage estimator."""

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        if self.config.algorithm.adv_estimator != plugin.ADV_ESTIMATOR:
            return super()._compute_advantage(batch, metrics)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(STEP_FIELDS))
        plugin.stage_step_fields(**step_fields(data))
        try:
            batch = super()._compute_advantage(batch, metrics)
            metrics.update({f"{METRIC_PREFIX}{key}": value for key, value in plugin.ADVANTAGE_METRICS.items()})
            return batch
        finally:
            plugin.clear_step_fields()


TRAINER_REGISTRY["sync"] = PoiseTrainerSync
