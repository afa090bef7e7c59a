"""BSO and T-BSO against hand-computed updates and a direct reference implementation."""

import pytest
import torch
from torch import nn

from bso.optim import BSO, TBSO, OptimizerRouter, build_router
from bso.optim.binary import flip_where_above


def _param(values):
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))


def _step(opt, p, grad, t=None):
    p.grad = torch.tensor(grad, dtype=torch.float32)
    return opt.step(t)


# ---------------------------------------------------------------- BSO (Eq. 11-12)


def test_bso_hand_computed_with_momentum_reset():
    w = _param([1.0, -1.0, 1.0, -1.0])
    opt = BSO([w], gamma=0.6, beta=0.5, reset_momentum=True)
    # M = 0.5*0 + 0.5*[2, 2, -2, -2] = [1, 1, -1, -1];  W*M = [1, -1, -1, 1] > 0.6 at 0 and 3
    flips = _step(opt, w, [2.0, 2.0, -2.0, -2.0])
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert flips.tolist() == [2]
    assert opt.state[w]["momentum"].tolist() == [0.0, 1.0, -1.0, 0.0]  # reset where flipped
    # M = 0.5*[0, 1, -1, 0] + 0.5*[-2, 0, 0, 0] = [-1, .5, -.5, 0];  W*M = [1, -.5, -.5, 0]
    flips = _step(opt, w, [-2.0, 0.0, 0.0, 0.0])
    assert w.tolist() == [1.0, -1.0, 1.0, 1.0]
    assert flips.tolist() == [1]
    assert opt.state[w]["momentum"].tolist() == [0.0, 0.5, -0.5, 0.0]


def test_bso_without_momentum_reset_keeps_momentum():
    w = _param([1.0, -1.0, 1.0, -1.0])
    opt = BSO([w], gamma=0.6, beta=0.5, reset_momentum=False)
    _step(opt, w, [2.0, 2.0, -2.0, -2.0])
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert opt.state[w]["momentum"].tolist() == [1.0, 1.0, -1.0, -1.0]
    # M0 = 0.5*1 + 0.5*(-2) = -0.5; W0*M0 = 0.5 < 0.6: no flip back (with a reset it would flip)
    flips = _step(opt, w, [-2.0, 0.0, 0.0, 0.0])
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert flips.tolist() == [0]


@pytest.mark.parametrize("backend", ["release", "fast", "fused"])
def test_bso_flip_condition_is_strict_and_signed(backend):
    # W*M == gamma does not flip; a gradient that agrees with the weight's sign never flips it.
    w = _param([1.0, 1.0, -1.0])
    opt = BSO([w], gamma=0.5, beta=0.0, backend=backend)
    _step(opt, w, [0.5, -3.0, 3.0])  # W*M = [0.5, -3, -3]
    assert w.tolist() == [1.0, 1.0, -1.0]


# ---------------------------------------------------------------- T-BSO (Eq. 13-14)


def test_tbso_hand_computed_second_moment_per_layer_and_time_step():
    a, b = _param([1.0, -1.0]), _param([1.0, 1.0, 1.0, 1.0])
    opt = TBSO([a, b], num_steps=2, gamma=0.5, beta1=0.5, beta2=0.5, eps=0.0, threshold="code")
    # t=0, layer a: M=[1, 1]; v_a[0] = 0.5*mean([4, 4]) = 2; thr = 0.5*sqrt(2) = 0.707; W*M=[1,-1]
    a.grad, b.grad = torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0, 0.0, 4.0])
    flips = opt.step(0)
    assert a.tolist() == [-1.0, -1.0]
    # layer b: M=[0,0,0,2]; v_b[0] = 0.5*mean([0,0,0,16]) = 2; W*M = [0,0,0,2] > 0.707 at 3
    assert b.tolist() == [1.0, 1.0, 1.0, -1.0]
    assert flips.tolist() == [1, 1]
    assert opt.state[a]["v"].tolist() == [2.0, 0.0]
    assert opt.state[b]["v"].tolist() == [2.0, 0.0]
    assert opt.state[a]["momentum"].tolist() == [1.0, 1.0]  # no reset by default
    # t=1, layer a: M = [0.5, 0.5] + 0.5*[0, -4] = [0.5, -1.5]; v_a[1] = 0.5*8 = 4 (slot 0 kept)
    # thr = 0.5*2 = 1; W*M = [-0.5, 1.5] -> flip index 1
    a.grad, b.grad = torch.tensor([0.0, -4.0]), torch.zeros(4)
    flips = opt.step(1)
    assert a.tolist() == [-1.0, 1.0]
    assert opt.state[a]["v"].tolist() == [2.0, 4.0]
    assert opt.state[b]["v"].tolist() == [2.0, 0.0]
    assert flips.tolist() == [1, 0]


