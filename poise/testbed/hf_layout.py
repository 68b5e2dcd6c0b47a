"""The Hugging Face layout of a testbed checkpoint, so that any HF-compatible server (vLLM) can load it.

`save_model` writes these files beside its own (model.safetensors, spec.json), so one checkpoint folder is
scored by both evaluators (docs/evaluation.md):

    config.json              the LlamaConfig of the spec (tied embeddings, float32)
    generation_config.json   bos/eos/pad ids, and nothing that would change sampling
    tokenizer.json           the character tokenizer: one token per character, `<bos>` prepended
    tokenizer_config.json    special tokens, no chat template (the testbed model completes plain prompts)

The tokenizer reproduces `poise.testbed.tokenizer.encode_prompts` for one prompt: `<bos>` then one id per
character. A character outside the vocabulary maps to `<pad>`, which no grader accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

from poise.testbed.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, VOCAB

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def tokenizer_json() -> dict:
    """The `tokenizers` serialization of the character tokenizer (a WordLevel model over single characters)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, token in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [BOS_ID], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {token: i for i, token in enumerate(VOCAB)},
                  "unk_token": SPECIAL_TOKENS[PAD_ID]},
    }


def write_hf_files(out_dir: Path, config) -> None:
    """Write the HF files of a checkpoint whose weights `save_model` already wrote; `config` is its LlamaConfig."""
    config = config.to_dict()
    config.update(torch_dtype="float32", architectures=["LlamaForCausalLM"])
    config.pop("attn_implementation", None)
    config.pop("_attn_implementation_autoset", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(), indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<pad>",
        "add_bos_token": False,  # the post-processor above prepends <bos>
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }, indent=2))
