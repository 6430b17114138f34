import pytest
import torch

from optim.orthogonalize import COEFFICIENTS, Orthogonalizer, directional_alignment, newton_schulz, polar_svd, resolve_coefficients


def random_matrix(m, n, seed=0, dtype=torch.float64):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def singular_values(X):
    return torch.linalg.svdvals(X.double())


@pytest.mark.parametrize("shape", [(16, 16), (24, 12), (12, 24)])
def test_polar_svd_is_orthogonal_and_aligned(shape):
    X = random_matrix(*shape)
    P = polar_svd(X)
    assert torch.allclose(singular_values(P), torch.ones(min(shape), dtype=torch.float64), atol=1e-12)
    # polar(X) maximises <O, X> over orthogonal O: the value is the nuclear norm
    assert torch.isclose((P * X).sum(), singular_values(X).sum(), rtol=1e-12)


def test_polar_svd_of_rank_deficient_matrix_keeps_zero_singular_values():
    X = random_matrix(10, 3) @ random_matrix(3, 8, seed=1)
    s = singular_values(polar_svd(X))
    assert torch.allclose(s[:3], torch.ones(3, dtype=torch.float64), atol=1e-10) and s[3:].max() < 1e-10


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48)])
def test_convergent_coefficients_reach_the_polar_factor_in_float64(shape):
    X = random_matrix(*shape, seed=2)
    X = X / singular_values(X).max() * 0.999  # keep every σ inside the basin after Frobenius scaling
    out = newton_schulz(X, steps=40, coefficients="convergent", dtype=torch.float64)
    assert (out - polar_svd(X)).abs().max() < 1e-8


def test_keller_jordan_quintic_spectrum_band():
    X = random_matrix(64, 32, seed=3)
    s = singular_values(newton_schulz(X, steps=5, coefficients="kj", dtype=torch.float64))
    assert 0.6 < s.min() and s.max() < 1.25  # ~Uniform(0.5, 1.5) per Keller Jordan; [0.68, 1.13] measured


def test_polar_express_is_closer_to_polar_than_kj_at_five_steps():
    X = random_matrix(64, 64, seed=4)
    P = polar_svd(X)
    err = {name: (newton_schulz(X, 5, name, torch.float64, norm="add") - P).norm() / P.norm() for name in ("kj", "polar_express")}
    assert err["polar_express"] < err["kj"]


def test_tall_input_is_the_transpose_of_the_wide_one():
    X = random_matrix(40, 10, seed=5)
    assert torch.allclose(newton_schulz(X, dtype=torch.float64), newton_schulz(X.T, dtype=torch.float64).T, atol=1e-14)


def test_scale_invariance_and_zero_input():
    X = random_matrix(20, 30, seed=6)
    assert torch.allclose(newton_schulz(X, dtype=torch.float64), newton_schulz(1e3 * X, dtype=torch.float64), atol=1e-12)
    assert newton_schulz(torch.zeros(5, 7), dtype=torch.float32).abs().max() == 0


def test_batched_call_equals_one_matrix_at_a_time():
    stack = torch.stack([random_matrix(12, 20, seed=s) for s in range(4)])
    batched = newton_schulz(stack, dtype=torch.float64)
    for i in range(4):
        assert torch.allclose(batched[i], newton_schulz(stack[i], dtype=torch.float64), atol=1e-14)


def test_apply_all_groups_same_shapes_and_keeps_order():
    orth = Orthogonalizer(dtype="float64")
    matrices = [random_matrix(8, 4, seed=0), random_matrix(6, 6, seed=1), random_matrix(8, 4, seed=2)]
    assert all(torch.allclose(a, orth(m), atol=1e-14) for a, m in zip(orth.apply_all(matrices), matrices))


def test_compute_dtype_auto_on_a_cpu_is_its_measured_choice():
    import optim.orthogonalize as orth

    expected = torch.bfloat16 if orth.cpu_prefers_bfloat16() else torch.float32
    assert newton_schulz(random_matrix(4, 4, dtype=torch.float64)).dtype == expected


