"""Every named optimizer against a direct transcription of its equations (float64, exact polar
factor), the identities between them (reference/optimizers.md §11.2), state round trips and
hyperparameter errors."""

import copy
import math

import hydra
import pytest
import torch
import yaml

from conftest import ROOT
from optim import MARSM, AdaMuon, Dion, Muon, Muon2, Muon2F, MuonNSR, MuonVS, NorMuon, Orthogonalizer, PolarOnly, PostPolar, PrePolar
from optim.orthogonalize import newton_schulz, polar_svd

SHAPES = [(24, 12), (12, 24), (16, 16)]  # tall, wide, square
STEPS = 6
LR, WD, BETA = 0.05, 0.1, 0.9
TOLERANCE = 1e-10


def trajectory(seed=0, scale=1.0):
    """Fixed initial matrices, gradients G_t and look-ahead gradients H_t = ∇f(X_t, ξ_{t+1})."""
    g = torch.Generator().manual_seed(seed)
    W0 = [torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES]
    grads = [[scale * torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]
    lookahead = [[scale * torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]
    return W0, grads, lookahead


def feed_and_step(opt, params, grads, lookahead):
    """One step on the given gradients (the lookahead ones first, for the optimizers that need them)."""
    if getattr(opt, "needs_lookahead", False):
        for p, h in zip(params, lookahead):
            p.grad = h.clone()
        opt.store_lookahead_gradients()
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    opt.step()


def run_optimizer(make, seed=0, scale=1.0, steps=STEPS):
    W0, grads, lookahead = trajectory(seed, scale)
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = make(params)
    for t in range(steps):
        feed_and_step(opt, params, grads[t], lookahead[t])
    return params, opt


def scale_of(shape, rule):
    m, n = shape
    return {"original": math.sqrt(max(1, m / n)), "match_rms_adamw": 0.2 * math.sqrt(max(m, n)), "spectral": math.sqrt(m / n)}[rule]


def apply(W, D, rule):
    return W * (1 - LR * WD) - LR * scale_of(W.shape, rule) * D


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check(params, opt, expected_W, expected_state):
    """Parameters and every named state tensor agree with the transcription to TOLERANCE (relative)."""
    for i, p in enumerate(params):
        assert rel(p.detach(), expected_W[i]) < TOLERANCE
        for key, values in expected_state.items():
            assert rel(opt.state[p][key], values[i]) < TOLERANCE, key


# ---- direct transcriptions of the papers' equations, one matrix at a time --------------------

def transcribe_muon(nesterov, rule):
    W0, grads, _ = trajectory()
    Ws, Ms = list(W0), [torch.zeros_like(w) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ms[i] = BETA * Ms[i] + (1 - BETA) * G
            N = (1 - BETA) * G + BETA * Ms[i] if nesterov else Ms[i]
            Ws[i] = apply(Ws[i], polar_svd(N), rule)
    return Ws, {"momentum/buffer": Ms}


def transcribe_mars_m(gamma, exact, clip):
    W0, grads, lookahead = trajectory()
    Ws, Ms, prev = list(W0), [torch.zeros_like(w) for w in W0], [torch.zeros_like(w) for w in W0]
    for t, G_t in enumerate(grads):
        for i, G in enumerate(G_t):
            C = G + gamma * BETA / (1 - BETA) * (G - prev[i])
            if clip and C.norm() > 1:
                C = C / C.norm()
            Ms[i] = BETA * Ms[i] + (1 - BETA) * C
            Ws[i] = apply(Ws[i], polar_svd(Ms[i]), "match_rms_adamw")
            prev[i] = lookahead[t][i] if exact else G
    return Ws, {"momentum/buffer": Ms, "mars/last_grad": prev}


def transcribe_variance_adaptive(kind, gamma, eps):
    W0, grads, _ = trajectory()
    Ws, Ms, Gs = list(W0), [torch.zeros_like(w) for w in W0], [torch.zeros_like(w) for w in W0]
    for t, G_t in enumerate(grads, start=1):
        for i, G in enumerate(G_t):
            Gs[i] = BETA * Gs[i] + BETA * (1 - BETA) * (Ms[i] - G) ** 2  # with M_{t-1}
            Ms[i] = BETA * Ms[i] + (1 - BETA) * G
            M_hat, Gamma_hat = Ms[i] / (1 - BETA**t), Gs[i] / (1 - BETA**t)
            M_tilde = G + BETA / (1 - BETA) * M_hat
            if kind == "nsr":
                M_bar = M_tilde / (torch.sqrt(M_tilde**2 + gamma * Gamma_hat) + eps)
            else:
                M_bar = M_tilde / (torch.sqrt(Gamma_hat) + eps)
            Ws[i] = apply(Ws[i], polar_svd(M_bar), "match_rms_adamw")
    return Ws, {"momentum/buffer": Ms, "variance/gamma": Gs}


def transcribe_muon2(factored, beta2, eps, eps1=1e-30, form="sum", orthogonalize=polar_svd):
    W0, grads, _ = trajectory()
    Ws, Bs = list(W0), [torch.zeros_like(w) for w in W0]
    Vs = [torch.zeros_like(w) for w in W0]
    rs, cs = [torch.zeros(w.shape[0], dtype=w.dtype) for w in W0], [torch.zeros(w.shape[1], dtype=w.dtype) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Bs[i] = BETA * Bs[i] + (G if form == "sum" else (1 - BETA) * G)  # sum momentum, or the port's EMA
            if factored:
                rs[i] = beta2 * rs[i] + (1 - beta2) * (G**2 + eps1).mean(dim=1)
                cs[i] = beta2 * cs[i] + (1 - beta2) * (G**2 + eps1).mean(dim=0)
                V = torch.outer(rs[i], cs[i]) / rs[i].mean()
            else:
                Vs[i] = beta2 * Vs[i] + (1 - beta2) * G**2
                V = Vs[i]
            Ws[i] = apply(Ws[i], orthogonalize(Bs[i] / (torch.sqrt(V) + eps)), "match_rms_adamw")
    # the optimizer keeps the EMA M = (1 - β) B
    state = {"momentum/buffer": [(1 - BETA) * b if form == "sum" else b for b in Bs]}
    state.update({"second_moment/row": rs, "second_moment/col": cs} if factored else {"second_moment/v": Vs})
    return Ws, state


def transcribe_post_polar():
    W0, grads, _ = trajectory()
    Ws, Ms = list(W0), [torch.zeros_like(w) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ms[i] = BETA * Ms[i] + (1 - BETA) * polar_svd(G)
            Ws[i] = apply(Ws[i], Ms[i], "match_rms_adamw")
    return Ws, {"momentum/buffer": Ms}


def transcribe_polar_only():
    W0, grads, _ = trajectory()
    Ws = list(W0)
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ws[i] = apply(Ws[i], polar_svd(G), "match_rms_adamw")
    return Ws, {}


SVD = dict(orthogonalizer={"method": "svd"}, lr=LR, weight_decay=WD)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
def test_muon_equations(nesterov, rule):
    check(*run_optimizer(lambda ps: Muon(ps, momentum=BETA, nesterov=nesterov, adjust_lr_fn=rule, **SVD)),
          *transcribe_muon(nesterov, rule))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("clip", [True, False])
def test_mars_m_equations(exact, clip):
    check(*run_optimizer(lambda ps: MARSM(ps, momentum=BETA, gamma=0.3, exact=exact, clip=clip, **SVD)),
          *transcribe_mars_m(0.3, exact, clip))


def test_mars_m_clip_is_active_on_this_trajectory():
    """The clip test above must see corrected gradients beyond unit norm, or it would test nothing."""
    _, grads, _ = trajectory()
    assert all(g.norm() > 1 for g in grads[0])


def test_muon_nsr_equations():
    check(*run_optimizer(lambda ps: MuonNSR(ps, momentum=BETA, gamma=10.0, eps=1e-8, **SVD)),
          *transcribe_variance_adaptive("nsr", 10.0, 1e-8))


def test_muon_vs_equations():
    check(*run_optimizer(lambda ps: MuonVS(ps, momentum=BETA, eps=1e-8, **SVD)),
          *transcribe_variance_adaptive("vs", None, 1e-8))


@pytest.mark.parametrize("cls,factored", [(Muon2, False), (Muon2F, True)])
def test_muon2_equations(cls, factored):
    check(*run_optimizer(lambda ps: cls(ps, momentum=BETA, beta2=0.9, eps=1e-10, **SVD)),
          *transcribe_muon2(factored, 0.9, 1e-10))


def test_muon2_with_the_ports_ema_momentum():
    """B = M/(1 − β) is a scalar, so only Newton–Schulz's normalisation ε tells the forms apart: a large one here."""
    ns = dict(lr=LR, weight_decay=WD, momentum=BETA, beta2=0.9, eps=1e-10, orthogonalizer=dict(dtype="float64", norm="add", eps=3.0))
    orthogonalize = lambda X: newton_schulz(X, 3, "kj", torch.float64, 3.0, "add")  # noqa: E731
    ema = run_optimizer(lambda ps: Muon2(ps, momentum_form="ema", **ns))
    check(*ema, *transcribe_muon2(False, 0.9, 1e-10, form="ema", orthogonalize=orthogonalize))
    summed = run_optimizer(lambda ps: Muon2(ps, **ns))
    check(*summed, *transcribe_muon2(False, 0.9, 1e-10, orthogonalize=orthogonalize))
    assert rel(ema[0][0].detach(), summed[0][0].detach()) > 1e-3


def transcribe_moonlight(nesterov, ns_eps):
    """Moonlight's sum buffer B = βB + G, N = G + βB (Nesterov) or B, then Newton–Schulz with X / (‖X‖_F + ε)."""
    W0, grads, _ = trajectory()
    Ws, Bs = list(W0), [torch.zeros_like(w) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Bs[i] = BETA * Bs[i] + G
            N = G + BETA * Bs[i] if nesterov else Bs[i]
            Ws[i] = apply(Ws[i], newton_schulz(N, 5, "kj", torch.float64, ns_eps, "add"), "match_rms_adamw")
    return Ws, {"momentum/buffer": [(1 - BETA) * b for b in Bs]}


@pytest.mark.parametrize("cls,nesterov", [(Muon, True), (Muon, False), (PrePolar, False)])
def test_sum_momentum_form_is_moonlights_buffer(cls, nesterov):
    """With a large normalisation ε the two forms differ (only ε sees the factor 1/(1 − β) between them)."""
    ns = dict(lr=LR, weight_decay=WD, momentum=BETA, nesterov=nesterov, orthogonalizer=dict(dtype="float64", norm="add", eps=3.0))
    check(*run_optimizer(lambda ps: cls(ps, momentum_form="sum", **ns)), *transcribe_moonlight(nesterov, 3.0))
    ema, _ = run_optimizer(lambda ps: cls(ps, **ns))
    summed, _ = run_optimizer(lambda ps: cls(ps, momentum_form="sum", **ns))
    assert rel(ema[0].detach(), summed[0].detach()) > 1e-3


def test_unknown_momentum_form_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown momentum_form 'nesterov'; valid: \['ema', 'sum'\]"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], momentum_form="nesterov")


def test_muon_nsr_reshuffled_normalises_after_newton_schulz():
    """Muon-NSR-Reshuffled (our form, optim/variance_adaptive.py): O = polar(M̃), Ō = O / (sqrt(O² + γΓ̂) + ε) · ‖O‖/‖·‖."""
    W0, grads, _ = trajectory()
    Ws, Ms, Gs = list(W0), [torch.zeros_like(w) for w in W0], [torch.zeros_like(w) for w in W0]
    gamma, eps = 10.0, 1e-8
    for t, G_t in enumerate(grads, start=1):
        for i, G in enumerate(G_t):
            Gs[i] = BETA * Gs[i] + BETA * (1 - BETA) * (Ms[i] - G) ** 2
            Ms[i] = BETA * Ms[i] + (1 - BETA) * G
            M_tilde = G + BETA / (1 - BETA) * Ms[i] / (1 - BETA**t)
            O = polar_svd(M_tilde)
            O_bar = O / (torch.sqrt(O**2 + gamma * Gs[i] / (1 - BETA**t)) + eps)
            Ws[i] = apply(Ws[i], O_bar * O.norm() / O_bar.norm(), "match_rms_adamw")
    check(*run_optimizer(lambda ps: MuonNSR(ps, momentum=BETA, gamma=gamma, eps=eps, reshuffled=True, **SVD)),
          Ws, {"momentum/buffer": Ms, "variance/gamma": Gs})


def test_pre_polar_equations():
    check(*run_optimizer(lambda ps: PrePolar(ps, momentum=BETA, **SVD)), *transcribe_muon(False, "match_rms_adamw"))


def test_post_polar_equations():
    check(*run_optimizer(lambda ps: PostPolar(ps, momentum=BETA, **SVD)), *transcribe_post_polar())


def test_polar_only_equations():
    check(*run_optimizer(lambda ps: PolarOnly(ps, **SVD)), *transcribe_polar_only())


# ---- identities (reference/optimizers.md §11.2) ------------------------------------------------

def final(make, **kw):
    return [p.detach() for p in run_optimizer(make, **kw)[0]]


def assert_same(a, b, tol):
    assert all(rel(x, y) < tol for x, y in zip(a, b))


def test_mars_m_without_correction_is_non_nesterov_muon_on_clipped_gradients():
    W0, grads, _ = trajectory()
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    muon = Muon(params, momentum=BETA, nesterov=False, adjust_lr_fn="match_rms_adamw", **SVD)
    for G_t in grads:
        for p, G in zip(params, G_t):
            p.grad = G / max(1.0, G.norm().item())
        muon.step()
    assert_same(final(lambda ps: MARSM(ps, momentum=BETA, gamma=0.0, **SVD)), [p.detach() for p in params], 1e-12)


def test_nsr_with_huge_gamma_is_vs():
    nsr = final(lambda ps: MuonNSR(ps, momentum=BETA, gamma=1e16, eps=0.0, **SVD))
    vs = final(lambda ps: MuonVS(ps, momentum=BETA, eps=0.0, **SVD))
    assert_same(nsr, vs, 1e-7)


def test_the_three_pipelines_coincide_at_beta_zero():
    pre = final(lambda ps: PrePolar(ps, momentum=0.0, **SVD))
    post = final(lambda ps: PostPolar(ps, momentum=0.0, **SVD))
    only = final(lambda ps: PolarOnly(ps, **SVD))
    assert_same(pre, only, 1e-12)
    assert_same(post, only, 1e-12)


def test_muon2_with_a_constant_second_moment_is_muon():
    """Gradients of ±1 entries have G² ≡ 1, so V is a constant matrix and B/(sqrt(V)) ∝ B."""
    W0, grads, _ = trajectory()
    signs = [[g.sign() for g in G_t] for G_t in grads]

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in W0]
        opt = make(params)
        for G_t in signs:
            for p, G in zip(params, G_t):
                p.grad = G.clone()
            opt.step()
        return [p.detach() for p in params]

    muon2 = run(lambda ps: Muon2(ps, momentum=BETA, eps=0.0, **SVD))
    muon = run(lambda ps: Muon(ps, momentum=BETA, nesterov=False, **SVD))
    assert_same(muon2, muon, 1e-12)


SCALE_INVARIANT = {
    "Muon": lambda ps: Muon(ps, momentum=BETA, **SVD),
    "MuonNSR": lambda ps: MuonNSR(ps, momentum=BETA, eps=0.0, **SVD),
    "MuonVS": lambda ps: MuonVS(ps, momentum=BETA, eps=0.0, **SVD),
    "Muon2": lambda ps: Muon2(ps, momentum=BETA, eps=0.0, **SVD),
    "Muon2F": lambda ps: Muon2F(ps, momentum=BETA, eps=0.0, **SVD),
    "PrePolar": lambda ps: PrePolar(ps, momentum=BETA, **SVD),
    "PostPolar": lambda ps: PostPolar(ps, momentum=BETA, **SVD),
    "PolarOnly": lambda ps: PolarOnly(ps, **SVD),
}


@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_updates_are_invariant_to_scaling_the_gradient_sequence(name):
    assert_same(final(SCALE_INVARIANT[name], scale=1e3), final(SCALE_INVARIANT[name]), 1e-9)


def test_mars_m_is_not_scale_invariant_because_of_its_clip():
    make = lambda ps: MARSM(ps, momentum=BETA, **SVD)  # noqa: E731
    assert rel(final(make, scale=1e-3)[0], final(make)[0]) > 1e-3


def test_ema_nesterov_equals_sum_nesterov_after_orthogonalization():
    """Keller Jordan's (1-β)G + βM and Moonlight's G + βB with B = βB + G."""
    _, grads, _ = trajectory()
    M, B = torch.zeros(24, 12, dtype=torch.float64), torch.zeros(24, 12, dtype=torch.float64)
    for G_t in grads:
        G = G_t[0]
        M, B = BETA * M + (1 - BETA) * G, BETA * B + G
        assert rel(polar_svd((1 - BETA) * G + BETA * M), polar_svd(G + BETA * B)) < 1e-12


# ---- state, resume, defaults, errors -------------------------------------------------------------

ALL = {
    "Muon": lambda ps: Muon(ps), "MARSM": lambda ps: MARSM(ps), "MARSM-exact": lambda ps: MARSM(ps, exact=True),
    "MuonNSR": lambda ps: MuonNSR(ps), "MuonVS": lambda ps: MuonVS(ps), "Muon2": lambda ps: Muon2(ps),
    "Muon2F": lambda ps: Muon2F(ps), "PrePolar": lambda ps: PrePolar(ps), "PostPolar": lambda ps: PostPolar(ps),
    "PolarOnly": lambda ps: PolarOnly(ps), "NorMuon": lambda ps: NorMuon(ps), "AdaMuon": lambda ps: AdaMuon(ps),
    "Dion": lambda ps: Dion(ps, rank_fraction=0.5), "Muon-cautious": lambda ps: Muon(ps, cautious_weight_decay=True),
}


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_identically(name):
    """Interrupt after 3 of 6 steps, rebuild from state_dict, finish: identical to no interruption."""
    straight, _ = run_optimizer(ALL[name])
    W0, grads, lookahead = trajectory()
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = ALL[name](params)
    for t in range(3):
        feed_and_step(opt, params, grads[t], lookahead[t])
    saved_params, saved_state = copy.deepcopy([p.detach() for p in params]), copy.deepcopy(opt.state_dict())
    params = [torch.nn.Parameter(w) for w in saved_params]
    opt = ALL[name](params)
    opt.load_state_dict(saved_state)
    for t in range(3, STEPS):
        feed_and_step(opt, params, grads[t], lookahead[t])
    for a, b in zip(params, straight):
        assert torch.equal(a.detach(), b.detach())


MATRIX_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "optim").glob("*.yaml")
                        if p.stem not in ("adamw", "muon_torch"))  # muonlab's matrix optimizers


def own_matrix_settings(name: str) -> dict:
    """The `matrix:` entries an optim file and the optim files it extends write themselves."""
    data = yaml.safe_load((ROOT / "configs" / "optim" / f"{name}.yaml").read_text())
    parents = [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    settings = {}
    for parent in parents:
        settings.update(own_matrix_settings(parent))
    return {**settings, **(data.get("matrix") or {})}


@pytest.mark.parametrize("name", MATRIX_CONFIGS)
def test_optim_configs_run_the_python_defaults_and_write_only_their_departures(name):
    """optim=<name> builds its class with the Python defaults except where its file (or the file it extends)
    writes a value, and every value it writes differs from the default (no second home for a default)."""
    from configs import compose

    matrix = compose([f"optim={name}"]).optim.matrix
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    built = hydra.utils.instantiate(matrix, _partial_=True, _convert_="all")(p).param_groups[0]
    reference = hydra.utils.get_class(matrix._target_)(p).param_groups[0]
    own = own_matrix_settings(name)
    own.pop("_target_", None)
    assert {"lr", "weight_decay"}.isdisjoint(own)  # shared with AdamW through optim.lr / optim.weight_decay
    for key in set(reference) - {"params", "lr"}:
        if key in own:
            assert built[key] == own[key] != reference[key], key
        else:
            assert built[key] == reference[key], key
    assert built["lr"] == compose([f"optim={name}"]).optim.lr


@pytest.mark.parametrize("cls", [MARSM, Muon, Muon2, Muon2F, MuonNSR, MuonVS, PolarOnly, PostPolar, PrePolar, NorMuon, AdaMuon])
def test_the_orthogonalizer_settings_are_one_argument(cls):
    from optim.matrix import constructor_defaults

    defaults = constructor_defaults(cls)
    assert not [name for name in defaults if name.startswith("ns_")]
    assert defaults["orthogonalizer"] == Orthogonalizer(steps=3 if cls in (Muon2, Muon2F) else 5)
    if cls is PrePolar:  # Muon without Nesterov, every other argument Muon's
        assert defaults == {**constructor_defaults(Muon), "nesterov": False}
    assert ("eps" in defaults) == (cls in (Muon2, Muon2F, MuonNSR, MuonVS, NorMuon, AdaMuon))  # the preconditioner's own


def test_defaults_follow_the_released_code():
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    mars = MARSM(p).param_groups[0]
    assert (mars["gamma"], mars["momentum"], mars["adjust_lr_fn"], mars["orthogonalizer"]["steps"]) == (0.025, 0.95, "match_rms_adamw", 5)
    nsr = MuonNSR(p).param_groups[0]
    assert (nsr["gamma"], nsr["eps"], nsr["adjust_lr_fn"]) == (10.0, 1e-8, "match_rms_adamw")
    steps = {cls.__name__: cls(p).param_groups[0]["orthogonalizer"]["steps"] for cls in (Muon, Muon2, Muon2F)}
    assert steps == {"Muon": 5, "Muon2": 3, "Muon2F": 3}
    assert Muon2(p).param_groups[0]["beta2"] == 0.95


def test_exact_mars_m_without_a_lookahead_gradient_says_what_is_missing():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = MARSM([p], exact=True)
    p.grad = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match=r"MARSM\(exact=True\) needs store_lookahead_gradients\(\) before every step"):
        opt.step()


@pytest.mark.parametrize("make,message", [
    (lambda p: Muon(p, lr=-1.0), r"Muon: lr=-1.0 must be in \[0, inf\)"),
    (lambda p: MARSM(p, momentum=1.0), r"MARSM: momentum=1.0 must be in \[0, 1\)"),
    (lambda p: MuonNSR(p, momentum=-0.1), r"MuonNSR: momentum=-0.1 must be in \[0, 1\)"),
    (lambda p: Muon2(p, beta2=1.5), r"Muon2: beta2=1.5 must be in \[0, 1\)"),
    (lambda p: MARSM(p, gamma=-0.1), r"MARSM: gamma=-0.1 must be in \[0, inf\)"),
    (lambda p: MuonVS(p, eps=-1e-8), r"MuonVS: eps=-1e-08 must be in \[0, inf\)"),
    (lambda p: PrePolar(p, orthogonalizer={"steps": 0}), r"PrePolar: orthogonalizer steps=0 must be an integer >= 1"),
    (lambda p: PostPolar(p, orthogonalizer={"coefficients": "fast"}),
     r"PostPolar: unknown Newton–Schulz coefficient set 'fast'; valid: \['convergent', 'kj', 'polar_express'\]"),
    (lambda p: PolarOnly(p, orthogonalizer={"method": "qr"}), r"PolarOnly: unknown orthogonalizer method 'qr'; valid: \['newton_schulz', 'svd'\]"),
    (lambda p: Muon(p, orthogonalizer={"step": 3}),
     r"Muon: unknown orthogonalizer setting\(s\) \['step'\]; valid: \['method', 'steps', 'coefficients', 'dtype', 'eps', 'norm'\]"),
    (lambda p: MuonNSR(p, orthogonalizer={"norm": "max"}), r"MuonNSR: unknown orthogonalizer norm 'max'; valid: \['clamp', 'add'\]"),
    (lambda p: Muon2F(p, adjust_lr_fn="unit"), r"unknown adjust_lr_fn 'unit'"),
])
def test_invalid_hyperparameters_name_the_parameter(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.zeros(4, 4))])


@pytest.mark.parametrize("name", ALL)
def test_non_matrix_parameters_are_refused(name):
    with pytest.raises(ValueError, match=r"updates 2-D matrices only; got a parameter of shape \(4,\)"):
        ALL[name]([torch.nn.Parameter(torch.zeros(4))])


def test_same_shaped_matrices_are_orthogonalized_as_one_batch(monkeypatch):
    import optim.orthogonalize as orth

    calls = []
    original = orth.newton_schulz
    monkeypatch.setattr(orth, "newton_schulz", lambda X, *a, **k: calls.append(tuple(X.shape)) or original(X, *a, **k))
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(4, 8))]
    opt = Muon(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == [(3, 8, 4), (4, 8)]
