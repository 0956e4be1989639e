"""Task balancers (genrec.train.multitask): the Pareto weight solvers against brute force, and each balancer's step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.dlrm import DLRMRanker, DLRMRankerConfig
from genrec.train.multitask import (
    FixedBalancer,
    MGDABalancer,
    PELTRBalancer,
    UncertaintyBalancer,
    build_balancer,
    min_norm_2,
    min_norm_weights,
    pe_ltr_bounds,
    pe_ltr_weights,
    project_to_simplex,
    split_parameters,
)


# ------------------------------------------------------------------------------------------------ references
def simplex_grid(T: int, steps: int, lower: np.ndarray | None = None) -> np.ndarray:
    """Every α on the simplex with coordinates in multiples of 1/steps (T = 2 or 3), those with α ≥ lower."""
    if T == 2:
        a = np.arange(steps + 1) / steps
        grid = np.stack([a, 1 - a], axis=1)
    else:
        i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
        keep = i + j <= steps
        grid = np.stack([i[keep], j[keep], steps - i[keep] - j[keep]], axis=1) / steps
    if lower is not None:
        grid = grid[(grid >= lower - 1e-12).all(axis=1)]
    return grid


def exact_min_norm(M: np.ndarray, lower: np.ndarray | None = None) -> float:
    """min αᵀMα over {α ≥ lower, Σα = 1} by enumerating which coordinates sit at their bound (small T only)."""
    T = M.shape[0]
    c = np.zeros(T) if lower is None else lower
    best = np.inf
    for size in range(1, T + 1):
        for free in itertools.combinations(range(T), size):
            free = list(free)
            fixed = [t for t in range(T) if t not in free]
            # minimise over α_free with α_fixed = c_fixed and Σ α = 1: KKT system on the free coordinates
            A = np.zeros((size + 1, size + 1))
            A[:size, :size] = 2 * M[np.ix_(free, free)]
            A[:size, size] = A[size, :size] = 1.0
            rhs = np.concatenate([-2 * M[np.ix_(free, fixed)] @ c[fixed], [1.0 - c[fixed].sum()]])
            sol = np.linalg.lstsq(A, rhs, rcond=None)[0][:size]
            alpha = c.copy()
            alpha[free] = sol
            if (alpha >= c - 1e-12).all() and abs(alpha.sum() - 1) < 1e-9:
                best = min(best, float(alpha @ M @ alpha))
    return best


def random_gradients(T: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)  # some shared direction, so that the optimum is not always 0
    return rng.normal(size=(T, dim)) + rng.uniform(0, 1.5) * common


# ------------------------------------------------------------------------------------------------ MGDA solver
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_two_task_closed_form_is_the_min_norm_point(seed):
    G = random_gradients(2, 5, seed)
    M = G @ G.T
    gamma, rest = min_norm_2(M[0, 0], M[0, 1], M[1, 1])
    assert gamma >= 0 and rest >= 0 and gamma + rest == pytest.approx(1.0)
    grid = simplex_grid(2, 20_000)
    values = np.einsum("ki,ij,kj->k", grid, M, grid)
    assert abs(gamma - grid[np.argmin(values)][0]) <= 1e-4
    assert gamma * gamma * M[0, 0] + 2 * gamma * rest * M[0, 1] + rest * rest * M[1, 1] <= values.min() + 1e-12
    assert np.allclose(min_norm_weights(M), [gamma, rest])


def test_two_task_closed_form_edge_cases():
    assert min_norm_2(1.0, 1.0, 1.0) == (1.0, 0.0)  # equal gradients
    assert min_norm_2(1.0, 2.0, 4.0) == (1.0, 0.0)  # g2 = 2 g1: g1 is the nearest point
    assert min_norm_2(4.0, 2.0, 1.0) == (0.0, 1.0)
    assert min_norm_2(1.0, -1.0, 1.0) == (0.5, 0.5)  # opposite gradients: the origin


@pytest.mark.parametrize(("T", "dim", "seed"), [(2, 4, 0), (3, 6, 1), (3, 2, 2), (3, 50, 3)])
def test_min_norm_weights_match_a_brute_force_grid(T, dim, seed):
    G = random_gradients(T, dim, seed)
    M = G @ G.T
    alpha = min_norm_weights(M)
    assert (alpha >= 0).all() and alpha.sum() == pytest.approx(1.0, abs=1e-12)
    value = float(alpha @ M @ alpha)
    grid = simplex_grid(T, 600)
    values = np.einsum("ki,ij,kj->k", grid, M, grid)
    assert value <= values.min() + 1e-12  # no grid point is nearer the origin
    assert value == pytest.approx(exact_min_norm(M), rel=1e-9, abs=1e-12)
    if np.linalg.matrix_rank(M) == T:  # a unique minimiser: the grid's best point lies next to it
        assert np.abs(alpha - grid[np.argmin(values)]).max() <= 2.0 / 600


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_norm_weights_for_many_tasks_are_exact(seed):
    G = random_gradients(6, 8, seed)
    M = G @ G.T
    alpha = min_norm_weights(M)
    assert (alpha >= 0).all() and alpha.sum() == pytest.approx(1.0)
    assert float(alpha @ M @ alpha) == pytest.approx(exact_min_norm(M), rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_min_norm_combination_is_a_common_descent_direction(seed):
    G = random_gradients(5, 12, seed)
    alpha = min_norm_weights(G @ G.T)
    d = alpha @ G  # the min-norm point of the hull
    inner = G @ d  # g_t · d for every task
    assert (inner >= -1e-9).all(), inner
    assert (inner >= d @ d - 1e-9 * max(1.0, d @ d)).all()  # the optimality condition g_t · d ≥ ‖d‖²
    # with two exactly opposed tasks the min-norm point is the origin (Pareto-stationary): no task is hurt
    G2 = np.stack([G[0], -G[0], G[1]])
    d2 = min_norm_weights(G2 @ G2.T) @ G2
    assert np.linalg.norm(d2) <= 1e-6 * np.linalg.norm(G[0])


def test_min_norm_weights_refuse_bad_input():
    with pytest.raises(ValueError, match="square"):
        min_norm_weights(np.ones((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        min_norm_weights(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    assert np.allclose(min_norm_weights(np.zeros((3, 3))), 1 / 3)  # all gradients 0: any α; the uniform one


# ------------------------------------------------------------------------------------------------ PE-LTR solver
@pytest.mark.parametrize("seed", range(6))
def test_projection_onto_the_simplex_satisfies_its_optimality_conditions(seed):
    rng = np.random.default_rng(seed)
    x, total = rng.normal(size=5) * 2, float(rng.uniform(0.2, 2.0))
    y = project_to_simplex(x, total)
    assert (y >= 0).all() and y.sum() == pytest.approx(total)
    # y = max(x − τ, 0): the moved coordinates all moved by the same τ, the zeroed ones had x ≤ τ
    tau = (x - y)[y > 0]
    assert np.allclose(tau, tau[0]) and (x[y == 0] <= tau[0] + 1e-12).all()
    # and no point of a fine grid on the simplex (3 coordinates) is nearer
    x3 = x[:3]
    y3 = project_to_simplex(x3, 1.0)
    grid = simplex_grid(3, 400)
    assert np.sum((y3 - x3) ** 2) <= np.min(np.sum((grid - x3) ** 2, axis=1)) + 1e-12


@pytest.mark.parametrize(("T", "seed"), [(2, 0), (3, 1), (3, 2), (3, 3), (4, 4)])
def test_pe_ltr_weights_satisfy_the_bounds_and_follow_the_paper(T, seed):
    rng = np.random.default_rng(seed)
    G = random_gradients(T, 6, seed)
    M = G @ G.T
    bounds = pe_ltr_bounds(rng.uniform(0.2, 2.0, T), 0.5)
    alpha = pe_ltr_weights(M, bounds)
    assert alpha.sum() == pytest.approx(1.0, abs=1e-12) and (alpha >= bounds - 1e-12).all() and (alpha >= 0).all()
    # step 1: the relaxed (bound-free) equality-constrained minimum, step 2: its projection onto the bounds
    free = 1 - bounds.sum()
    relaxed = np.linalg.lstsq(np.block([[2 * M, np.ones((T, 1))], [np.ones((1, T)), np.zeros((1, 1))]]),
                              np.concatenate([-2 * M @ bounds, [free]]), rcond=None)[0][:T]  # fmt: skip
    assert np.allclose(alpha, project_to_simplex(relaxed, free) + bounds)
    if (relaxed >= 0).all():  # the bounds are inactive: the exact constrained min-norm point
        assert float(alpha @ M @ alpha) == pytest.approx(exact_min_norm(M, bounds), rel=1e-9)
    else:  # feasible, never below the constrained minimum
        assert float(alpha @ M @ alpha) >= exact_min_norm(M, bounds) - 1e-12
    if T <= 3:  # brute force over the feasible grid: nothing feasible is nearer the origin than the true minimum
        grid = simplex_grid(T, 400, bounds)
        assert exact_min_norm(M, bounds) <= np.einsum("ki,ij,kj->k", grid, M, grid).min() + 1e-12


def test_pe_ltr_weights_equal_the_min_norm_point_when_the_bounds_are_inactive():
    G = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, 0.3]])  # optimum inside the simplex (0.5, 0.5, 0) is not: check both
    M = G @ G.T
    bounds = np.full(3, 0.01)
    alpha = pe_ltr_weights(M, bounds)
    assert float(alpha @ M @ alpha) == pytest.approx(exact_min_norm(M, bounds), rel=1e-9)
    # orthogonal gradients of equal norm: the min-norm point is uniform, with or without small bounds
    assert np.allclose(pe_ltr_weights(np.eye(3), bounds), 1 / 3)


def test_pe_ltr_bounds_and_errors():
    assert np.allclose(pe_ltr_bounds([1, 1, 2], 0.5), [0.125, 0.125, 0.25])
    assert np.allclose(pe_ltr_weights(np.eye(2), [0.7, 0.3]), [0.7, 0.3])  # bounds that sum to 1 leave no choice
    with pytest.raises(ValueError, match="sum to 1.2"):
        pe_ltr_weights(np.eye(2), [0.6, 0.6])
    with pytest.raises(ValueError, match="non-negative lower bounds"):
        pe_ltr_weights(np.eye(2), [-0.1, 0.2])
    with pytest.raises(ValueError, match="mass must lie"):
        pe_ltr_bounds([1, 1], 1.0)


# ------------------------------------------------------------------------------------------------ balancers
SCHEMA = RankingSchema(num_items=20, num_users=10, tasks=("click", "like", "share"), actions=("view",))


def tiny_batch(seed: int = 0, share_labels: bool = True, size: int = 6) -> RankingBatch:
    g = torch.Generator().manual_seed(seed)
    B, C, L = size, 3, 4
    labels = (torch.rand(B, C, 3, generator=g) < 0.4).float()
    weights = torch.ones(B, C, 3)
    if not share_labels:
        weights[..., 2] = 0.0  # no 'share' label anywhere in the batch
    return RankingBatch(
        user_ids=torch.randint(1, 11, (B,), generator=g), hist_items=torch.randint(1, 21, (B, L), generator=g),
        hist_actions=torch.zeros(B, L, dtype=torch.long), hist_times=torch.zeros(B, L, dtype=torch.long),
        hist_lengths=torch.full((B,), L), cand_items=torch.randint(1, 21, (B, C), generator=g),
        cand_times=torch.zeros(B, C, dtype=torch.long), cand_mask=torch.ones(B, C, dtype=torch.bool),
        user_features=torch.zeros(B, 0, dtype=torch.long), dense_features=torch.zeros(B, C, 0),
        labels=labels, label_weights=weights,
    )  # fmt: skip


def tiny_ranker(seed: int = 0) -> DLRMRanker:
    torch.manual_seed(seed)
    return DLRMRanker(SCHEMA, DLRMRankerConfig(embedding_dim=4, bottom_mlp=(8,), top_mlp=(8,)))


def per_task_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    total, terms = model.loss(batch)
    return total, torch.stack([terms[t] for t in SCHEMA.tasks])


def test_split_parameters_takes_the_output_layer_as_task_specific():
    model = tiny_ranker()
    shared, specific = split_parameters(model, 3)
    assert {id(p) for p in specific} == {id(model.dlrm.heads.weight), id(model.dlrm.heads.bias)}
    assert len(shared) + len(specific) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no nn.Linear output layer with 3 outputs"):
        split_parameters(nn.Sequential(nn.Linear(4, 2)), 3)
    with pytest.raises(ValueError, match="no shared part"):
        split_parameters(nn.Linear(4, 3), 3)


@pytest.mark.parametrize("cls", [MGDABalancer, PELTRBalancer])
def test_gradient_balancers_set_the_gradient_of_the_weighted_loss(cls):
    model, batch = tiny_ranker(), tiny_batch()
    balancer = cls(SCHEMA.tasks, (1.0, 1.0, 2.0), model)
    total, per_task = per_task_losses(model, batch)
    step = balancer.backward(total, per_task)
    alpha = step.weights
    assert alpha.sum() == pytest.approx(1.0) and (alpha >= 0).all()
    if cls is PELTRBalancer:
        assert (alpha.numpy() >= pe_ltr_bounds([1.0, 1.0, 2.0]) - 1e-12).all()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the same as back-propagating Σ α_t loss_t
    model.zero_grad(set_to_none=True)
    _, per_task = per_task_losses(model, batch)
    (alpha.float() * per_task).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-5), n
    # and, on the shared parameters, a direction no task's gradient opposes (MGDA's min-norm point)
    if cls is MGDABalancer:
        shared, _ = split_parameters(model, 3)
        d = torch.cat([got[n].reshape(-1) for n, p in model.named_parameters() if any(p is q for q in shared)])
        for t in range(3):
            model.zero_grad(set_to_none=True)
            _, per_task = per_task_losses(model, batch)
            per_task[t].backward()
            g = torch.cat([p.grad.reshape(-1) for p in shared])
            assert float(g @ d) >= float(d @ d) * (1 - 1e-4) - 1e-9


def test_a_task_without_labels_in_the_batch_is_left_out():
    model, batch = tiny_ranker(), tiny_batch(share_labels=False)
    total, per_task = per_task_losses(model, batch)
    assert float(per_task[2].detach()) == 0.0
    for balancer in (MGDABalancer(SCHEMA.tasks, (1.0,) * 3, model), PELTRBalancer(SCHEMA.tasks, (1.0,) * 3, model)):
        model.zero_grad(set_to_none=True)
        total, per_task = per_task_losses(model, batch)
        step = balancer.backward(total, per_task)
        assert step.weights[2] == 0 and step.weights.sum() == pytest.approx(1.0)
    unc = UncertaintyBalancer(SCHEMA.tasks, (1.0,) * 3)
    total, per_task = per_task_losses(model, batch)
    step = unc.backward(total, per_task)
    assert step.weights[2] == 0 and unc.log_variances.grad[2] == 0  # s_share is not pulled down by a missing task
    # a task weighted 0 is no objective either
    total, per_task = per_task_losses(model, tiny_batch())
    step = MGDABalancer(SCHEMA.tasks, (1.0, 0.0, 1.0), model).backward(total, per_task)
    assert step.weights[1] == 0


def test_fixed_balancer_back_propagates_the_rankers_total():
    model, batch = tiny_ranker(), tiny_batch()
    total, per_task = per_task_losses(model, batch)
    step = FixedBalancer(SCHEMA.tasks, (1.0, 0.5, 2.0)).backward(total, per_task)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss(batch)[0].backward()
    assert all(torch.equal(got[n], p.grad) for n, p in model.named_parameters())
    assert step.weights.tolist() == [1.0, 0.5, 2.0] and step.objective == float(total.detach())


def test_uncertainty_log_variances_move_to_log_loss():
    """With the task losses held fixed, exp(−s)·L + s is minimised at s = log L: gradient steps on s get there."""
    losses = torch.tensor([0.05, 0.6, 2.5])
    balancer = UncertaintyBalancer(SCHEMA.tasks, (1.0, 1.0, 1.0))
    optimizer = torch.optim.SGD(balancer.extra_parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        balancer.backward(losses.sum(), losses)
        optimizer.step()
    s = balancer.log_variances.detach()
    assert torch.allclose(s, losses.log(), atol=1e-4), (s, losses.log())
    # the effective weights are then 1 / loss_t
    _, weights = balancer.objective(losses)
    assert torch.allclose(weights, 1 / losses, rtol=1e-3)


def test_uncertainty_log_variances_follow_a_learning_model():
    """Trained with a model on labels drawn at fixed task rates (0.5, 0.15, 0.03, independent of the inputs), each
    loss_t falls to the entropy of its rate, and s_t follows it to log(loss_t) from its start at 0."""
    rates = torch.tensor([0.5, 0.15, 0.03])
    model = tiny_ranker()
    balancer = UncertaintyBalancer(SCHEMA.tasks, (1.0, 1.0, 1.0))
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=0.01)
    optimizer.add_param_group({"params": balancer.extra_parameters(), "weight_decay": 0.0})
    g = torch.Generator().manual_seed(1)
    recent = []
    for step in range(400):
        batch = tiny_batch(step, size=32)
        batch.labels = (torch.rand(batch.labels.shape, generator=g) < rates).float()
        optimizer.zero_grad(set_to_none=True)
        total, per_task = per_task_losses(model, batch)
        balancer.backward(total, per_task)
        optimizer.step()
        if step >= 250:
            recent.append(per_task.detach())
    loss = torch.stack(recent).mean(0)  # [T] the losses of the last 150 steps
    entropy = -(rates * rates.log() + (1 - rates) * (1 - rates).log())
    assert torch.allclose(loss, entropy, rtol=0.15)  # the model learned the rates
    s = balancer.log_variances.detach()
    assert (s - loss.log()).abs().max() < 0.25, (s, loss.log())
    assert (s < -0.2).all() and s[2] < s[1] < s[0]  # moved from 0, in the order of the losses


def test_build_balancer_and_state():
    model = tiny_ranker()
    assert isinstance(build_balancer("mgda", SCHEMA.tasks, (1, 1, 1), model), MGDABalancer)
    assert build_balancer("fixed", SCHEMA.tasks, (1, 1, 1), model).state_dict() == {}
    unc = build_balancer("uncertainty", SCHEMA.tasks, (1, 1, 1), model)
    assert set(unc.state_dict()) == {"log_variances"}
    with pytest.raises(ValueError, match="expected one of"):
        build_balancer("gradnorm", SCHEMA.tasks, (1, 1, 1), model)
    with pytest.raises(ValueError, match="2 weights for the 3 tasks"):
        build_balancer("fixed", SCHEMA.tasks, (1, 1), model)
    with pytest.raises(ValueError, match="per-task losses"):
        unc.backward(torch.tensor(1.0), None)
