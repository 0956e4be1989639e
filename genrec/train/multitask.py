"""Multi-objective training of a multi-task ranker: how the per-task losses are combined into one update.

A ranker has a shared backbone and one output per task (``forward -> [B, C, T]``); ``loss(batch)`` returns
``(total, {task: loss_t})`` with ``total = Σ_t w_t · loss_t`` (``w`` = ``train.task_weights``). A *task balancer*
turns the T per-task losses of one training batch into the gradients of one optimizer step. ``train.task_balancing``
selects one of four:

``fixed``
    Σ_t w_t · loss_t, the ranker's own total (what training did before balancing existed; the gradients are those
    of ``total.backward()``, bit for bit).

``uncertainty`` (A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018)
    Each task t gets a learned log-variance s_t = log σ_t². For a classification output the paper (eq. 10 and the
    approximation after it) scales the logits by 1/σ² and obtains the per-task objective

        (1 / σ_t²) · loss_t + log σ_t  =  exp(−s_t) · loss_t + s_t / 2.

    We minimise

        L = Σ_t w_t · (exp(−s_t) · loss_t + s_t)                                                        (U)

    i.e. the paper's regression form (eq. 7, times 2), as most implementations do for every task type. Deviation,
    deliberate: with s_t / 2 the optimum is s_t* = log(2 · loss_t), with s_t it is s_t* = log(loss_t); at their
    optima both give task weights exp(−s_t*) proportional to 1 / loss_t, so the balance between tasks is the same
    (the overall scale differs by 2, which Adam does not see). s_t starts at 0 (σ_t = 1), is trained by the same
    optimizer as the model (in its own parameter group, without weight decay, which would pull s_t toward 0), and
    is saved in the checkpoint (:meth:`TaskBalancer.state_dict`). The prior weights w_t stay as factors (all 1 by
    default); a task with w_t = 0 is left out.

``mgda`` (O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018)
    The update direction on the shared parameters θ_sh is the minimum-norm point of the convex hull of the per-task
    gradients g_t = ∇_θsh loss_t:

        α* = argmin_{α ≥ 0, Σ α = 1} ‖Σ_t α_t g_t‖²                                                     (M)

    solved on the Gram matrix M_ij = g_i · g_j (:func:`min_norm_weights`: the closed form of the paper's
    Algorithm 1 for two tasks, Frank–Wolfe otherwise). Either Σ α_t g_t = 0 (a Pareto-stationary point), or it is a
    descent direction for every task: g_t · Σ α g ≥ ‖Σ α g‖² > 0 (the optimality condition of (M)). The step sets
    every parameter's gradient to Σ_t α_t ∇ loss_t (α* fixed), i.e. the gradient of Σ_t α*_t loss_t.

``pe-ltr`` (X. Lin, H. Chen, C. Pei, F. Sun, X. Xiao, H. Sun, Y. Zhang, W. Ou, P. Jiang, "A Pareto-Efficient
Algorithm for Multiple Objective Optimization in E-Commerce Recommendation", RecSys 2019)
    (M) with lower bounds α_t ≥ c_t (Σ c < 1) that keep every task in the objective; solved as the paper does
    (:func:`pe_ltr_weights`): drop α ≥ c, solve the equality-constrained KKT system by least squares, then project
    the result onto the feasible set. Bounds: c_t = ``PE_LTR_BOUND_MASS`` · w_t / Σ_u w_u, so half of the weight
    mass is placed by ``train.task_weights`` and half by the Pareto step (w normalised to sum to 1 would leave no
    freedom: the only feasible point would be c itself).

Shared parameters (mgda, pe-ltr). The Gram matrix is taken over the shared parameters: every trainable parameter
except those of the output layer, the last ``nn.Linear`` submodule with T outputs (DLRM ``dlrm.heads``, DIN
``heads``, HSTU ranker ``head[-1]``), which holds one row per task (:func:`split_parameters`). This is the paper's
exact MGDA, not MGDA-UB: it takes one backward pass per task (T passes instead of one). A ranker that returned its
shared representation Z (the input of the output layer) next to the logits would allow MGDA-UB (the paper's §3.3:
gradients with respect to Z, an upper bound), which costs one backward pass through the output layer per task plus
one full pass.

Tasks in a batch. A task with w_t = 0 is not an objective (left out of every method but ``fixed``, where its term
is 0 anyway). A task whose loss in the batch is exactly 0 has no labelled candidate in the batch (the rankers'
``loss_t`` is 0 only then, BCE being positive) and is left out of that step's balance: its zero gradient would
otherwise be the min-norm point and stop the shared parameters (MGDA), or pull s_t down (uncertainty). The bounds of
PE-LTR are then renormalised over the tasks present.

Every balancer's :meth:`TaskBalancer.backward` returns the weights it put on each loss_t in that step (w_t · exp(−s_t)
for uncertainty, α_t for mgda and pe-ltr, w_t for fixed); the training loop logs their mean per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "BALANCERS",
    "PE_LTR_BOUND_MASS",
    "BalanceStep",
    "FixedBalancer",
    "MGDABalancer",
    "PELTRBalancer",
    "TaskBalancer",
    "UncertaintyBalancer",
    "build_balancer",
    "min_norm_2",
    "min_norm_weights",
    "pe_ltr_bounds",
    "pe_ltr_weights",
    "project_to_simplex",
    "split_parameters",
]

PE_LTR_BOUND_MASS = 0.5  # Σ_t c_t: the part of the weight mass that train.task_weights fix in PE-LTR


# ------------------------------------------------------------------------------------------------ Pareto solvers
def _check_gram(gram: np.ndarray) -> np.ndarray:
    M = np.asarray(gram, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"gram: expected a square [T, T] matrix with T >= 1, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError("gram: entries must be finite (a task gradient is NaN or infinite)")
    return (M + M.T) / 2.0


def min_norm_2(m11: float, m12: float, m22: float) -> tuple[float, float]:
    """The min-norm point of the segment between two vectors g1, g2, from their inner products (Sener & Koltun 2018,
    Algorithm 1): argmin_{γ ∈ [0, 1]} ‖γ g1 + (1 − γ) g2‖² = clip((g2·g2 − g1·g2) / ‖g1 − g2‖², 0, 1).

    Returns (γ, 1 − γ), the weights of g1 and g2.
    """
    if m12 >= m11:  # g1 itself is the closest point to the origin (covers g1 = g2)
        return 1.0, 0.0
    if m12 >= m22:
        return 0.0, 1.0
    gamma = (m22 - m12) / (m11 - 2.0 * m12 + m22)  # denominator = ‖g1 − g2‖² > 0 here
    return gamma, 1.0 - gamma


def min_norm_weights(gram: np.ndarray, *, max_iter: int = 10_000, tol: float = 1e-12) -> np.ndarray:
    """α* = argmin_{α ≥ 0, Σ α = 1} αᵀ M α for a Gram matrix M = G Gᵀ [T, T] (rows of G: task gradients).

    T = 1: α = (1,). T = 2: the closed form (:func:`min_norm_2`). T > 2: Frank–Wolfe on the simplex (Sener & Koltun
    2018, Algorithm 2, the "Frank-Wolfe solver"; exact line search along each step by Algorithm 1), started at the
    best pair of tasks, with away steps (S. Lacoste-Julien, M. Jaggi, "On the Global Linear Convergence of
    Frank-Wolfe Optimization Variants", NeurIPS 2015). Deviation, deliberate: the paper's plain Frank–Wolfe
    converges sublinearly when the optimum lies inside a face of the simplex; the away steps (moving weight off the
    worst task in use) make it converge linearly, so the returned point is the min-norm point to within ``tol``.

    Stops when the Frank–Wolfe duality gap 2 · (αᵀMα − min_t (Mα)_t), an upper bound on αᵀMα − min, is at most
    ``tol`` · max_t M_tt, or after ``max_iter`` steps. Returns α [T] float64, α ≥ 0, Σ α = 1.
    """
    M = _check_gram(gram)
    T = M.shape[0]
    if T == 1:
        return np.ones(1)
    if T == 2:
        return np.array(min_norm_2(M[0, 0], M[0, 1], M[1, 1]))
    scale = max(float(np.max(np.diag(M))), 0.0)
    if scale == 0.0:  # every gradient is zero: every α is optimal
        return np.full(T, 1.0 / T)
    # start: the best of the T(T-1)/2 pairs (each by the closed form), as the reference solver does
    best, alpha = math.inf, np.zeros(T)
    for i in range(T):
        for j in range(i + 1, T):
            a, b = min_norm_2(M[i, i], M[i, j], M[j, j])
            value = a * a * M[i, i] + 2 * a * b * M[i, j] + b * b * M[j, j]
            if value < best:
                best, alpha = value, np.zeros(T)
                alpha[i], alpha[j] = a, b
    for _ in range(max_iter):
        Ma = M @ alpha  # [T] (Mα)_t = g_t · θ with θ = Σ α g
        norm2 = float(alpha @ Ma)  # ‖θ‖²
        s = int(np.argmin(Ma))  # Frank–Wolfe vertex: the task gradient most opposed to θ
        gap_fw = norm2 - Ma[s]
        if 2.0 * gap_fw <= tol * scale:
            break
        used = np.flatnonzero(alpha > 0)
        v = int(used[np.argmax(Ma[used])])  # away vertex: the task in use most aligned with θ
        gap_away = Ma[v] - norm2
        if gap_fw >= gap_away:  # toward e_s: d = e_s − α, step in [0, 1]
            d = -alpha.copy()
            d[s] += 1.0
            step_max = 1.0
        else:  # away from e_v: d = α − e_v, step in [0, α_v / (1 − α_v)]
            d = alpha.copy()
            d[v] -= 1.0
            step_max = alpha[v] / (1.0 - alpha[v])
        slope, curvature = float(Ma @ d), float(d @ M @ d)  # f(α + γd) = f + 2γ·slope + γ²·curvature
        step = step_max if curvature <= 0 else min(max(-slope / curvature, 0.0), step_max)
        alpha = np.clip(alpha + step * d, 0.0, None)
        alpha /= alpha.sum()
    return alpha


def project_to_simplex(x: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Euclidean projection of x [T] onto {y ≥ 0, Σ y = total} (total > 0): y = max(x − τ, 0) with τ chosen so the
    sum is ``total`` (M. Held, P. Wolfe, H. Crowder 1974; the sort-based form of J. Duchi et al., ICML 2008)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"project_to_simplex: expected a finite non-empty vector, got {x!r}")
    if not total > 0:
        raise ValueError(f"project_to_simplex: total must be > 0, got {total}")
    u = np.sort(x)[::-1]
    cumulative = np.cumsum(u) - total
    k = np.arange(1, x.size + 1)
    rho = int(np.flatnonzero(u - cumulative / k > 0)[-1])  # the largest k with u_k > (Σ_{j≤k} u_j − total) / k
    tau = cumulative[rho] / (rho + 1)
    return np.maximum(x - tau, 0.0)


def pe_ltr_weights(gram: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """PE-LTR's Pareto step (Lin et al. 2019, §4, "PECsolver"): weights α with α_t ≥ c_t, Σ α = 1 that make
    ‖Σ α_t g_t‖² small, for the Gram matrix M = G Gᵀ [T, T] and the lower bounds c [T] (c ≥ 0, Σ c ≤ 1).

    1. Write α = α̂ + c and drop α̂ ≥ 0; the relaxed problem min ‖G(α̂ + c)‖² s.t. Σ α̂ = 1 − Σ c has the KKT system

           [ M   1 ] [ α̂ ]   [ −M c    ]
           [ 1ᵀ  0 ] [ λ  ] = [ 1 − Σ c ]

       solved by least squares (the paper's (AᵀA)⁻¹ Aᵀ z; ``numpy.linalg.lstsq`` gives that, and the least-norm
       solution when A is singular, e.g. with linearly dependent gradients).
    2. Project α̂ onto {α̂ ≥ 0, Σ α̂ = 1 − Σ c} (the paper's non-negative least-squares step; done exactly by
       :func:`project_to_simplex`) and return α = α̂ + c.

    When step 1's α̂ is already non-negative it is the exact constrained min-norm point. Otherwise the result is the
    projection of the relaxed solution, which is feasible but in general not the constrained minimum: that is the
    paper's algorithm, kept as it is. Σ c = 1 leaves only α = c. Returns α [T] float64.
    """
    M = _check_gram(gram)
    T = M.shape[0]
    c = np.asarray(bounds, dtype=np.float64)
    if c.shape != (T,) or not np.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"bounds: expected {T} finite non-negative lower bounds, got {list(c)}")
    free = 1.0 - float(c.sum())
    if free < -1e-12:
        raise ValueError(f"bounds: the lower bounds sum to {c.sum():.6g} > 1, so no weights can satisfy them")
    if free <= 1e-12:
        return c / c.sum()
    A = np.zeros((T + 1, T + 1))
    A[:T, :T], A[:T, T], A[T, :T] = M, 1.0, 1.0
    z = np.concatenate([-M @ c, [free]])
    relaxed = np.linalg.lstsq(A, z, rcond=None)[0][:T]  # α̂ of the relaxed problem
    return project_to_simplex(relaxed, free) + c


def pe_ltr_bounds(task_weights: Sequence[float], mass: float = PE_LTR_BOUND_MASS) -> np.ndarray:
    """The lower bounds c_t = mass · w_t / Σ_u w_u (0 ≤ mass < 1) from non-negative weights w (not all 0)."""
    w = np.asarray(task_weights, dtype=np.float64)
    if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"task weights must be finite, non-negative and not all zero, got {list(w)}")
    if not 0.0 <= mass < 1.0:
        raise ValueError(f"mass must lie in [0, 1), got {mass}")
    return mass * w / w.sum()


# ------------------------------------------------------------------------------------------------ parameters
def split_parameters(model: nn.Module, num_tasks: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, task-specific) trainable parameters of a multi-task ranker.

    Task-specific: the parameters of the output layer, the last ``nn.Linear`` submodule (in registration order)
    with ``out_features == num_tasks``; shared: every other trainable parameter. ValueError when the model has no
    such layer or nothing else to share (e.g. a model that is one separate linear model per task).
    """
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_tasks:
            head = module
    if head is None:
        raise ValueError(f"{type(model).__name__}: no nn.Linear output layer with {num_tasks} outputs (one per task) "
                         "was found, so its shared parameters are unknown; train it with train.task_balancing=fixed "
                         "or uncertainty")  # fmt: skip
    own = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    shared = [p for p in trainable if id(p) not in own]
    specific = [p for p in trainable if id(p) in own]
    if not shared:
        raise ValueError(f"{type(model).__name__}: every trainable parameter belongs to the output layer; there is "
                         "no shared part to balance the task gradients on")  # fmt: skip
    return shared, specific


# ------------------------------------------------------------------------------------------------ balancers
@dataclass
class BalanceStep:
    objective: float  # the value whose gradient was set (fixed: the ranker's total)
    weights: torch.Tensor  # [T] float64 on the CPU, the weight put on each loss_t in this step


class TaskBalancer(nn.Module):
    """Combine the per-task losses of one batch into gradients (see the module docstring).

    ``backward(total, per_task)`` sets ``.grad`` of the parameters (accumulating, as ``Tensor.backward`` does; the
    caller zeroes them first) and returns a :class:`BalanceStep`. ``total`` is the ranker's Σ_t w_t · loss_t and
    ``per_task`` [T] its loss_t in schema order. ``extra_parameters()`` are the balancer's own trainable parameters
    (the optimizer must hold them); its ``state_dict`` is the state a resumed run needs.
    """

    method = ""

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float]) -> None:
        super().__init__()
        weights = tuple(float(w) for w in task_weights)
        if len(weights) != len(tasks) or not tasks:
            raise ValueError(f"task_weights: {len(weights)} weights for the {len(tasks)} tasks {list(tasks)}")
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"task_weights must be finite, non-negative and not all zero, got {weights}")
        self.tasks = tuple(tasks)
        self.task_weights = torch.tensor(weights, dtype=torch.float64)  # [T] on the CPU (not state: from the config)

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def backward(self, total: torch.Tensor, per_task: torch.Tensor) -> BalanceStep:
        raise NotImplementedError

    def _active(self, per_task: torch.Tensor | None) -> torch.Tensor:
        """[T] bool: the objectives (w_t > 0) with a labelled candidate in the batch (loss_t > 0)."""
        if per_task is None:
            raise ValueError(f"task balancing {self.method!r} needs the per-task losses; the ranker's loss gave none")
        if per_task.shape != (len(self.tasks),):
            raise ValueError(f"per-task losses: expected shape ({len(self.tasks)},), got {tuple(per_task.shape)}")
        return (self.task_weights > 0) & (per_task.detach().cpu().double() > 0)