@pytest.mark.parametrize("backend", ["release", "fast", "fused"])
def test_tbso_second_moment_weighs_the_old_value_by_beta2(backend):
    """v[t] = beta2 v[t] + (1 - beta2) mean(G^2) with beta2 = 0.75 (at 0.5 the two weights agree),
    in both float orders (exact binary fractions: the same values)."""
    w = _param([1.0, 1.0])
    opt = TBSO([w], 1, gamma=0.5, beta1=0.5, beta2=0.75, eps=0.0, threshold="code", backend=backend)
    # M = 0.5 [2, -2] = [1, -1]; v = 0.25 mean([4, 4]) = 1; thr = 0.5; W*M = [1, -1]: flip 0
    assert _step(opt, w, [2.0, -2.0], 0).tolist() == [1]
    assert opt.state[w]["v"].tolist() == [1.0]
    assert w.tolist() == [-1.0, 1.0]
    # M = 0.5 [1, -1] + 0.5 [-4, 0] = [-1.5, -0.5]; v = 0.75 + 0.25 * 8 = 2.75;
    # thr = 0.5 sqrt(2.75) = 0.83; W*M = [1.5, -0.5]: flip 0 back
    assert _step(opt, w, [-4.0, 0.0], 0).tolist() == [1]
    assert opt.state[w]["v"].tolist() == [2.75]
    assert opt.state[w]["momentum"].tolist() == [-1.5, -0.5]
    assert w.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("backend", ["release", "fast", "fused"])
def test_tbso_flip_condition_is_strict(backend):
    # beta1 = beta2 = 0, G = [1, 1]: M = G, v = 1, threshold = gamma (sqrt(1) + 0) = 1 = W*M at 0
    w = _param([1.0, -1.0])
    opt = TBSO([w], 1, gamma=1.0, beta1=0.0, beta2=0.0, eps=0.0, backend=backend)
    assert _step(opt, w, [1.0, 1.0], 0).tolist() == [0]
    assert w.tolist() == [1.0, -1.0]


@pytest.mark.parametrize("backend", ["release", "fast", "fused"])
def test_tbso_threshold_forms_differ_by_where_eps_goes(backend):
    # beta1 = beta2 = 0: M = G = [1, -1], v = mean(G^2) = 1, W*M = [1, -1], gamma = 0.5, eps = 2.24
    #   code:  0.5 * (sqrt(1) + 2.24) = 1.62 -> no flip
    #   paper: 0.5 * sqrt(1 + 2.24)  = 0.90 -> flip index 0
    results = {}
    for form in ("code", "paper"):
        w = _param([1.0, 1.0])
        opt = TBSO(
            [w],
            1,
            gamma=0.5,
            beta1=0.0,
            beta2=0.0,
            eps=2.24,
            threshold=form,
            backend=backend,
        )
        w.grad = torch.tensor([1.0, -1.0])
        opt.step(0)
        results[form] = w.tolist()
    assert results == {"code": [1.0, 1.0], "paper": [-1.0, 1.0]}


def test_tbso_rejects_time_step_outside_T():
    w = _param([1.0])
    opt = TBSO([w], num_steps=2)
    w.grad = torch.ones(1)
    with pytest.raises(IndexError, match="T=2"):
        opt.step(2)


def _reference_tbso(w, grads_by_step, T, gamma, b1, b2, eps):
    """Direct transcription of Algorithm 1, element by element."""
    w = w.clone().double()
    m = torch.zeros_like(w)
    v = [0.0] * T
    for t, g in grads_by_step:
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v[t] = b2 * v[t] + (1 - b2) * float((g**2).mean())
        thr = gamma * (v[t] ** 0.5 + eps)
        for i in range(w.numel()):
            if w.view(-1)[i] * m.view(-1)[i] > thr:
                w.view(-1)[i] = -w.view(-1)[i]
    return w, m, v