@pytest.mark.parametrize("shape", [(8, 24), (40, 12), (3, 6, 18)])  # wide, tall, a batch: l >= 2s takes the Gram form
@pytest.mark.parametrize("coefficients", ["kj", "polar_express"])
def test_gram_form_has_the_iterates_last_value(shape, coefficients):
    from optim.orthogonalize import newton_schulz_iterates

    X = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    *_, last = newton_schulz_iterates(X, 5, coefficients, torch.float64)
    assert torch.allclose(newton_schulz(X, 5, coefficients, torch.float64), last, rtol=0, atol=1e-12)
    # float32: the Gram form restarts before ‖Q‖ <= prod a_k passes 50, so it stays near the iterates' ~1e-6
    assert (newton_schulz(X.float(), 5, coefficients, torch.float32).double() - last).abs().max() < 1e-5


@pytest.mark.parametrize("s", [96, 320])  # 320: the symmetric products of a CPU in both (symmetric_product)
@pytest.mark.parametrize("coefficients", ["kj", "polar_express"])
def test_gram_form_in_float32_stays_within_a_few_times_the_iterates_rounding(coefficients, s):
    """Singular values spread over six decades, where ‖Q‖ reaches its bound ∏ a_k: restarted at a gain of 50,
    the Gram form keeps float32 rounding within a few times the iterates' own (in one segment, gain 484
    for Keller Jordan's five steps, it was 16x here and 60x in the spectral norm)."""
    from optim.orthogonalize import newton_schulz_iterates

    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(3 * s, s, generator=g, dtype=torch.float64))[0]
    X = U @ torch.diag(torch.logspace(0, -6, s, dtype=torch.float64)) @ V.T
    *_, exact = newton_schulz_iterates(X, 5, coefficients, torch.float64)
    *_, iterates = newton_schulz_iterates(X.float(), 5, coefficients, torch.float32)
    iterates_error = (iterates.double() - exact).abs().max()
    gram_error = (newton_schulz(X.float(), 5, coefficients, torch.float32).double() - exact).abs().max()
    assert gram_error < 5 * iterates_error < 1e-4


def test_symmetric_products_equal_the_whole_products_to_rounding(monkeypatch):
    """symmetric_product mirrors the upper-right block, at two levels here (601 -> 300 + 301 -> 150 + 151, odd
    sizes too); Newton–Schulz with it, in both forms, is the plain products' result up to float32 rounding."""
    from optim import orthogonalize

    g = torch.Generator().manual_seed(3)
    Y = torch.randn(2, 601, 700, generator=g)
    A = Y @ Y.mT
    for left, right, whole in ((Y, Y.mT, A), (A, A, A @ A), (A, A @ A, A @ A @ A)):
        product = orthogonalize.symmetric_product(left, right)
        assert (product - whole).abs().max() < 1e-6 * whole.abs().max()
        assert torch.equal(product[:, 300:, :300], product[:, :300, 300:].mT)
        assert torch.equal(product[:, 450:, 300:450], product[:, 300:450, 450:].mT)
    X = torch.randn(300, 900, generator=g)
    square = torch.randn(300, 300, generator=g)
    with_blocks = [newton_schulz(M, dtype=torch.float32) for M in (X, square)]
    monkeypatch.setattr(orthogonalize, "SYMMETRIC_MIN_CPU", 10**9)
    for M, blocks in zip((X, square), with_blocks):
        assert (blocks - newton_schulz(M, dtype=torch.float32)).abs().max() < 1e-5


