"""models/hf_export.py: exported tiny models load in transformers and give our logits; what cannot be
exported is refused; checkpoints are read from a run dir or a file."""

import json

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from conftest import run_cli
from configs import compose
from models import build_model
from models.hf_export import ExportError, export_model, hf_model, hf_state_dict, load_checkpoint

CONFIGS = {
    "gpt2_tiny": ["model=gpt2_tiny"],
    "gpt2_untied_no_bias_layer_scaled": ["model=gpt2_tiny", "model.tie_head=false", "model.bias=false",
                                         "model.scale_attn_by_inverse_layer_idx=true"],
    "llama_tiny": ["model=llama_tiny"],
    "llama_interleaved_tied": ["model=llama_tiny", "model.rope_layout=interleaved", "model.tie_head=true"],
}


def model_cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose([*overrides, "model.vocab_size=256"]).model, resolve=True)


def random_model(spec: dict) -> torch.nn.Module:
    """Our model with every parameter random (norm gains around 1, biases non-zero)."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln" in name else 0.1 * torch.randn_like(p))
    return model


def load_hf(path):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return hf.eval()


def relative_difference(ours: torch.nn.Module, hf, idx: torch.Tensor) -> float:
    with torch.no_grad():
        expected, got = ours(idx), hf(idx).logits
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_exported_model_gives_our_logits(name, tmp_path):
    spec = model_cfg(*CONFIGS[name])
    model = random_model(spec)
    export_model(spec, model.state_dict(), tmp_path)
    architecture, config = hf_model(spec)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == architecture
    assert config["tie_word_embeddings"] is spec["tie_head"]  # transformers >= 5 would untie a tied config by itself
    assert (hf.lm_head.weight is hf.get_input_embeddings().weight) == spec["tie_head"]
    idx = torch.randint(0, spec["vocab_size"], (2, 32))
    difference = relative_difference(model, hf, idx)
    print(f"{name}: max |logits_hf - logits_ours| / max |logits_ours| = {difference:.2e}")
    assert difference <= 1e-5


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_interleaved_rope_needs_the_row_permutation(layout, tmp_path):
    spec = model_cfg("model=llama_tiny", f"model.rope_layout={layout}")
    model = random_model(spec)
    ours = model.state_dict()
    exported = hf_state_dict(spec, ours)
    for proj in ("q_proj", "k_proj"):
        same = torch.equal(exported[f"model.layers.0.self_attn.{proj}.weight"], ours[f"blocks.0.attn.{proj}.weight"])
        assert same == (layout == "half")
    export_model(spec, ours, tmp_path)
    hf = load_hf(tmp_path)
    with torch.no_grad():  # our rows as they are: right for half, wrong for interleaved
        for i in range(spec["n_layer"]):
            for proj in ("q_proj", "k_proj"):
                getattr(hf.model.layers[i].self_attn, proj).weight.copy_(ours[f"blocks.{i}.attn.{proj}.weight"])
    difference = relative_difference(model, hf, torch.randint(0, spec["vocab_size"], (2, 32)))
    assert (difference <= 1e-5) == (layout == "half")


def test_tied_head_is_written_once(tmp_path):
    from safetensors import safe_open

    spec = model_cfg("model=gpt2_tiny")
    export_model(spec, random_model(spec).state_dict(), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.metadata() == {"format": "pt"}
    assert hf_model(spec)[1]["tie_word_embeddings"] is True


def test_gpt2_with_rope_is_refused(tmp_path):
    spec = model_cfg("model=gpt2_tiny", "model.pos=rope")
    with pytest.raises(ExportError, match="pos=rope"):
        hf_model(spec)
    with pytest.raises(ExportError, match="pos=rope"):
        export_model(spec, build_model(spec).state_dict(), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_weights_of_another_config_are_refused():
    spec = model_cfg("model=gpt2_tiny")
    with pytest.raises(ExportError, match="blocks.1"):
        hf_state_dict({**spec, "n_layer": 1}, build_model(spec).state_dict())


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod."])
def test_load_checkpoint_from_run_dir_and_file(prefix, tmp_path):
    spec = model_cfg("model=llama_tiny")
    weights = build_model(spec).state_dict()
    config = {"model": spec, "tokenizer": {"name": "gpt2"}}
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {prefix + k: v for k, v in weights.items()}, "optimizer_states": [], "lr_schedulers": [],
                "loops": {}, "muonlab": {"config": config, "step": 3, "tokens": 96}}, path)
    for source in (tmp_path / "run", path):
        loaded_config, loaded = load_checkpoint(source)
        assert loaded_config == config
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_load_checkpoint_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ExportError, match=str(tmp_path / "nothing")):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(ExportError, match=str(tmp_path / "empty" / "checkpoints" / "last.ckpt")):
        (tmp_path / "empty").mkdir()
        load_checkpoint(tmp_path / "empty")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ExportError, match="not a muonlab checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="not a readable checkpoint"):
        load_checkpoint(garbage)


def test_script_reports_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_cli("scripts/export_hf.py", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"export_hf: error: {tmp_path / 'nothing'} does not exist: pass a run "
                                                  "directory (holding checkpoints/last.ckpt) or a .ckpt file"]
    assert not (tmp_path / "out").exists()
