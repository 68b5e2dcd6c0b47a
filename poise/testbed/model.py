"""The testbed's policy: a ~1.05M-parameter transformers Llama over the character vocabulary.

Checkpoint folder layout (what `save_model` writes and `load_model` reads):

    model.safetensors   weights under their Hugging Face names; the tied lm_head is stored once, as
                        model.embed_tokens.weight (the name HF-compatible loaders such as vLLM read)
    spec.json           {"spec": ModelSpec fields, "vocab": [...]}: enough to rebuild the model
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json
                        the Hugging Face layout (`hf_layout.py`), so vLLM serves the same folder

Sequence layout shared by the sampler, the SFT and the RL trainer: a LEFT-padded prompt block
(B, P) followed by a RIGHT-padded response block (B, L); `attention_mask` is 1 on real tokens of
both blocks and position ids count real tokens from 0 (`position_ids_from_mask`). HF's forward
does not derive positions from the mask, so every full forward here passes them explicitly.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from poise.testbed.hf_layout import write_hf_files
from poise.testbed.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, VOCAB_SIZE

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_positions: int = 160  # longest sequence: <bos> + 25-char prompt + 96 response tokens fits
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # eager and sdpa measured equal on CPU (64 x 110 tokens fwd+bwd: ~595 ms each, 2 threads);
    # both are deterministic there, sdpa keeps the (B, H, T, T) weights out of autograd memory.
    attn_implementation: str = "sdpa"


def llama_config(spec: ModelSpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_heads, max_position_embeddings=spec.max_positions,
        rms_norm_eps=spec.rms_norm_eps, initializer_range=spec.init_std, tie_word_embeddings=True,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        attn_implementation=spec.attn_implementation,
    )


def build_model(spec: ModelSpec = ModelSpec(), seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model. HF initialises from the global RNG, so it runs inside
    fork_rng: the init depends only on `seed` and the caller's global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config(spec))


def save_model(model: LlamaForCausalLM, spec: ModelSpec, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if spec_ties_embeddings(model):
        del state["lm_head.weight"]  # the tied duplicate; loaders re-tie it to model.embed_tokens.weight
    safetensors.torch.save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors writes 0600; weights are no secret, and a sandboxed child runs as another uid (docs/sandbox.md).
    (out_dir / WEIGHTS_FILE).chmod(0o644)
    write_hf_files(out_dir, model.config)
    (out_dir / SPEC_FILE).write_text(json.dumps({"spec": asdict(spec), "vocab": list(VOCAB)}, indent=2))
    return out_dir


def spec_ties_embeddings(model: LlamaForCausalLM) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def load_model(path: str | Path) -> tuple[LlamaForCausalLM, ModelSpec]:
    """(model in eval mode, its spec) from a folder written by `save_model`."""
    path = Path(path)
    saved = json.loads((path / SPEC_FILE).read_text())
    if saved["vocab"] != list(VOCAB):
        raise ValueError(f"{path}: checkpoint vocabulary {saved['vocab']} differs from the tokenizer's "
                         f"{list(VOCAB)}; rebuild the checkpoint with this version of the testbed")
    spec = ModelSpec(**saved["spec"])
    model = build_model(spec)
    missing, unexpected = safetensors.torch.load_model(model, str(path / WEIGHTS_FILE))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the spec (missing {missing}, unexpected {unexpected})")
    return model.eval(), spec


def weights_sha256(path: str | Path) -> str:
    """sha256 of the weights file in a checkpoint folder (or of the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens, 0 on left padding (as HF `generate` does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_log_probs(model: LlamaForCausalLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       response_ids: torch.Tensor, response_mask: torch.Tensor,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the response under log_softmax(logits / T).

    One full forward over prompt + response; differentiable, so the RL trainer computes its
    current-policy log-probs here. Temperature 0 (greedy) is scored at T = 1, as the sampler does.
    Shapes: prompt (B, P) left-padded, response (B, L) right-padded -> (B, L), (B, L); zero where
    response_mask is 0.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)           # (B, P + L)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)    # (B, P + L)
    L = response_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=L + 1).logits
    logits = logits[:, :-1].float()                                    # (B, L, V): column P-1+t predicts t
    log_dist = F.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    log_probs = log_dist.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_dist.exp() * log_dist).sum(-1)
    mask = response_mask.to(log_probs.dtype)
    return log_probs * mask, entropy * mask


def response_log_probs_by_length(model: LlamaForCausalLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                 response_ids: torch.Tensor, response_mask: torch.Tensor,
                                 temperature: float = 1.0, rows_per_chunk: int = 8
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_log_probs` computed in chunks of rows of similar length, each chunk cut to its own
    longest prompt and response, so the forward does not run over padding. Same values and shapes
    (up to float summation order), differentiable; the caller's loss and its aggregation still see
    the whole batch at once, so the gradient is the batch's, not a sum of per-chunk steps.

    Why: response lengths on the testbed span ~15 to 96 tokens (chains of 1 to 10 operations), so
    one (B, P + L_max) forward spends about a third of its matmuls on right padding.
    """
    B, L = response_ids.shape
    if B <= rows_per_chunk:
        return response_log_probs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature)
    order = response_mask.sum(-1).argsort(stable=True)
    log_probs, entropies = [], []
    for rows in order.split(rows_per_chunk):
        p_mask, r_mask = prompt_mask[rows], response_mask[rows]
        first = int(p_mask.any(0).long().argmax())                   # prompts are left-padded
        last = max(int(r_mask.sum(-1).max()), 1)                      # responses are right-padded
        lp, ent = response_log_probs(model, prompt_ids[rows, first:], p_mask[:, first:],
                                     response_ids[rows, :last], r_mask[:, :last], temperature)
        log_probs.append(F.pad(lp, (0, L - last)))
        entropies.append(F.pad(ent, (0, L - last)))
    inverse = order.argsort()
    return torch.cat(log_probs)[inverse], torch.cat(entropies)[inverse]
