"""Integrity of rewards and training records, and accurate failure reasons (docs/sandbox.md, "Integrity of
rewards and records"): hostile candidates that write into their inputs, replace the grader or other trusted
code, exit at import or in a call, or print a forged result, in real sandboxed children."""

from __future__ import annotations

import json

import pytest
import torch

from implementer.core import sandbox_verifier
from poise.algorithm import (
    Tampering,
    load_candidate,
    module_hparams,
    run_advantages,
    run_policy_loss,
    structural_check,
    synthetic_rollout,
)
from poise.algorithms import REFERENCE_ALGORITHMS, reference_algorithm
from poise.contracts import ProbePayload, ProbeReport, SandboxLimits
from poise.integrity import CandidateGuard
from poise.sandbox import SandboxResult, run_sandboxed
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol
from trainer.testbed_runner import train_candidate

GRPO = reference_algorithm("grpo").source()
ONE_STEP = get_protocol("tiny").replace(steps=1)
TWO_STEPS = get_protocol("tiny").replace(steps=2)


def in_advantages(body: str, prelude: str = "") -> str:
    """GRPO whose compute_advantages first runs `body`; `prelude` goes at the top of the module."""
    indented = "".join(f"    {line}\n" for line in body.strip().splitlines())
    return prelude + GRPO.replace("def compute_advantages(batch):\n", "def compute_advantages(batch):\n" + indented)


def in_loss(body: str, prelude: str = "") -> str:
    indented = "".join(f"    {line}\n" for line in body.strip().splitlines())
    signature = "def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):\n"
    assert signature in GRPO
    return prelude + GRPO.replace(signature, signature + indented)


def at_import(body: str) -> str:
    return body.strip() + "\n" + GRPO


