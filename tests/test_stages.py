"""Each stage on its own, against its closed form."""

import pytest
import torch

from optim.orthogonalize import Orthogonalizer, polar_svd
from optim.stages import GradientVariance, MarsCorrection, Momentum, NoiseToSignal, Orthogonalize, SecondMoment, Step

BETA = 0.8


def step_of(grads, states, t, **group):
    group = {"momentum": BETA, "gamma": 0.5, "eps": 1e-3, "beta2": 0.9, "orthogonalizer": Orthogonalizer("svd").settings(),
             **group}
    return Step(group=group, params=[torch.zeros_like(g) for g in grads], grads=grads, states=states, counts=[t] * len(grads))


def gradients(seed, shape=(5, 3), n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def run_stage(stage, sequence, **group):
    """Feed a sequence of gradient lists through one stage; return its outputs and the states."""
    states = [{} for _ in sequence[0]]
    outputs = []
    for t, grads in enumerate(sequence, start=1):
        outputs.append(stage(list(grads), step_of(grads, states, t, **group)))
    return outputs, states


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("sum_scale", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_momentum_variants(nesterov, sum_scale, bias_correction):
    G1, G2 = gradients(0, n=1)[0], gradients(1, n=1)[0]
    outputs, states = run_stage(Momentum(nesterov, sum_scale, bias_correction), [[G1], [G2]])
    M = BETA * (1 - BETA) * G1 + (1 - BETA) * G2
    M_hat = M / (1 - BETA**2) if bias_correction else M
    N = (1 - BETA) * G2 + BETA * M_hat if nesterov else M_hat
    if sum_scale:
        N = N / (1 - BETA)
    assert torch.allclose(outputs[1][0], N, atol=1e-14)
    assert torch.allclose(states[0]["momentum/buffer"], M, atol=1e-14)


def test_sum_scaled_nesterov_is_moonlight_and_variance_adaptive_look_ahead():
    G1, G2 = gradients(2, n=2)
    outputs, _ = run_stage(Momentum(nesterov=True, sum_scale=True), [[G1], [G2]])
    B = BETA * G1 + G2  # Moonlight: B = βB + G, N = G + βB
    assert torch.allclose(outputs[1][0], G2 + BETA * B, atol=1e-14)


def test_momentum_output_is_not_the_state_buffer():
    outputs, states = run_stage(Momentum(nesterov=False), [gradients(3)])
    assert outputs[0][0] is not states[0]["momentum/buffer"]


def test_mars_correction_approximate_uses_a_copy_of_last_gradient():
    G1, G2 = gradients(4, n=2)
    stage = MarsCorrection(exact=False, clip=False)
    states = [{}]
    out1 = stage([G1], step_of([G1], states, 1))
    factor = 0.5 * BETA / (1 - BETA)
    assert torch.allclose(out1[0], (1 + factor) * G1)  # last_grad starts at zero
    G1.zero_()  # a loop that zeroes gradients in place must not cancel the correction
    out2 = stage([G2], step_of([G2], states, 2))
    assert torch.allclose(out2[0], G2 + factor * (G2 - gradients(4, n=2)[0]))


def test_mars_correction_exact_uses_the_stored_lookahead():
    G, H_prev, H_next = gradients(5, n=3)
    stage = MarsCorrection(exact=True, clip=False)
    states = [{"mars/last_grad": H_prev.clone(), "mars/lookahead_grad": H_next.clone()}]
    out = stage([G], step_of([G], states, 2))
    assert torch.allclose(out[0], G + 0.5 * BETA / (1 - BETA) * (G - H_prev))
    assert torch.equal(states[0]["mars/last_grad"], H_next)  # next step's G_prev
    assert "mars/lookahead_grad" not in states[0]  # consumed: the next step needs a fresh one


def test_mars_clip_only_shrinks_to_unit_frobenius_norm():
    big, small = 10 * gradients(6, n=1)[0], 1e-3 * gradients(7, n=1)[0]
    out = MarsCorrection(clip=True)([big, small], step_of([big, small], [{}, {}], 1, gamma=0.0))
    assert out[0].norm().item() == pytest.approx(1.0)
    assert torch.allclose(out[0], big / big.norm())
    assert torch.allclose(out[1], small)


def test_gradient_variance_closed_form_and_pass_through():
    G1, G2 = gradients(8, n=1)[0], gradients(9, n=1)[0]
    stage_outputs, states = run_stage(GradientVariance(), [[G1], [G2]])
    # Γ_1 = β(1-β) G1² (M_0 = 0); the buffer is not updated by this stage, so M stays 0: Γ_2 = βΓ_1 + β(1-β) G2²
    assert torch.allclose(states[0]["variance/gamma"], BETA * BETA * (1 - BETA) * G1**2 + BETA * (1 - BETA) * G2**2)
    assert stage_outputs[1][0] is not None and torch.equal(stage_outputs[1][0], G2)


@pytest.mark.parametrize("kind", ["nsr", "vs"])
def test_noise_to_signal(kind):
    X, Gamma = gradients(10, n=2)
    Gamma = Gamma.abs()
    states = [{"variance/gamma": Gamma.clone()}]
    out = NoiseToSignal(kind)([X], step_of([X], states, 3))
    Gamma_hat = Gamma / (1 - BETA**3)
    expected = X / (torch.sqrt(X**2 + 0.5 * Gamma_hat) + 1e-3) if kind == "nsr" else X / (torch.sqrt(Gamma_hat) + 1e-3)
    assert torch.allclose(out[0], expected, atol=1e-14)
    assert torch.equal(states[0]["variance/gamma"], Gamma)  # the state is read, not changed


def test_noise_to_signal_kind_is_checked():
    with pytest.raises(ValueError, match="unknown noise-to-signal normaliser 'snr'"):
        NoiseToSignal("snr")


def test_second_moment_closed_form():
    G1, G2 = gradients(11, n=2)
    X = gradients(12, n=1)[0]
    states = [{}]
    SecondMoment()([G1], step_of([G1], states, 1))
    out = SecondMoment()([X], step_of([G2], states, 2))
    V = 0.9 * 0.1 * G1**2 + 0.1 * G2**2
    assert torch.allclose(out[0], X / (torch.sqrt(V) + 1e-3), atol=1e-14)


def test_factored_second_moment_is_exact_for_a_rank_one_square_at_the_first_step():
    a, b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(3, dtype=torch.float64) + 0.1
    G = torch.sqrt(torch.outer(a, b)) * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # G² = a bᵀ
    X = gradients(13, n=1)[0]
    full = SecondMoment()([X], step_of([G], [{}], 1))
    factored = SecondMoment(factored=True, eps1=0.0)([X], step_of([G], [{}], 1))
    assert torch.allclose(full[0], factored[0], atol=1e-13)


def test_factored_second_moment_keeps_m_plus_n_numbers():
    G = gradients(14, shape=(6, 4), n=1)
    states = [{}]
    SecondMoment(factored=True)(G, step_of(G, states, 1))
    assert states[0]["second_moment/row"].shape == (6,) and states[0]["second_moment/col"].shape == (4,)


def test_orthogonalize_returns_the_polar_factor_in_the_input_dtype():
    X = gradients(15, n=1)[0]
    out = Orthogonalize()([X.float()], step_of([X], [{}], 1))
    assert out[0].dtype == torch.float32
    assert torch.allclose(out[0].double(), polar_svd(X.float()), atol=1e-6)


def test_a_last_bf16_orthogonalize_hands_the_tail_bf16_and_the_step_keeps_its_bits():
    """As the last stage, Orthogonalize returns bf16 Newton–Schulz's result as it is (no fp32 copy); as an
    earlier one (PrePolar: then momentum) in the input's dtype. The update tail adds the bf16 direction with
    the same bits as its fp32 copy."""
    from optim import Muon
    from optim.orthogonalize import newton_schulz
    from optim.stages import update_scale

    X = gradients(16, shape=(24, 40), n=1)[0].float()
    bf16 = {"orthogonalizer": Orthogonalizer(dtype="bfloat16").settings()}
    assert Orthogonalize()([X], step_of([X], [{}], 1, **bf16))[0].dtype == torch.float32
    step = step_of([X], [{}], 1, **bf16)
    step.last = True
    assert Orthogonalize()([X], step)[0].dtype == torch.bfloat16

    W = torch.nn.Parameter(gradients(17, shape=(24, 40), n=1)[0].float())
    direction = newton_schulz(X, 5, "kj", torch.bfloat16).float()
    expected = (W.detach() * (1 - 0.02 * 0.1)).add_(direction, alpha=-0.02 * update_scale((24, 40), "match_rms_adamw"))
    W.grad = X.clone()
    optimizer = Muon([W], lr=0.02, weight_decay=0.1, momentum=0.0, nesterov=False, orthogonalizer={"dtype": "bfloat16"})
    optimizer.step()
    assert torch.equal(W.detach(), expected)
