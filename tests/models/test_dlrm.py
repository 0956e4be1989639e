"""DLRM: the dot interaction against a hand-written reference, the plain-tensor (Criteo-shaped) path, the ranking
adapter's contract and learning, and equality with TorchRec's DLRM when TorchRec is installed."""

from __future__ import annotations

import math

import pytest
import torch

from genrec.data.ranking_batch import RankingSchema
from genrec.models.dlrm import (
    DLRM,
    DLRMConfig,
    DLRMRanker,
    DLRMRankerConfig,
    dot_interaction,
)
from tests.conftest import real_data_or_skip
from tests.models.test_ranking_floors import (
    SCHEMA,
    auc,
    check_contract,
    replace,
    synthetic_batch,
    task_auc,
    train,
)

SMALL = DLRMRankerConfig(embedding_dim=8, bottom_mlp=(16,), top_mlp=(32, 16))


# ---------------------------------------------------------------- interaction
def test_dot_interaction_matches_hand_written_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, generator=g).double()  # N=3 examples, K=4 vectors of d=5
    vals = z.tolist()
    expected = []
    for n in range(3):
        row = []
        for i in range(4):
            for j in range(i):  # strict lower triangle, row-major: (1,0), (2,0), (2,1), (3,0), (3,1), (3,2)
                row.append(sum(a * b for a, b in zip(vals[n][i], vals[n][j])))
        expected.append(row)
    torch.testing.assert_close(dot_interaction(z), torch.tensor(expected, dtype=torch.float64))


def test_dlrm_forward_is_bottom_interaction_top_by_hand() -> None:
    torch.manual_seed(0)
    model = DLRM(DLRMConfig(dense_in=3, sparse_sizes=(7, 5), embedding_dim=4, bottom_mlp=(6,), top_mlp=(8,),
                            num_tasks=2))  # fmt: skip
    dense = torch.randn(5, 3)
    ids = torch.tensor([1, 0, 6, 3, 2])
    bag = torch.tensor([[1, 2, 0], [4, 4, 4], [0, 0, 0], [3, 1, 2], [2, 0, 0]])
    w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    got = model(dense, [ids, bag], [None, w])
    x0 = model.bottom(dense)
    e1 = model.tables[0].weight[ids]
    e2 = (model.tables[1].weight[bag] * w.unsqueeze(-1)).sum(1)  # weighted sum over the bag
    vecs = [x0, e1, e2]
    pairs = [(vecs[i] * vecs[j]).sum(-1) for i in range(3) for j in range(i)]
    want = model.heads(model.top(torch.cat([x0, torch.stack(pairs, 1)], 1)))
    torch.testing.assert_close(got, want)
    assert got.shape == (5, 2)