def test_matmul_work_of_a_gpt2_layer_in_units_of_s_cubed(monkeypatch):
    """The multiply-adds of one step on a GPT-2 layer's four matrices (s x 3s, s x s, 4s x s, s x 4s), counted on
    the code's own path by torch's FlopCounterMode (benchmarks/matrix_step.py's count), in units of s³ (s = 512:
    the same two levels of symmetric blocks as GPT-2 small's 768). Newton–Schulz, per step, is a Gram matrix, its square and a product with Y;
    ours takes the Gram form for l >= 2s and mirrors symmetric blocks (5/8 of their multiply-adds):
        torch.optim.Muon, 5 steps:  5 (2l + 1) per matrix                      -> 140
        our Muon, 5 steps (3 + 2):  3.25 l + 9.875 (Gram), 11.25 (square)      -> 76.625, 0.547x torch's
        Muon², 3 steps:             1.625 l + 6.375 (Gram), 6.75 (square)      -> 43.75, 0.571x our Muon
    so 0.571x is the floor of Muon²'s step time against Muon's (benchmarks/matrix_step.py prints both)."""
    from torch.optim import Muon as TorchMuon

    from benchmarks.matrix_step import multiply_adds
    from optim import Muon, Muon2

    s = 512
    shapes = [(s, 3 * s), (s, s), (4 * s, s), (s, 4 * s)]

    def units(make) -> float:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        return multiply_adds(make(params)) / s**3

    fp32 = {"dtype": "float32"}
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())  # torch's bf16 cast: ~100x slower on some CPUs
    assert units(lambda ps: TorchMuon(ps, adjust_lr_fn="match_rms_adamw")) == 140
    assert units(lambda ps: Muon(ps, orthogonalizer=fp32)) == 76.625
    assert units(lambda ps: Muon2(ps, orthogonalizer=fp32)) == 43.75


def test_bfloat16_symmetric_products_on_a_cpu_are_one_batched_product():
    """A CPU's bf16 matmuls lose more to smaller blocks than the blocks save (optim/orthogonalize.py,
    symmetric_product), so in bf16 the product is one torch.bmm; float32 still multiplies three blocks."""
    from optim import orthogonalize

    def products(Y):
        calls, real = [], {name: getattr(torch, name) for name in ("bmm", "matmul")}
        with pytest.MonkeyPatch.context() as patch:
            for name, f in real.items():
                patch.setattr(torch, name, lambda *a, _f=f, _name=name, **k: calls.append(_name) or _f(*a, **k))
            product = orthogonalize.symmetric_product(Y, Y.mT)
        return product, sorted(calls)

    Y = torch.randn(2, 300, 700, generator=torch.Generator().manual_seed(5))
    product, calls = products(Y.bfloat16())
    assert calls == ["bmm"] and torch.equal(product, torch.bmm(Y.bfloat16(), Y.bfloat16().mT))
    assert products(Y)[1] == ["bmm", "bmm", "matmul"]  # two diagonal blocks (150 rows: whole) and the corner


def test_norm_conventions_differ_only_by_eps():
    X = random_matrix(8, 8, seed=7)
    clamp = newton_schulz(X, dtype=torch.float64, norm="clamp")
    add = newton_schulz(X, dtype=torch.float64, norm="add")
    assert 0 < (clamp - add).abs().max() < 1e-6


def test_bad_settings_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown Newton–Schulz coefficient set 'kjj'; valid: \['convergent', 'kj', 'polar_express'\]"):
        Orthogonalizer(coefficients="kjj")
    with pytest.raises(ValueError, match="unknown orthogonalizer method 'qr'"):
        Orthogonalizer(method="qr")
    with pytest.raises(ValueError, match="unknown compute dtype 'fp8'"):
        Orthogonalizer(dtype="fp8")
    with pytest.raises(ValueError, match=r"orthogonalizer steps=2.5 must be an integer >= 1"):
        Orthogonalizer(steps=2.5)
    assert Orthogonalizer(coefficients=(1.5, -0.5, 0.0)).triples == ((1.5, -0.5, 0.0),)