@pytest.mark.parametrize("backend", ["release", "fast", "fused"])
def test_tbso_matches_reference_over_many_steps(backend):
    g = torch.Generator().manual_seed(0)
    T = 3
    w0 = torch.where(torch.randn(6, 5, generator=g) >= 0, 1.0, -1.0)
    steps = [(k % T, torch.randn(6, 5, generator=g) * 1e-2) for k in range(60)]
    w = nn.Parameter(w0.clone())
    opt = TBSO([w], num_steps=T, gamma=0.3, beta1=0.9, beta2=0.99, eps=1e-10, backend=backend)
    for t, grad in steps:
        w.grad = grad.clone()
        opt.step(t)
    ref_w, ref_m, ref_v = _reference_tbso(w0, steps, T, 0.3, 0.9, 0.99, 1e-10)
    assert torch.equal(w.detach().double(), ref_w)
    assert torch.allclose(opt.state[w]["momentum"].double(), ref_m, atol=1e-7)
    assert torch.allclose(opt.state[w]["v"].double(), torch.tensor(ref_v, dtype=torch.double))


@pytest.mark.parametrize("backend", ["release", "fast", "fused"])
def test_bso_matches_reference_over_many_steps(backend):
    g = torch.Generator().manual_seed(1)
    w0 = torch.where(torch.randn(40, generator=g) >= 0, 1.0, -1.0)
    grads = [torch.randn(40, generator=g) for _ in range(50)]
    w = nn.Parameter(w0.clone())
    opt = BSO([w], gamma=0.2, beta=0.8, reset_momentum=True, backend=backend)
    ref_w, ref_m = w0.clone().double(), torch.zeros(40, dtype=torch.double)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        ref_m = 0.8 * ref_m + 0.2 * grad.double()
        flip = ref_w * ref_m > 0.2
        ref_w[flip] *= -1
        ref_m[flip] = 0.0
    assert torch.equal(w.detach().double(), ref_w)


# ---------------------------------------------------------------- invariants, schedules, router


@pytest.mark.parametrize("make", [lambda p: BSO(p, gamma=1e-3), lambda p: TBSO(p, num_steps=4)])
def test_weights_stay_exactly_pm1_and_no_float_copy(make):
    g = torch.Generator().manual_seed(2)
    weights = [
        nn.Parameter(torch.where(torch.randn(s, generator=g) >= 0, 1.0, -1.0))
        for s in [(8, 4, 3, 3), (16,)]
    ]
    opt = make(weights)
    for k in range(200):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=g) * 10 ** float(torch.randint(-6, 2, (1,)))
        opt.step(k % 4)
    for w in weights:
        assert set(w.detach().unique().tolist()) <= {-1.0, 1.0}
        state = opt.state[w]
        # the only per-weight tensor is the momentum; T-BSO adds T scalars per layer
        assert set(state) <= {"momentum", "v"}
        if "v" in state:
            assert state["v"].shape == (4,)
        assert not torch.equal(state["momentum"].abs(), torch.ones_like(w))


def test_defaults_are_the_papers_hyperparameters():
    """Paper: gamma 5e-7 (CIFAR), beta = beta1 = 1 - 1e-3, beta2 = 1 - 1e-5, eps 1e-10; the released
    code's threshold form, momentum reset (BSO only) and float order."""
    bso = BSO([_param([1.0])]).param_groups[0]
    assert (bso["gamma"], bso["beta"], bso["reset_momentum"]) == (5e-7, 1 - 1e-3, True)
    assert bso["backend"] == "release"
    tbso = TBSO([_param([1.0])], num_steps=2).param_groups[0]
    assert (tbso["gamma"], tbso["beta1"], tbso["beta2"], tbso["eps"]) == (
        5e-7,
        1 - 1e-3,
        1 - 1e-5,
        1e-10,
    )
    assert (tbso["threshold"], tbso["reset_momentum"], tbso["backend"]) == (
        "code",
        False,
        "release",
    )


def test_the_flip_tests_do_not_flip_a_tie():
    """The release's test flips where value > 0 (value = W*M - gamma); W*M == gamma does not flip."""
    value = torch.tensor([-1.0, 0.0, -0.0, 1e-45, 1.0])
    assert flip_where_above(value, 0.0).tolist() == [False, False, False, True, True]
    assert flip_where_above(value + 0.5, 0.5).tolist() == [False, False, False, False, True]
    assert flip_where_above(torch.tensor([0.25, 0.5, 0.75]), 0.5).tolist() == [False, False, True]


