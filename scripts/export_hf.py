"""Export a run's model as a Hugging Face transformers directory: config.json, model.safetensors, the tokenizer's files.

    python scripts/export_hf.py runs/<run dir> exported/           # its checkpoints/last.ckpt
    python scripts/export_hf.py path/to/last.ckpt exported/

then `transformers.AutoModelForCausalLM.from_pretrained("exported/")`. Names and layouts: models/hf_export.py.
"""

import argparse
import sys
from pathlib import Path

import torch

from data.tokenizer import TokenizerError, write_tokenizer_files
from models import build_model, count_parameters
from models.hf_export import ExportError, export_model, hf_model, load_checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="export_hf", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory (its checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("out_dir", type=Path, help="the directory to write (created if missing)")
    args = parser.parse_args(argv)
    try:
        config, state_dict = load_checkpoint(args.checkpoint)
        architecture, _ = hf_model(config["model"])
        out = export_model(config["model"], state_dict, args.out_dir)
        written = [out / "config.json", out / "model.safetensors", *write_tokenizer_files(config.get("tokenizer"), out)]
    except (ExportError, TokenizerError, OSError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        parameters = count_parameters(build_model(config["model"])).total
    print(f"{architecture} ({config['model']['family']}, {parameters:,} parameters) from {args.checkpoint}:")
    print("\n".join(f"  wrote {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
