"""The reflector bound to the bus: work.reflect → evt.reflected.

It reads the node, its first parent and the run's root through a read-only archive view, and passes the
run's seed noise (the SD of the root's Overall over its seeds, and how many) so verdicts are judged against
noise, not bootstrap width alone.

The run's config picks the reflector: the offline one (the default), or the LLM reflector when
`backends.llm_for("reflect")` names a model. Every agent-LLM request made while handling the message is
collected and attached to the event, so the archive books it on the node whatever the outcome.

An LLM reflection that fails — no valid answer after the repair rounds, an unreachable endpoint, or the run's
LLM budget spent — falls back to the offline reflection, its text opened by one line saying why. The node
is evaluated and its offline reflection is complete and measured; failing it would lose a trained and
evaluated candidate, and its score, to a problem with the commentary. The note keeps the fallback visible in
the archive, and `generator` says "offline".
"""

from __future__ import annotations

import logging

from poise.agents import Agents, default_agents
from poise.bus import Bus
from poise.contracts import EvtFailed, EvtReflected, Failure, Node, Phase, Reflection, RunConfig, WorkReflect
from poise.faults import fault_point
from poise.llm import LLMClient, LLMError, collect_calls
from poise.metrics import FAILED, observed
from poise.store import ArchiveStore
from reflector.core import reflect, root_noise
from reflector.llm_reflector import fallback_reflection, llm_reflect

log = logging.getLogger(__name__)


class ReflectorService:
    subject = WorkReflect.subject
    backend = "offline"

    def __init__(self, bus: Bus, archive: ArchiveStore, agents: Agents | None = None) -> None:
        self.bus = bus
        self.archive = archive
        self.agents = agents or default_agents()

    @observed("reflect")
    def handle(self, work: WorkReflect) -> str | None:
        fault_point("reflector.received", f"{work.run_id}/{work.node_id}")
        ids = {"run_id": work.run_id, "node_id": work.node_id, "attempt": work.attempt}
        with collect_calls() as calls:
            node = self.archive.get_node(work.run_id, work.node_id)
            if node is None:
                failure = Failure(phase=Phase.REFLECT, reason="node not in the archive")
                self.bus.publish(EvtFailed(**ids, failure=failure, llm_calls=calls))
                return FAILED
            parent = self.archive.get_node(work.run_id, work.parent_ids[0]) if work.parent_ids else None
            root_id = node.genealogy.ancestors[0] if node.genealogy.ancestors else node.node_id
            root = self.archive.get_node(work.run_id, root_id)
            reflection = self._reflect(node, parent, root, *root_noise(root))
        fault_point("reflector.publish", f"{work.run_id}/{work.node_id}")
        self.bus.publish(EvtReflected(**ids, reflection=reflection, llm_calls=calls))

    def _reflect(self, node: Node, parent: Node | None, root: Node | None, noise_sd: float | None,
                 noise_seeds: int | None) -> Reflection:
        """The LLM reflection when the run configures one, else (or when it fails) the offline reflection."""
        config = self.archive.get_run(node.run_id)
        client = self._client(config) if config is not None else None
        if client is None:
            return reflect(node, parent, root, noise_sd=noise_sd, noise_seeds=noise_seeds)
        try:
            return llm_reflect(client, node, parent, root, noise_sd, config, noise_seeds)
        except LLMError as err:
            log.warning("node %s: the LLM reflection failed, keeping the offline reflection: %s", node.node_id, err)
            return fallback_reflection(reflect(node, parent, root, noise_sd=noise_sd, noise_seeds=noise_seeds), err)

    def _client(self, config: RunConfig) -> LLMClient | None:
        """The run's reflect client, its meter seeded with what the run's nodes have spent; None when offline.

        The run's counters are read only for an LLM run with a cap (as the implementer does): without one the
        seed is never needed. They are a few numbers the archive keeps, not the run's documents."""
        if self.agents.spec(config, "reflect") == "offline":
            return None
        spent = self.archive.counters(config.run_id).llm_usd if config.llm_budget_usd is not None else None
        return self.agents.client(config, "reflect", spent_usd=spent)