class FixedBalancer(TaskBalancer):
    """Σ_t w_t · loss_t: the ranker's own total, back-propagated as it is."""

    method = "fixed"

    def backward(self, total: torch.Tensor, per_task: torch.Tensor | None = None) -> BalanceStep:
        total.backward()
        return BalanceStep(float(total.detach()), self.task_weights.clone())


class UncertaintyBalancer(TaskBalancer):
    """Σ_t w_t · (exp(−s_t) · loss_t + s_t) over the tasks in the batch, s_t = log σ_t² learned (Kendall et al.
    2018; the exact form and why are in the module docstring)."""

    method = "uncertainty"

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float]) -> None:
        super().__init__(tasks, task_weights)
        self.log_variances = nn.Parameter(torch.zeros(len(self.tasks)))  # s [T], σ_t = 1 at the start

    def objective(self, per_task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L of (U), the effective weights w_t · exp(−s_t) [T], 0 for tasks left out of the batch)."""
        active = self._active(per_task).to(device=per_task.device)
        s = self.log_variances.to(per_task.dtype)
        w = torch.where(active, self.task_weights.to(device=per_task.device, dtype=per_task.dtype),
                        torch.zeros((), dtype=per_task.dtype, device=per_task.device))  # fmt: skip
        terms = w * (torch.exp(-s) * per_task + s)  # [T]
        return terms.sum(), (w * torch.exp(-s)).detach()

    def backward(self, total: torch.Tensor, per_task: torch.Tensor) -> BalanceStep:
        loss, weights = self.objective(per_task)
        loss.backward()
        return BalanceStep(float(loss.detach()), weights.cpu().double())


class _GradientBalancer(TaskBalancer):
    """A balancer that solves for α on the Gram matrix of the per-task gradients of the shared parameters and sets
    every parameter's gradient to Σ_t α_t ∇ loss_t."""

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float], model: nn.Module) -> None:
        super().__init__(tasks, task_weights)
        shared, specific = split_parameters(model, len(self.tasks))
        self._shared = shared  # plain lists: the model's parameters are not the balancer's state
        self._params = shared + specific

    def solve(self, gram: np.ndarray, active: np.ndarray) -> np.ndarray:
        """α [A] for the Gram matrix [A, A] of the active tasks (``active`` [T] bool)."""
        raise NotImplementedError

    def backward(self, total: torch.Tensor, per_task: torch.Tensor) -> BalanceStep:
        active = self._active(per_task).numpy()
        index = np.flatnonzero(active)
        T = len(self.tasks)
        if index.size == 0:  # no objective has a label in this batch: nothing to follow
            total.backward()  # zero gradients (keeps every parameter's .grad defined, as fixed does)
            return BalanceStep(float(total.detach()), torch.zeros(T, dtype=torch.float64))
        grads: list[list[torch.Tensor | None]] = []  # [A][P]
        for k, t in enumerate(index):
            loss_t = per_task[t]
            if not loss_t.requires_grad:
                grads.append([None] * len(self._params))
                continue
            retain = k < index.size - 1
            grads.append(list(torch.autograd.grad(loss_t, self._params, retain_graph=retain, allow_unused=True)))
        n_shared = len(self._shared)
        flat = torch.stack([
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                       for g, p in zip(row[:n_shared], self._shared)])
            for row in grads
        ])  # [A, P_shared]  # fmt: skip
        gram = (flat @ flat.T).cpu().numpy()  # [A, A]
        alpha = self.solve(gram, active)  # [A]
        for j, p in enumerate(self._params):
            parts = [(float(a), row[j]) for a, row in zip(alpha, grads) if row[j] is not None]
            if not parts:
                continue
            g = sum(a * gj for a, gj in parts)
            p.grad = g if p.grad is None else p.grad + g
        weights = torch.zeros(T, dtype=torch.float64)
        weights[torch.from_numpy(index)] = torch.from_numpy(alpha)
        objective = float((weights.to(per_task.device, per_task.dtype) * per_task.detach()).sum())
        return BalanceStep(objective, weights)