def test_dlrm_refuses_malformed_inputs() -> None:
    model = DLRM(DLRMConfig(dense_in=2, sparse_sizes=(4, 4)))
    dense = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"rows 0..3"):
        model(dense, torch.tensor([[1, 4], [0, 0], [1, 1]]))
    with pytest.raises(ValueError, match=r"rows 0..3"):
        model(dense, torch.tensor([[1, -1], [0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="2 tables"):
        model(dense, [torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"dense must be \[N, 2\]"):
        model(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        model(dense, [torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="shape"):
        model(dense, [torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="sparse_sizes"):
        DLRMConfig(dense_in=1, sparse_sizes=())


# ---------------------------------------------------------------- Criteo-shaped path
def _criteo_like(N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense [N, 13], sparse [N, 26] ids in 0..9, labels [N]: click iff feature 3's id is even or dense 0 > 1."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(N, 13, generator=g)
    sparse = torch.randint(0, 10, (N, 26), generator=g)
    labels = ((sparse[:, 3] % 2 == 0) | (dense[:, 0] > 1.0)).float()
    return dense, sparse, labels


def test_criteo_shaped_path_learns() -> None:
    torch.manual_seed(0)
    model = DLRM(DLRMConfig(dense_in=13, sparse_sizes=(10,) * 26, embedding_dim=8, bottom_mlp=(16,), top_mlp=(16,)))
    dense, sparse, labels = _criteo_like(512, seed=0)
    assert model(dense, sparse).shape == (512, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse)[:, 0], labels)
        loss.backward()
        opt.step()
    test_dense, test_sparse, test_labels = _criteo_like(512, seed=1)
    with torch.no_grad():
        assert auc(model(test_dense, test_sparse)[:, 0], test_labels) > 0.8
        # the tensor form and the list-of-columns form are the same input
        torch.testing.assert_close(model(test_dense, test_sparse), model(test_dense, list(test_sparse.unbind(1))))


def _read_criteo(path, rows: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kaggle DAC raw rows -> log(1 + max(x, 0)) dense [N, 13] (missing = 0), hashed categoricals [N, 26]
    (missing = bucket 0), labels [N]."""
    labels, dense, sparse = [], [], []
    with open(path, encoding="utf-8") as f:
        for line, text in zip(range(rows), f):
            cols = text.rstrip("\n").split("\t")
            assert len(cols) == 40, f"{path}:{line + 1}: {len(cols)} columns"
            labels.append(float(cols[0]))
            dense.append([float(max(int(c), 0)) if c else 0.0 for c in cols[1:14]])
            sparse.append([1 + int(c, 16) % (buckets - 1) if c else 0 for c in cols[14:]])
    return torch.log1p(torch.tensor(dense)), torch.tensor(sparse), torch.tensor(labels)


def test_criteo_dac_rows_train_and_beat_chance() -> None:
    folder = real_data_or_skip("criteo-dac-head8k")
    buckets = 1000
    dense, sparse, labels = _read_criteo(folder / "train.tsv", rows=7200, buckets=buckets)
    test_dense, test_sparse, test_labels = _read_criteo(folder / "dev.tsv", rows=400, buckets=buckets)
    torch.manual_seed(0)
    model = DLRM(DLRMConfig(dense_in=13, sparse_sizes=(buckets,) * 26, embedding_dim=8, bottom_mlp=(32,),
                            top_mlp=(32,)))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for start in range(0, len(labels), 500):  # one epoch
        sl = slice(start, start + 500)
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense[sl], sparse[sl])[:, 0], labels[sl])
        loss.backward()
        opt.step()
    with torch.no_grad():
        test_auc = auc(model(test_dense, test_sparse)[:, 0], test_labels)
    assert test_auc > 0.65, test_auc  # about 0.70 with this seed; 400 rows make it noisy


# ---------------------------------------------------------------- ranking adapter
@pytest.mark.parametrize("pooling", ["mean", "action_weighted"])
def test_ranker_contract(pooling: str) -> None:
    torch.manual_seed(0)
    check_contract(DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "history_pooling": pooling})))


def test_ranker_history_is_a_mean_bag_and_empty_history_pools_to_zero() -> None:
    torch.manual_seed(0)
    model = DLRMRanker(SCHEMA, SMALL).eval()
    batch = synthetic_batch(16, seed=4)
    w = model.history_weights(batch)  # [B, L]
    lengths = batch.hist_lengths
    torch.testing.assert_close(w.sum(1), (lengths > 0).float())
    expected = (torch.arange(w.shape[1]) < lengths.unsqueeze(1)) / lengths.clamp_min(1).unsqueeze(1)
    torch.testing.assert_close(w, expected.float())
    # reversing a row's history order changes nothing for a mean bag
    rev = batch.hist_items.clone()
    for b, n in enumerate(lengths.tolist()):
        rev[b, :n] = rev[b, :n].flip(0)
    with torch.no_grad():
        torch.testing.assert_close(model(replace(batch, hist_items=rev)), model(batch))


def test_action_weighted_pooling_uses_actions() -> None:
    torch.manual_seed(0)
    model = DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "history_pooling": "action_weighted"}))
    batch = synthetic_batch(16, seed=5)
    with torch.no_grad():
        model.action_theta.copy_(torch.tensor([0.0, -3.0, 0.0, 3.0]))  # none, view, like, share
        w = model.history_weights(batch)
        torch.testing.assert_close(w.sum(1), (batch.hist_lengths > 0).float())
        base = model(batch)
        other = model(replace(batch, hist_actions=torch.where(batch.hist_actions > 0, 1, 0)))
    assert not torch.allclose(base, other)
    loss = model.loss(batch)[0]
    loss.backward()
    assert model.action_theta.grad is not None and model.action_theta.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["mean", "action_weighted"])
def test_ranker_learns_synthetic_signals(pooling: str) -> None:
    torch.manual_seed(0)
    model = DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "history_pooling": pooling}))
    losses = train(model, synthetic_batch(400, seed=30), steps=50, lr=2e-2)
    assert losses[-1] < 0.6 * losses[0]
    test = synthetic_batch(300, seed=31)
    with torch.no_grad():
        logits = model(test)
    assert task_auc(logits, test, 0) > 0.8  # taste match: user id, history bag and their dot with the candidate
    assert task_auc(logits, test, 1) > 0.75  # candidate popularity


def test_ranker_task_weights_scale_the_loss() -> None:
    torch.manual_seed(0)
    model = DLRMRanker(SCHEMA, SMALL)
    batch = synthetic_batch(16, seed=6)
    torch.manual_seed(0)
    weighted = DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "task_weights": (2.0, 0.0)}))
    weighted.load_state_dict(model.state_dict())
    only_first = DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "task_weights": (1.0, 0.0)}))
    only_first.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert float(weighted.loss(batch)[0]) == pytest.approx(2 * float(only_first.loss(batch)[0]), rel=1e-6)
        assert float(only_first.loss(batch)[0]) < float(model.loss(batch)[0])
    with pytest.raises(ValueError, match="labels is None"):
        model.loss(replace(batch, labels=None))


def test_ranker_without_dense_or_user_features() -> None:
    schema = RankingSchema(num_items=20, num_users=12, tasks=("match", "popular"), actions=("view", "like", "share"))
    batch = synthetic_batch(8, seed=7)
    bare = replace(batch, user_features=torch.zeros(8, 0, dtype=torch.long), dense_features=torch.zeros(8, 4, 0))
    model = DLRMRanker(schema, SMALL)
    assert model(bare).shape == (8, 4, 2)
    model.loss(bare)[0].backward()


# ---------------------------------------------------------------- TorchRec parity
def test_forward_equals_torchrec_dlrm() -> None:
    pytest.importorskip("torchrec")
    from torchrec.models.dlrm import DLRM as TorchRecDLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(0)
    d, sizes, N = 4, (10, 7, 12), 6
    tables = [EmbeddingBagConfig(name=f"t{s}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{s}"],
                                 pooling=PoolingType.MEAN if s == 2 else PoolingType.SUM)
              for s, n in enumerate(sizes)]  # fmt: skip
    ref = TorchRecDLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables),
        dense_in_features=5,
        dense_arch_layer_sizes=[8, d],
        over_arch_layer_sizes=[16, 8, 3],
    )
    ours = DLRM(DLRMConfig(dense_in=5, sparse_sizes=sizes, embedding_dim=d, bottom_mlp=(8,), top_mlp=(16, 8),
                           num_tasks=3))  # fmt: skip
    with torch.no_grad():
        for s in range(3):
            ours.tables[s].weight.copy_(ref.sparse_arch.embedding_bag_collection.embedding_bags[f"t{s}"].weight)
        ref_bottom = [m for m in ref.dense_arch.modules() if isinstance(m, torch.nn.Linear)]
        ref_top = [m for m in ref.over_arch.modules() if isinstance(m, torch.nn.Linear)]
        ours_bottom = [m for m in ours.bottom if isinstance(m, torch.nn.Linear)]
        ours_top = [m for m in ours.top if isinstance(m, torch.nn.Linear)] + [ours.heads]
        assert len(ref_bottom) == len(ours_bottom) == 2 and len(ref_top) == len(ours_top) == 3
        for a, b in zip(ours_bottom + ours_top, ref_bottom + ref_top):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        # TorchRec lists the pairs as the upper triangle (i < j), genrec as the lower (i > j): permute the top's
        # input columns so that both read the same pair
        K = len(sizes) + 1
        upper = {(int(i), int(j)): c for c, (i, j) in enumerate(torch.triu_indices(K, K, offset=1).T.tolist())}
        lower = torch.tril_indices(K, K, offset=-1).T.tolist()
        perm = list(range(d)) + [d + upper[(j, i)] for i, j in lower]
        ours_top[0].weight.copy_(ref_top[0].weight[:, perm])

    dense = torch.randn(N, 5)
    ids0 = torch.randint(0, 10, (N,))
    ids1 = torch.randint(0, 7, (N,))
    lengths2 = torch.tensor([2, 0, 3, 1, 3, 2])
    bag2 = torch.randint(0, 12, (N, 3)) * (torch.arange(3) < lengths2.unsqueeze(1))
    values2 = bag2[torch.arange(3) < lengths2.unsqueeze(1)]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2"],
        values=torch.cat([ids0, ids1, values2]),
        lengths=torch.cat([torch.ones(N, dtype=torch.long), torch.ones(N, dtype=torch.long), lengths2]),
    )
    mean_w = (torch.arange(3) < lengths2.unsqueeze(1)).float() / lengths2.clamp_min(1).unsqueeze(1)
    with torch.no_grad():
        want = ref(dense_features=dense, sparse_features=kjt)
        got = ours(dense, [ids0, ids1, bag2], [None, None, mean_w])
    assert want.shape == got.shape == (N, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ranker_output_biases_start_at_the_base_rates() -> None:
    rates = (0.02, 0.7)
    torch.manual_seed(0)
    model = DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "task_base_rates": rates}))
    logit = torch.tensor([math.log(r / (1 - r)) for r in rates])
    assert torch.allclose(model.dlrm.heads.bias.detach(), logit, atol=1e-6)
    with torch.no_grad():
        model.dlrm.heads.weight.zero_()  # the head's input no longer matters: every candidate gets the base rate
    batch = synthetic_batch(5, seed=1)
    probs = torch.sigmoid(model(batch))[batch.cand_mask]  # [N, T]
    assert torch.allclose(probs, torch.tensor(rates).expand_as(probs), atol=1e-6)
    # without base rates the biases start at nn.Linear's default, not at the rates
    plain = DLRMRanker(SCHEMA, SMALL)
    assert not torch.allclose(plain.dlrm.heads.bias.detach(), logit, atol=1e-2)


@pytest.mark.parametrize("rates", [(0.0, 0.5), (0.5, 1.0), (0.5,), (float("nan"), 0.5)])
def test_ranker_refuses_bad_base_rates(rates) -> None:
    with pytest.raises(ValueError, match="task_base_rates"):
        DLRMRanker(SCHEMA, DLRMRankerConfig(**{**vars(SMALL), "task_base_rates": rates}))