def line_of(source: str, text: str) -> int:
    """The 1-based line of `source` that holds `text` (the candidate's own numbering)."""
    return next(number for number, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def base():
    return base_checkpoint()


# ------------------------------------------------------------------------------------ inputs are read-only


@pytest.mark.parametrize("source, function, named", [
    (in_advantages("batch['scores'].fill_(1.0)"), "compute_advantages", "batch['scores']"),
    (in_advantages("batch['token_level_rewards'][:, -1] = 1.0"), "compute_advantages", "batch['token_level_rewards']"),
    (in_advantages("batch['response_mask'].mul_(0.0)"), "compute_advantages", "batch['response_mask']"),
    (in_loss("old_log_prob.zero_()"), "policy_loss", "old_log_prob"),
    (in_loss("advantages.data.fill_(1.0)"), "policy_loss", "advantages"),  # .data: no autograd version bump
    (in_loss("batch['format_valid'].add_(1.0)"), "policy_loss", "batch['format_valid']"),
], ids=["scores", "token_level_rewards", "response_mask", "old_log_prob", "advantages.data", "format_valid"])
def test_a_candidate_that_writes_into_an_input_fails_naming_it_and_the_harnesss_tensors_are_intact(
        source, function, named):
    module = load_candidate(source)
    rollout = synthetic_rollout(hparams=module_hparams(module), seed=5)
    kept = {key: value.clone() for key, value in rollout.batch.items() if isinstance(value, torch.Tensor)}
    old_log_prob = rollout.old_log_prob.clone()
    with pytest.raises(Tampering) as raised:
        advantages, _ = run_advantages(module, rollout.batch)
        run_policy_loss(module, rollout.log_prob, rollout.old_log_prob, advantages, rollout.batch["response_mask"],
                        rollout.batch)
    assert str(raised.value).startswith(f"tampering: {function} wrote into its input {named} in place")
    assert all(torch.equal(rollout.batch[key], value) for key, value in kept.items())
    assert torch.equal(rollout.old_log_prob, old_log_prob)


def test_the_copies_a_candidate_gets_keep_the_gradient_to_log_prob():
    module = load_candidate(GRPO)
    rollout = synthetic_rollout(hparams=module_hparams(module), seed=2)
    log_prob = rollout.log_prob.clone().requires_grad_(True)
    advantages, _ = run_advantages(module, rollout.batch)
    loss_mat, _ = run_policy_loss(module, log_prob, rollout.old_log_prob, advantages, rollout.batch["response_mask"],
                                  rollout.batch)
    (grad,) = torch.autograd.grad(loss_mat.sum(), log_prob)
    assert grad.abs().sum() > 0


def test_every_reference_algorithm_passes_its_checks_under_the_guard_which_reports_each_phase():
    phases: list[str] = []
    guard = CandidateGuard(on_phase=phases.append)
    for name in REFERENCE_ALGORITHMS:
        checks = structural_check(reference_algorithm(name).source(), load=guard.load)
        assert all(check.passed for check in checks), (name, checks)
    assert phases[:4] == ["importing the candidate", "back in the harness", "calling compute_advantages",
                          "back in the harness"]
    assert "calling policy_loss" in phases and phases[-1] == "back in the harness"


# --------------------------------------------------------------------- trusted code (sandboxed verification)


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    return sandbox_verifier(base_checkpoint(), tmp_path_factory.mktemp("verify"), get_protocol("tiny"), wall_s=90)


ALWAYS_RIGHT = "lambda problem, text, eos: Grade(correct=True, format_valid=True, answer=problem.answer)"


@pytest.mark.parametrize("source, named", [
    (at_import(f"import sys\nfrom poise.testbed.tasks import Grade\n"
               f"sys.modules['poise.testbed.training'].grade = {ALWAYS_RIGHT}"),
     "tampering: poise.testbed.training.grade was replaced while importing the candidate"),
    (at_import(f"import sys, types\nfrom poise.testbed.tasks import Grade\n"
               f"fake = types.ModuleType('poise.testbed.tasks')\nfake.grade = {ALWAYS_RIGHT}\n"
               "sys.modules['poise.testbed.tasks'] = fake"),
     "tampering: the trusted module poise.testbed.tasks was replaced in sys.modules while importing the candidate"),
    (in_advantages("import poise.testbed.tasks as tasks\ntasks.grade.__code__ = (lambda p, t, e: None).__code__"),
     "tampering: the code of poise.testbed.tasks.grade was replaced while calling compute_advantages"),
    (in_advantages("import re, poise.testbed.tasks as tasks\ntasks.ANSWER_FORMAT = re.compile('(.*)')"),
     "tampering: poise.testbed.tasks.ANSWER_FORMAT was replaced while calling compute_advantages"),
    (in_loss("import torch\ntorch.Tensor.mean = lambda self, *args, **kwargs: torch.tensor(1.0)"),
     "tampering: torch.Tensor.mean was added over the inherited one while calling policy_loss"),
    (at_import("import sys, types\nsys.modules['poise.reward_shim'] = types.ModuleType('poise.reward_shim')"),
     "tampering: sys.modules['poise.reward_shim'] was set to something that is not the trusted module"),
    (at_import("import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()"),
     "tampering: a thread was started"),
    (in_advantages("from torch.overrides import TorchFunctionMode\n\nclass Passthrough(TorchFunctionMode):\n"
                   "    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
                   "        return func(*args, **(kwargs or {}))\n\nPassthrough().__enter__()"),
     "tampering: the torch function modes entered went from 0 to 1 while calling compute_advantages"),
    (at_import("import torch\ntorch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)"),
     "tampering: the global nn.Module hooks in _global_forward_hooks went from 0 to 1 while importing the candidate"),
], ids=["grader-monkeypatched", "grader-module-replaced", "grader-code-replaced", "answer-format", "tensor-method",
        "fake-module", "thread", "function-mode", "global-hook"])
def test_verification_fails_a_candidate_that_changes_trusted_code_naming_what_it_changed(verifier, source, named):
    checks = verifier(source)
    failed = [check for check in checks if not check.passed]
    assert failed and failed[0].message.startswith(named), checks
    assert "smoke_run" not in [check.name for check in checks]


def test_verification_fails_a_candidate_that_fills_the_scores_only_in_the_smoke_run(verifier):
    # Synthetic check batches have at most 7 tokens; the smoke run's responses are longer: the candidate,
    # whose verification report said "reward 1.000", now fails the smoke run with the tampering named.
    source = in_advantages("if batch['response_mask'].shape[1] > 7:\n    batch['scores'].fill_(1.0)")
    checks = verifier(source)
    assert [check.name for check in checks if not check.passed] == ["smoke_run"], checks
    assert checks[-1].message.startswith("tampering: compute_advantages wrote into its input batch['scores'] in place")


# ----------------------------------------------------------------- rewards and records (sandboxed training)


@pytest.fixture(scope="module")
def honest_first_step(base, tmp_path_factory):
    """Step 0 of GRPO at seed 4: the same prompts, samples and rewards any candidate sees at step 0."""
    outcome = train_candidate(GRPO, ONE_STEP, 4, base, tmp_path_factory.mktemp("honest"))
    assert outcome.failure is None, outcome.detail
    (step,) = outcome.trajectory.steps
    assert step.reward_mean < 1.0  # else a forged 1.0 could not be told from the real reward
    return step


# The second compute_advantages call is step 1's; policy_loss is called twice a step (two minibatches).
SECOND_CALL = "CALLS.append(1)\nif len(CALLS) == 2:\n"


@pytest.mark.parametrize("source, named", [
    (in_advantages(SECOND_CALL + "    batch['scores'].fill_(1.0)", prelude="CALLS = []\n"),
     "tampering: compute_advantages wrote into its input batch['scores'] in place"),
    (in_advantages(SECOND_CALL + "    import sys\n    from poise.testbed.tasks import Grade\n"
                   f"    sys.modules['poise.testbed.training'].grade = {ALWAYS_RIGHT}", prelude="CALLS = []\n"),
     "tampering: poise.testbed.training.grade was replaced while calling compute_advantages"),
    # Past the copies: the harness's own tensors, reached through the frames from policy_loss (its inputs are
    # minibatch slices, not these). What was logged had been computed before, and the check at the step's end sees it.
    (in_loss("CALLS.append(1)\nif len(CALLS) == 3:\n    import sys\n    frame = sys._getframe()\n"
             "    while frame.f_code.co_name != 'train':\n        frame = frame.f_back\n"
             "    frame.f_locals['scores'].fill_(1.0)", prelude="CALLS = []\n"),
     "tampering: the harness's own rollout tensors changed while candidate code ran at step 1 (reward_mean "),
], ids=["fill-scores", "replace-grader", "through-frames"])
def test_tampering_in_training_fails_the_run_naming_it_and_the_logged_rewards_are_the_honest_ones(
        base, tmp_path, honest_first_step, source, named):
    streamed = []
    outcome = train_candidate(source, TWO_STEPS, 4, base, tmp_path, on_step=streamed.append)
    assert outcome.failure is not None and outcome.failure.startswith(named), outcome.failure
    assert outcome.checkpoint is None and outcome.trajectory.aborted
    # Step 0 ran before the tampering: logged as an honest recomputation (GRPO on the same seed) logs it.
    (logged,) = outcome.trajectory.steps
    assert logged.step == 0 and [s.step for s in streamed] == [0]
    assert (logged.reward_mean, logged.format_valid_rate, logged.entropy, logged.response_length) == (
        honest_first_step.reward_mean, honest_first_step.format_valid_rate, honest_first_step.entropy,
        honest_first_step.response_length)


# ------------------------------------------------------------------------------------------------ reasons


def test_a_killed_child_is_reported_at_its_configured_deadline_not_the_time_the_kill_took():
    run = SandboxResult(returncode=-9, wall_s=74.2, result=None, timed_out=True, deadline_s=60.0,
                        phase="calling policy_loss")
    assert run.failure_reason() == "killed at the 60 s wall-clock deadline while calling policy_loss"
    run.deadline_s = 2.5
    assert run.failure_reason().startswith("killed at the 2.5 s wall-clock deadline")


def test_an_error_inside_a_library_call_is_reported_at_the_candidates_own_line(base, tmp_path):
    source = in_advantages("import json\njson.loads('{')")
    outcome = train_candidate(source, ONE_STEP, 0, base, tmp_path)
    line = line_of(source, "json.loads('{')")
    assert line < len(source.splitlines())
    assert outcome.failure.startswith(f"JSONDecodeError at line {line} of the candidate: \"Expecting"), outcome.failure


@pytest.mark.parametrize("source, reason", [
    (at_import("import sys\nsys.exit(3)"), "importing the module called sys.exit(3) at line 2 of the candidate"),
    (at_import("import os\nos._exit(3)"), "child exited with status 3 without a result while importing the candidate"),
    (in_advantages("import sys\nsys.exit(3)"), "compute_advantages called sys.exit(3) at line {line} of the candidate"),
    (in_advantages("import os\nos._exit(3)"),
     "child exited with status 3 without a result while calling compute_advantages"),
    (in_loss("import os\nos._exit(3)"), "child exited with status 3 without a result while calling policy_loss"),
], ids=["sys.exit-at-import", "os._exit-at-import", "sys.exit-in-a-call", "os._exit-in-a-call", "os._exit-in-loss"])
def test_an_exit_at_import_reads_differently_from_one_in_a_call(base, tmp_path, source, reason):
    outcome = train_candidate(source, ONE_STEP, 0, base, tmp_path)
    expected = reason.format(line=line_of(source, "sys.exit(3)") if "{line}" in reason else 0)
    assert outcome.failure is not None and outcome.failure.startswith(expected), outcome.failure


FORGED_REPORT = {"status": "error", "reason": "FORGED: the candidate is excellent", "steps": []}
THROUGH_THE_CHANNEL = "import os\nfrom poise.sandbox import emit\nemit({result!r})\nos._exit({status})"


@pytest.mark.parametrize("source, reason", [
    # print() goes to stderr: a forged line is the candidate's output, never a result.
    (at_import(f"import os\nprint({json.dumps({'result': FORGED_REPORT})!r}, flush=True)\nos._exit(0)"),
     "child exited with status 0 without a result while importing the candidate; the last line of its stderr "
     "(the candidate's output may be in it): \"{\\\"result\\\": {\\\"status\\\": \\\"error\\\", \\\"reason\\\": "
     "\\\"FORGED"),
    # Through the harness's own channel, but not a valid report: quoted, never the verdict.
    (at_import(THROUGH_THE_CHANNEL.format(result={"result": {"status": "ok", "FORGED all checks passed": True}},
                                          status=0)),
     "the child printed a result line that is not a valid TrainReport, so the candidate's output and not a "
     "verdict; its problems, quoted: \""),
    # A valid report through the harness's channel, then an exit: how the child ended is the reason.
    (at_import(THROUGH_THE_CHANNEL.format(result={"result": FORGED_REPORT}, status=1)),
     "child exited with status 1 after its result line while importing the candidate"),
    # A candidate's exception message is quoted as its text.
    (in_advantages("raise RuntimeError('FORGED: verification passed')"),
     "RuntimeError at line {line} of the candidate: \"FORGED: verification passed\""),
], ids=["printed", "invalid-through-the-channel", "valid-through-the-channel-then-exit", "exception-message"])
def test_text_the_candidate_forges_is_quoted_as_its_output_never_the_verdict(base, tmp_path, source, reason):
    outcome = train_candidate(source, ONE_STEP, 0, base, tmp_path)
    expected = reason.format(line=line_of(source, "FORGED: verification")) if "{line}" in reason else reason
    assert outcome.failure is not None and outcome.failure.startswith(expected), outcome.failure
    assert not outcome.failure.startswith("FORGED") and outcome.trajectory.aborted
    if "FORGED" in outcome.failure:  # only inside quotes
        assert outcome.failure.index("FORGED") > outcome.failure.index('"')


def test_an_exit_in_import_is_told_apart_from_a_harness_that_never_loaded_the_candidate():
    run = SandboxResult(returncode=2, wall_s=0.5, result=None, stderr_tail="sandbox: the payload is not valid\n")
    assert run.failure_reason() == "child exited with status 2 without a result: sandbox: the payload is not valid"
    run.phase = "importing the candidate"
    assert run.failure_reason() == ("child exited with status 2 without a result while importing the candidate; "
                                    "the last line of its stderr (the candidate's output may be in it): "
                                    "\"sandbox: the payload is not valid\"")


def test_the_parent_takes_only_the_phases_a_harness_prints(tmp_path):
    """A phase line the candidate made up is an ordinary event: it cannot put words into the reason."""
    code = ("import os\nfrom poise.sandbox import emit\nemit({'phase': 'calling policy_loss'})\n"
            "emit({'phase': 'verified: every check passed'})\nos._exit(3)\n")
    run = run_sandboxed("poise.sandbox_probe", ProbePayload(code=code), tmp_path, SandboxLimits(wall_s=60.0),
                        threads=1, report_type=ProbeReport)
    assert run.phase == "calling policy_loss" and run.events == [{"phase": "verified: every check passed"}]
    assert run.failure_reason() == ("child exited with status 3 without a result while calling policy_loss; "
                                    "no error output")


def test_screening_fingerprints_fail_a_candidate_that_writes_into_its_inputs(tmp_path):
    from proposer.fingerprint import fingerprint_in_sandbox

    result = fingerprint_in_sandbox(in_advantages("batch['scores'].fill_(1.0)"), tmp_path)
    assert not result.ok and result.vector is None
    assert result.failure.startswith("advantages[mixed]: tampering: compute_advantages wrote into its input "
                                     "batch['scores'] in place"), result.failure
    assert fingerprint_in_sandbox(GRPO, tmp_path).ok  # the guard itself costs an honest candidate nothing


def test_tampering_left_to_run_after_the_last_call_is_caught_before_the_report(base, tmp_path):
    # A finalizer on an object the candidate put into its copy of the batch runs when the harness drops that
    # copy, after the call's own check: the harness checks once more before it reports.
    source = in_loss("CALLS.append(1)\nif len(CALLS) == 2:\n    class Later:\n        def __del__(self):\n"
                     "            import poise.testbed.tasks as tasks\n            tasks.grade = lambda *args: None\n"
                     "    batch['later'] = Later()", prelude="CALLS = []\n")
    outcome = train_candidate(source, ONE_STEP, 0, base, tmp_path)
    assert outcome.failure == ("tampering: poise.testbed.tasks.grade was replaced while training; a candidate "
                               "computes its outputs and must not change the harness's code or state")
    assert outcome.checkpoint is None