def test_a_mapping_of_settings_keeps_the_rest_of_its_base():
    base = Orthogonalizer(steps=3, eps=1e-5)
    assert Orthogonalizer.of({"dtype": "float64"}, base=base) == Orthogonalizer(steps=3, eps=1e-5, dtype="float64")
    assert Orthogonalizer.of({"steps": 7}) == Orthogonalizer(steps=7)
    assert Orthogonalizer.of(base) is base
    assert Orthogonalizer.of(base.settings()) == base  # what a param group and its checkpoint hold
    assert len(COEFFICIENTS["polar_express"]) == 5


def test_directional_alignment_matches_its_closed_form():
    """NS_k(X) = U f_k(Σ) Vᵀ, so DA_k = Σ f_k(σ_i) / (sqrt(r) · sqrt(Σ f_k(σ_i)²)) with f_k the scalar
    quintic iterated k times on σ / ‖X‖_F."""
    X = random_matrix(40, 24, seed=8)
    sigma = singular_values(X) / X.norm()
    a, b, c = resolve_coefficients("kj")[0]
    expected = []
    for _ in range(5):
        sigma = a * sigma + b * sigma**3 + c * sigma**5
        expected.append((sigma.sum() / (sigma.numel() ** 0.5 * sigma.norm())).item())
    assert directional_alignment(X, steps=5) == pytest.approx(expected, abs=1e-12)
    assert directional_alignment(polar_svd(X), steps=3) == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)


def test_directional_alignment_of_the_convergent_set_rises_to_one():
    da = directional_alignment(random_matrix(32, 32, seed=9), steps=12, coefficients="convergent")
    assert all(later >= earlier - 1e-12 for earlier, later in zip(da, da[1:])) and da[-1] > 0.999


@pytest.mark.parametrize("name,low,high", [("kj", 0.6, 1.25), ("polar_express", 0.8, 1.2), ("convergent", 0.999, 1.0 + 1e-9)])
def test_output_spectrum_inside_each_sets_band(name, low, high):
    X = random_matrix(64, 32, seed=10)
    X = X / singular_values(X).max()  # a spectrum in (0, 1] with a moderate condition number
    steps = {"kj": 5, "polar_express": 5, "convergent": 30}[name]
    s = singular_values(newton_schulz(X, steps=steps, coefficients=name, dtype=torch.float64))
    assert low < s.min() and s.max() < high


@pytest.mark.parametrize("bf16_seconds,choice", [(0.4, "bfloat16"), (400.0, "float32"), (0.8, "float32")])
def test_auto_dtype_on_a_cpu_is_bf16_only_where_its_matmul_is_clearly_faster(monkeypatch, capsys, bf16_seconds, choice):
    """AMX / AVX-512 BF16: ~2x faster than fp32; without them ~400x slower; within the 1.5x margin: fp32."""
    import optim.orthogonalize as orth

    monkeypatch.setattr(orth, "matmul_seconds", lambda dtype, size: 1.0 if dtype == torch.float32 else bf16_seconds)
    orth.cpu_prefers_bfloat16.cache_clear()
    try:
        assert orth.resolve_dtype("auto", torch.device("cpu")) == getattr(torch, choice)
        assert orth.resolve_dtype("auto", torch.device("cpu")) == getattr(torch, choice)
        assert capsys.readouterr().out.count(f"orthogonalizer dtype=auto: Newton–Schulz in {choice} on this CPU") == 1  # said once
    finally:
        orth.cpu_prefers_bfloat16.cache_clear()


@pytest.mark.parametrize("supported,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_takes_bfloat16_on_a_gpu_only_where_it_computes_in_it(monkeypatch, supported, expected):
    """dtype=auto on CUDA: bf16 on Ampere and newer; fp32 on a V100/T4, whose bf16 is emulated."""
    from optim import orthogonalize

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported and not including_emulation)
    orthogonalize.cuda_computes_bfloat16.cache_clear()
    try:
        assert orthogonalize.resolve_dtype("auto", torch.device("cuda")) == expected
    finally:
        orthogonalize.cuda_computes_bfloat16.cache_clear()
