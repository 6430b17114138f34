"""Next-token cross-entropy from the last hidden states, the vocabulary-sized logits made a chunk of
positions at a time.

    loss = mean_t −log softmax(W h_t)[y_t]        W: the LM head (vocab × width); targets y_t = −100
                                                 (IGNORE: the pads of unpacked documents) count nowhere

The full logits of a long-sequence batch are the largest tensor of a step: 4 sequences of 4096 tokens
at GPT-2's 50,304 words are 824M numbers, 1.6 GB in bf16 and 3.3 GB again for the fp32 copy the
softmax needs. Here at most CHUNK_ELEMENTS logits (256 MB in fp32) exist at once when no gradient is
taken (evaluation); under autograd each chunk's logits are kept for the backward, as whole logits
would be, so training costs what it did. The chunks' sum equals the whole-batch loss up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**26  # logits per chunk: 64M numbers, 256 MB in fp32
IGNORE = -100  # F.cross_entropy's ignore_index: a target that is not one


def without_pads(targets: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The targets with the pads of unpacked documents (pad_id) made IGNORE; as they are when pad_id is None."""
    return targets if pad_id is None else targets.masked_fill(targets == pad_id, IGNORE)


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) (…, width) against targets (…), in fp32 or wider, over chunks of
    positions of at most `chunk_elements` logits each."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    rows = max(1, chunk_elements // head.out_features)
    total = sum(F.cross_entropy(_at_least_fp32(head(hidden[i:i + rows])), targets[i:i + rows], reduction="sum")
                for i in range(0, len(targets), rows))
    return total / (targets != IGNORE).sum().clamp(min=1)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
