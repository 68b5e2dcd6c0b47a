"""Building the testbed's base checkpoint: supervised training on noisy worked solutions.

The SFT data is deliberately imperfect (docs/testbed.md, "The feasibility probe"): about 20% of examples carry
one wrong arithmetic step through to the answer and about 10% end in a broken answer format.
The base model then knows the right behaviour without it dominating, which leaves RL a
measurable gain (probe: base pass@1 0.20, pass@8 0.68, format-valid 0.86 after 418 steps).

Everything is fixed by (seed, steps, settings): model init, data stream, thread count. Budgets
are in steps, never seconds, because the machine is shared and wall time depends on its load.
Checkpoint folder: model.safetensors and spec.json (see model.py) plus recipe.json with every
setting and the sha256 of the weights.
"""

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM

from poise.testbed.model import ModelSpec, build_model, load_model, response_log_probs, save_model, weights_sha256
from poise.testbed.tasks import (
    OPERAND_MAX,
    TRAIN_CHAIN_LENGTHS,
    VALUE_MAX,
    chain_values,
    draw_problems,
    eval_set_fingerprint,
    parse_prompt,
    worked_solution,
)
from poise.testbed.tokenizer import encode_prompts, encode_responses

RECIPE_FILE = "recipe.json"
DEFAULT_SFT_STEPS = 300  # base pass@1 on the hard suites 0.19-0.26, greedy acc 0.50-0.67: headroom for RL
BROKEN_ANSWER_FORMATS = (" ans {}", " => {}", " ## {}", "")  # "" drops the answer entirely


@dataclass(frozen=True)
class SFTConfig:
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio at the last step
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    wrong_step_rate: float = 0.2
    broken_format_rate: float = 0.1
    chain_lengths: tuple[int, ...] = TRAIN_CHAIN_LENGTHS
    operand_max: int = OPERAND_MAX
    threads: int = 2             # float reductions depend on it, so it is part of the recipe


def lr_at(step: int, steps: int, config: SFTConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, steps - 1 - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def noisy_response(rng: random.Random, prompt: str, config: SFTConfig) -> str:
    """The SFT target for `prompt`: the worked solution, or one of its deliberate corruptions."""
    start, steps = parse_prompt(prompt)
    u = rng.random()
    if u < config.wrong_step_rate:
        # Some (step, delta) keeps every value carried afterwards in range; fall back to the
        # correct solution in the rare chain where none does.
        candidates = [(j, d) for j in range(len(steps)) for d in (-3, -2, -1, 1, 2, 3)]
        rng.shuffle(candidates)
        for error in candidates:
            if all(0 <= v <= VALUE_MAX for v in chain_values(start, steps, error)):
                return worked_solution(start, steps, error)[0]
        return worked_solution(start, steps)[0]
    text, answer = worked_solution(start, steps)
    if u < config.wrong_step_rate + config.broken_format_rate:
        return text.split(" #### ")[0] + rng.choice(BROKEN_ANSWER_FORMATS).format(answer)
    return text


def sft_batch(step: int, seed: int, config: SFTConfig) -> tuple[list[str], list[str]]:
    """(prompts, responses) of one SFT step; eval prompts are excluded like in RL batches."""
    rng = random.Random(f"sft:{seed}:{step}")
    problems = draw_problems(rng, config.batch_size, config.chain_lengths, config.operand_max)
    return [p.prompt for p in problems], [noisy_response(rng, p.prompt, config) for p in problems]


def train_sft(model: LlamaForCausalLM, seed: int, steps: int, config: SFTConfig = SFTConfig(),
              log: Callable[[str], None] | None = None) -> list[float]:
    """Train in place for `steps` AdamW steps; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    model.train()
    losses = []
    for step in range(steps):
        prompts, responses = sft_batch(step, seed, config)
        prompt_ids, prompt_mask = encode_prompts(prompts)           # (B, P) left-padded
        response_ids, response_mask = encode_responses(responses)   # (B, L) right-padded, EOS included
        log_probs, _ = response_log_probs(model, prompt_ids, prompt_mask, response_ids, response_mask)
        loss = -log_probs.sum() / response_mask.sum()               # token mean over responses only
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if log is not None and (step % 20 == 0 or step == steps - 1):
            log(f"sft step {step}/{steps}: loss {loss.item():.4f} lr {lr_at(step, steps, config):.2e}")
    return losses


def build_base_checkpoint(out_dir: str | Path, seed: int = 0, steps: int = DEFAULT_SFT_STEPS,
                          spec: ModelSpec | None = None, config: SFTConfig | None = None,
                          log: Callable[[str], None] | None = None) -> Path:
    """Train the base model and write it to `out_dir` (replacing what is there); returns out_dir.

    The folder is written under a temporary name and renamed at the end, so an interrupted
    build never leaves a half checkpoint behind.
    """
    out_dir = Path(out_dir)
    spec = spec or ModelSpec()
    config = config or SFTConfig()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        started = time.monotonic()
        model = build_model(spec, seed)
        losses = train_sft(model, seed, steps, config, log)
        elapsed = time.monotonic() - started
    finally:
        torch.set_num_threads(previous_threads)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    save_model(model.eval(), spec, tmp_dir)
    recipe = {
        "seed": seed, "steps": steps, "sft": asdict(config), "spec": asdict(spec),
        "weights_sha256": weights_sha256(tmp_dir),
        "excluded_eval_prompts_sha256": eval_set_fingerprint(),  # SFT data never holds these prompts
        "final_loss": losses[-1] if losses else None,
        "loss_every_10_steps": losses[::10],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "train_seconds": round(elapsed, 1),  # informational only: depends on machine load
    }
    (tmp_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def load_base(path: str | Path) -> LlamaForCausalLM:
    """The base model (eval mode) from a folder written by `build_base_checkpoint`, after
    checking its weights against the sha256 in recipe.json."""
    path = Path(path)
    recipe = json.loads((path / RECIPE_FILE).read_text())
    actual = weights_sha256(path)
    if actual != recipe["weights_sha256"]:
        raise ValueError(f"{path}: weights sha256 {actual} differs from recipe.json's "
                         f"{recipe['weights_sha256']}; the checkpoint is corrupt, rebuild it")
    model, _ = load_model(path)
    return model
