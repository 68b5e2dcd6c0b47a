"""Character tokenizer of the CPU testbed.

Ids are part of every checkpoint, so they never change once a base model is built:

    0 <pad>   1 <bos>   2 <eos>
    3..12  '0'..'9'
    13 '+'  14 '-'  15 '='  16 ','  17 '#'  18 ' '  19 'Q'  20 ':'  21 '\\n'
    22 'a'  23 'n'  24 's'  25 '>'

The last four characters only occur in the deliberately broken answer formats of the SFT data
(" ans 44", " => 44"), so the base model can produce them and the grader must reject them.

A sequence is `<bos> prompt response <eos>`. Prompts are batched with LEFT padding so that every
row's last prompt token sits in the same column and decoding appends one column per step; the
model then needs position ids counted from each row's first real token (`position_ids_from_mask`
in `model.py`), exactly as HF `generate` does for left-padded batches.
"""

from collections.abc import Sequence

import torch

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789+-=,# Q:\nans>"
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + tuple(CHARS)
VOCAB_SIZE = len(VOCAB)  # 26

_CHAR_TO_ID = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Character ids of `text`, no special tokens. Raises on a character outside the vocabulary."""
    try:
        return [_CHAR_TO_ID[c] for c in text]
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} is not in the testbed vocabulary {CHARS!r}") from None


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Text of `ids`; special tokens render as `<pad>`, `<bos>`, `<eos>` (which no grader accepts)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return "".join(VOCAB[i] for i in ids)


def encode_prompts(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`<bos> prompt` for each prompt, left-padded to the longest.

    Returns (input_ids, attention_mask), both (B, P) int64, mask 1 on real tokens.
    """
    rows = [[BOS_ID, *encode(p)] for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def encode_responses(responses: Sequence[str], add_eos: Sequence[bool] | bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Response texts (+ `<eos>`), RIGHT-padded to the longest: the layout the sampler returns.

    Returns (response_ids, response_mask), both (B, L) int64, mask 1 on real tokens incl. EOS.
    """
    if isinstance(add_eos, bool):
        add_eos = [add_eos] * len(responses)
    rows = [encode(r) + ([EOS_ID] if eos else []) for r, eos in zip(responses, add_eos, strict=True)]
    width = max(1, max(len(r) for r in rows))
    response_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        response_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        response_mask[i, :len(row)] = 1
    return response_ids, response_mask


def decode_response(response_ids: Sequence[int] | torch.Tensor) -> tuple[str, bool]:
    """(text before the first `<eos>`, whether an `<eos>` was there); padding after EOS is dropped.

    This is the text the grader sees. A row that never emitted EOS keeps all its tokens (pads
    included, rendered as `<pad>`), so it can never pass the format check.
    """
    if isinstance(response_ids, torch.Tensor):
        response_ids = response_ids.tolist()
    response_ids = list(response_ids)
    if EOS_ID in response_ids:
        return decode(response_ids[:response_ids.index(EOS_ID)]), True
    return decode(response_ids), False
