"""Generate text from a checkpoint, for a quick look at a model.

    python scripts/sample.py runs/<run dir> --prompt "ROMEO:" [--tokens 200] [--temperature 0.8 --top-k 50] [--seed 0]

Greedy decoding by default (--temperature 0); with a temperature, each next token is drawn from
softmax(logits / T) restricted to the --top-k most likely ones. The prompt is encoded with the run's
tokenizer, after its document-start token when it prepends one (LLaMA's BOS); the context is the
model's, the last positions of a longer text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.tokenizer import TokenizerError, load_tokenizer
from models.hf_export import ExportError, load_model


@torch.no_grad()
def generate(model: torch.nn.Module, ids: list[int], tokens: int, context: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """`tokens` new ids after `ids`: argmax (temperature 0) or sampled from the top-k of softmax(logits / T)."""
    out = list(ids)
    for _ in range(tokens):
        logits = model(torch.tensor([out[-context:]]))[0, -1].double()
        if temperature <= 0:
            out.append(int(logits.argmax()))
            continue
        if top_k is not None:
            logits[logits < logits.topk(min(top_k, len(logits))).values[-1]] = -torch.inf
        out.append(int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)))
    return out[len(ids):]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sample", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory (its checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--prompt", default="", help="the text to continue")
    parser.add_argument("--tokens", type=int, default=100, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config, model = load_model(args.checkpoint)
        tokenizer = load_tokenizer(config.get("tokenizer"))
        start = [tokenizer.bos_id] if config.get("tokenizer", {}).get("eot") in ("prepend", "both") else []
        prompt = start + tokenizer.encode_batch([args.prompt])[0]
        if not prompt:
            prompt = [tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id]  # a document boundary
    except (ExportError, TokenizerError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    context = config["model"].get("block_size") or config["model"]["max_seq_len"]
    new = generate(model, prompt, args.tokens, context, args.temperature, args.top_k, torch.Generator().manual_seed(args.seed))
    print(args.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
