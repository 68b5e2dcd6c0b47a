"""Lineage prioritization reads the archive as it stood when the archive asked for the child (proposer/parents.py).

The archive stamps every stored evaluation with its run's evaluation clock and sends the clock with each
`work.propose`; the proposer hides what was stored after it. So the parent of a child does not depend on when the
proposer gets to the request (in embedded mode, after the candidates ahead of it finished).
"""

from __future__ import annotations

from test_selection import RUN, Archive

from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore
from poise.bus import InProcBus
from poise.contracts import EvtEvaluated, Node, NodeStatus, RunConfig, WorkPropose
from proposer.parents import as_of, choose_parent


def stamped(node, seq: int, replicate_seqs: tuple[int, ...] = ()):
    evaluation = node.evaluation.model_copy(update={"archive_seq": seq})
    replicates = [r.model_copy(update={"archive_seq": s}) for r, s in zip(node.replicates, replicate_seqs,
                                                                         strict=True)]
    return node.model_copy(update={"evaluation": evaluation, "replicates": replicates})


def archive_of_three():
    """root (0.40, three seeds: the last two stored after the request), a (0.50, stored before), b (0.90, after)."""
    archive = Archive()
    root = stamped(archive.add("n000", 0.40, replicates=(0.10, 0.10)), 1, (3, 4))
    a = stamped(archive.add("n001", 0.50, parent="n000"), 2)
    b = stamped(archive.add("n002", 0.90, parent="n000"), 5)
    return [root, a, b]


def test_the_view_hides_evaluations_and_replicates_stored_after_the_request():
    root, a, b = as_of(archive_of_three(), 2)
    assert root.evaluation is not None and root.replicates == []
    assert a.evaluation is not None
    assert b.evaluation is None and b.reflection is None
    assert as_of(archive_of_three(), None) == archive_of_three()  # no clock: the archive as it is


def test_greedy_chooses_the_best_node_the_archive_held_when_it_asked():
    nodes = archive_of_three()
    config = RunConfig(run_id="r", parent_selection="greedy")
    assert choose_parent(nodes, config, "n003").node_id == "n002"  # everything counts: b is best
    # as of two evaluations: b was not evaluated and the root had one seed (0.40), so a (0.50) wins
    assert choose_parent(nodes, config, "n003", evaluations=2).node_id == "n001"
    # as of four: the root's two low replicates count (mean 0.20), b still unknown
    assert choose_parent(nodes, config, "n003", evaluations=4).node_id == "n001"


def test_evaluations_without_a_stamp_stay_visible():
    archive = Archive()
    nodes = [archive.add("n000", 0.4), archive.add("n001", 0.9, parent="n000")]
    config = RunConfig(run_id="r", parent_selection="greedy")
    assert choose_parent(nodes, config, "n002", evaluations=0).node_id == "n001"


def test_the_archive_stamps_evaluations_and_sends_its_clock_with_each_request(tmp_path):
    archive = Archive()
    root = archive.add("n000", 0.4)
    store = SQLiteStore(tmp_path / "archive.db")
    config = RunConfig(run_id=RUN, budget=2, parallel=2, root_seeds=1)
    store.put_run(config)
    store.insert_node(Node(**{**dict(root), "status": NodeStatus.TRAINED, "evaluation": None, "replicates": []}))
    bus = InProcBus()
    asked: list[WorkPropose] = []
    bus.subscribe("work.propose", asked.append)
    service = ArchiveService(bus, store, config)
    service.start()
    service.handle(EvtEvaluated(run_id=RUN, node_id="n000", evaluation=root.evaluation))
    while bus.step():
        pass
    stored = store.get_node(RUN, "n000")
    assert stored.evaluation.archive_seq == 1
    assert [(w.node_id, w.as_of) for w in asked] == [("n001", 1), ("n002", 1)]
    # a redelivered evaluation is a duplicate: the clock does not move
    service.handle(EvtEvaluated(run_id=RUN, node_id="n000", evaluation=root.evaluation))
    assert store.get_node(RUN, "n000").evaluation.archive_seq == 1
    store.close()