def test_binary_optimizer_refuses_non_binary_weights():
    with pytest.raises(ValueError, match="exactly -1 or \\+1"):
        BSO([nn.Parameter(torch.tensor([1.0, 0.5]))])
    with pytest.raises(ValueError, match="exactly -1 or \\+1"):
        TBSO([nn.Parameter(torch.tensor([0.0]))], num_steps=1)


def test_hyperparameter_decay_schedule():
    w = _param([1.0])
    bso = BSO([w], gamma=5e-7, beta=1 - 1e-3)
    bso.decay_hyperparameters(0.1)
    assert bso.param_groups[0]["gamma"] == pytest.approx(5e-8)
    assert 1 - bso.param_groups[0]["beta"] == pytest.approx(1e-4)
    tbso = TBSO([_param([1.0])], num_steps=2, gamma=1e-6, beta1=1 - 1e-3, beta2=1 - 1e-5)
    tbso.decay_hyperparameters(0.1)
    group = tbso.param_groups[0]
    assert group["gamma"] == pytest.approx(1e-7)
    assert 1 - group["beta1"] == pytest.approx(1e-4)
    assert 1 - group["beta2"] == pytest.approx(1e-6)


def test_router_refuses_double_claims_and_full_precision_models():
    w = _param([1.0, -1.0])
    with pytest.raises(ValueError, match="both"):
        OptimizerRouter(BSO([w]), torch.optim.SGD([w], lr=0.1), ["w"])
    full = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="model.weights=binary"):
        build_router(full, BSO, None, name="optimizer=bso")


def test_router_state_dict_round_trip():
    from bso.layers import SynapticLinear

    model = nn.Sequential(SynapticLinear(4, 3, weights="binary", bias=False), nn.Linear(3, 2))
    router = build_router(model, lambda p: TBSO(p, num_steps=2), lambda p: torch.optim.SGD(p, 0.1))
    model(torch.randn(5, 4)).sum().backward()
    router.step(1)
    state = router.state_dict()
    other = build_router(model, lambda p: TBSO(p, num_steps=2), lambda p: torch.optim.SGD(p, 0.1))
    other.load_state_dict(state)
    w = model[0].weight
    assert torch.equal(other.binary.state[w]["v"], router.binary.state[w]["v"])
    assert router.binary_names == ["0.weight"]


@pytest.mark.parametrize(
    "make,beta_key",
    [
        (lambda p: BSO(p, gamma=1e-3, beta=1 - 2**-0.5), "beta"),
        (lambda p: TBSO(p, num_steps=1, gamma=0.1, beta1=1 - 2**-0.5, beta2=0.99), "beta1"),
    ],
)
def test_average_regret_vanishes_on_an_online_linear_problem(make, beta_key):
    """The paper's regret analysis: online convex losses f_k(W) = <g_k, W> over W in {-1, +1}^n with
    bounded noisy gradients g_k = mu + noise; the best fixed decision is W* = -sign(mu). With gamma
    and (1 - beta) decaying like 1/sqrt(k), as the regret analysis assumes (the optimizer's own
    schedule, decay_hyperparameters, after every step), R(K)/K shrinks."""
    import math

    g = torch.Generator().manual_seed(0)
    n = 200
    mu = torch.randn(n, generator=g) * 0.5
    w = nn.Parameter(torch.ones(n))
    opt = make([w])
    gamma0 = opt.param_groups[0]["gamma"]
    best = -torch.sign(mu)
    regret, averages = 0.0, {}
    for k in range(1, 3001):
        grad = mu + torch.randn(n, generator=g)
        regret += float(grad @ w.detach() - grad @ best)
        w.grad = grad
        opt.step(0)
        if k in (100, 1000, 3000):
            averages[k] = regret / k
        opt.decay_hyperparameters(math.sqrt(k / (k + 1)), [beta_key])  # k -> k + 1
    group = opt.param_groups[0]
    assert group["gamma"] == pytest.approx(gamma0 / math.sqrt(3001), rel=1e-9)
    assert 1 - group[beta_key] == pytest.approx(2**-0.5 / math.sqrt(3001), rel=1e-9)
    assert averages[100] > averages[1000] > averages[3000]
    assert averages[3000] < 0.35 * averages[100]
    assert set(w.detach().unique().tolist()) <= {-1.0, 1.0}