class MGDABalancer(_GradientBalancer):
    """α = the min-norm point of the convex hull of the task gradients (Sener & Koltun 2018; :func:`min_norm_weights`)."""

    method = "mgda"

    def solve(self, gram: np.ndarray, active: np.ndarray) -> np.ndarray:
        return min_norm_weights(gram)


class PELTRBalancer(_GradientBalancer):
    """α from PE-LTR's Pareto step with lower bounds c_t = PE_LTR_BOUND_MASS · w_t / Σ w over the tasks of the batch
    (Lin et al. 2019; :func:`pe_ltr_weights`)."""

    method = "pe-ltr"

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float], model: nn.Module,
                 bound_mass: float = PE_LTR_BOUND_MASS) -> None:  # fmt: skip
        super().__init__(tasks, task_weights, model)
        pe_ltr_bounds(task_weights, bound_mass)  # checks the mass
        self.bound_mass = float(bound_mass)

    def solve(self, gram: np.ndarray, active: np.ndarray) -> np.ndarray:
        bounds = pe_ltr_bounds(self.task_weights.numpy()[active], self.bound_mass)
        return pe_ltr_weights(gram, bounds)


BALANCERS: dict[str, type[TaskBalancer]] = {
    "fixed": FixedBalancer,
    "uncertainty": UncertaintyBalancer,
    "mgda": MGDABalancer,
    "pe-ltr": PELTRBalancer,
}


def build_balancer(method: str, tasks: Sequence[str], task_weights: Sequence[float], model: nn.Module
                   ) -> TaskBalancer:  # fmt: skip
    """The balancer named by ``train.task_balancing`` for ``model`` (mgda and pe-ltr read its shared parameters)."""
    if method not in BALANCERS:
        raise ValueError(f"task balancing {method!r}: expected one of {list(BALANCERS)}")
    cls = BALANCERS[method]
    if issubclass(cls, _GradientBalancer):
        return cls(tasks, task_weights, model)
    return cls(tasks, task_weights)
