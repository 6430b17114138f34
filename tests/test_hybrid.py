import copy
import functools

import pytest
import torch
import torch.nn as nn
import yaml

from conftest import ROOT
from models import build_model
from optim import HybridOptimizer, Muon, RoutingError, hybrid_optimizer, route_parameters, routing_table


def model(name):
    torch.manual_seed(0)
    return build_model(yaml.safe_load(open(ROOT / "configs" / "model" / f"{name}.yaml")))


def roles(m):
    return {" = ".join(r.names): r.role for r in route_parameters(m)}


def make_hybrid(m, lr=0.01):
    return hybrid_optimizer(m, matrix=functools.partial(Muon, lr=lr, orthogonalizer={"dtype": "float64"}),
                            aux=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.1))


def test_gpt2_routing_with_tied_head():
    r = roles(model("gpt2_tiny"))
    assert r["wte.weight = lm_head.weight"] == "embedding"  # tied: one parameter, both names
    assert r["wpe.weight"] == "embedding"
    assert r["blocks.0.attn.qkv.weight"] == r["blocks.1.mlp.proj.weight"] == "matrix"
    assert r["blocks.0.attn.qkv.bias"] == r["blocks.0.ln_1.weight"] == r["ln_f.bias"] == "vector"
    assert sum(role == "matrix" for role in r.values()) == 2 * 4  # qkv, attn proj, fc, mlp proj per block
    assert len(r) == len(list(model("gpt2_tiny").parameters()))  # every parameter exactly once


def test_llama_routing_with_untied_head():
    r = roles(model("llama_tiny"))
    assert r["embed_tokens.weight"] == r["lm_head.weight"] == "embedding"
    assert r["norm.weight"] == r["blocks.1.mlp_norm.weight"] == "vector"
    assert sum(role == "matrix" for role in r.values()) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert len(r) == len(list(model("llama_tiny").parameters()))


class WithScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.temperature = nn.Parameter(torch.ones(()))


def test_unassigned_parameter_is_named():
    with pytest.raises(RoutingError, match=r"no routing rule matches: temperature \(WithScalar, shape \(\)\)"):
        route_parameters(WithScalar())


def test_parameter_assigned_twice_is_named():
    m = model("gpt2_tiny")
    m.blocks[0].attn.proj.weight = m.blocks[0].mlp.fc.weight = nn.Parameter(torch.zeros(64, 64))
    m.wpe.weight = m.blocks[1].attn.proj.weight  # an embedding that is also a hidden matrix
    with pytest.raises(RoutingError, match=r"assigned twice: blocks.1.attn.proj.weight is wpe.weight \(role 'embedding'\) but its own rule says 'matrix'"):
        route_parameters(m)


def test_container_refuses_a_parameter_in_two_parts():
    p = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(RoutingError, match="in both 'a' and 'b'"):
        HybridOptimizer({"a": torch.optim.SGD([p], lr=0.1), "b": torch.optim.SGD([p], lr=0.1)})


def test_groups_and_weight_decay():
    m = model("gpt2_tiny")
    opt = make_hybrid(m)
    assert [g["name"] for g in opt.param_groups] == ["matrix", "embedding", "vector"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    assert type(opt.parts["matrix"]) is Muon and type(opt.parts["aux"]) is torch.optim.AdamW
    table = routing_table(m, opt)
    assert "wte.weight = lm_head.weight" in table and "Muon" in table


def step(m, opt, seed):
    torch.manual_seed(seed)
    x = torch.randint(0, 50257, (2, 9))
    loss = nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_container_step_equals_stepping_the_parts():
    m1, m2 = model("llama_tiny"), model("llama_tiny")
    hybrid = make_hybrid(m1)
    groups = {r.role: [] for r in route_parameters(m2)}
    for r in route_parameters(m2):
        groups[r.role].append(r.param)
    muon = Muon(groups["matrix"], lr=0.01, orthogonalizer={"dtype": "float64"})
    adamw = torch.optim.AdamW([{"params": groups["embedding"]}, {"params": groups["vector"], "weight_decay": 0.0}], lr=0.01, weight_decay=0.1)
    for seed in range(3):
        step(m1, hybrid, seed)
        torch.manual_seed(seed)
        x = torch.randint(0, 50257, (2, 9))
        nn.functional.cross_entropy(m2(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        muon.step(), adamw.step(), muon.zero_grad(), adamw.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_state_dict_round_trip_and_one_scheduler_for_all_groups():
    m = model("gpt2_tiny")
    opt = make_hybrid(m)
    step(m, opt, 0)
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved_opt["state"]) == len(list(m.parameters()))
    step(m, opt, 1)
    after = copy.deepcopy(m.state_dict())

    m2 = model("gpt2_tiny")
    m2.load_state_dict(saved_model)
    opt2 = make_hybrid(m2)
    opt2.load_state_dict(saved_opt)
    assert opt2.parts["matrix"].state is opt2.state and opt2.parts["aux"].param_groups[1] is opt2.param_groups[2]
    step(m2, opt2, 1)
    assert all(torch.equal(after[k], v) for k, v in m2.state_dict().items())

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    opt2.step(), scheduler.step()
    assert [g["lr"] for g in opt2.parts["matrix"].param_groups + opt2.parts["aux"].param_groups] == [0.005] * 3


def test_split_heads_puts_each_attention_layout_in_its_own_group():
    from omegaconf import OmegaConf

    from configs import compose

    for family, rows in (("gpt2", 3 * 2), ("llama", 2)):
        model = build_model(OmegaConf.to_container(compose([f"model={family}_tiny"]).model))
        opt = hybrid_optimizer(model, matrix=lambda groups: Muon(groups), aux=lambda groups: torch.optim.AdamW(groups),
                               split_heads=True)
        splits = {g["name"]: g.get("head_split") for g in opt.param_groups}
        assert splits["matrix_head_rows"] == (rows, 0) and splits["matrix_head_cols"] == (2, 1) and splits["matrix"] is None
        matrices = [r.param for r in route_parameters(model) if r.role == "matrix"]
        assert sum(len(g["params"]) for g in opt.parts["matrix"].param_groups) == len(matrices)
        whole = next(g for g in opt.param_groups if g["name"] == "matrix")
        assert len(whole["params"]) == len(matrices) - len(model.head_splits())  # the MLPs'


def test_split_heads_needs_an_orthogonalizing_matrix_optimizer():
    from omegaconf import OmegaConf

    from configs import compose

    model = build_model(OmegaConf.to_container(compose(["model=gpt2_tiny"]).model))
    with pytest.raises(RoutingError, match="split_heads: AdamW does not orthogonalize"):
        hybrid_optimizer(model, matrix=lambda g: torch.optim.AdamW(g), aux=lambda g: torch.optim.AdamW(g), split_heads=True)
