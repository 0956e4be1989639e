"""HSTU ranker multi-domain options: domain token, per-domain head towers, per-domain output projections."""

import dataclasses

import pytest
import torch

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.hstu_ranker import HSTURanker, HSTURankerConfig

SCHEMA = RankingSchema(num_items=30, num_users=10, tasks=("like", "love"), actions=("click", "like", "share"),
                       user_features=("age", "sex"), user_feature_sizes=(5, 2))
DOMAINS = ("a", "b", "c")
DSCHEMA = dataclasses.replace(SCHEMA, domains=DOMAINS)
OPTIONS = ("domain_token", "domain_towers", "domain_ffn")


def _batch(B=3, L=6, C=5, seed=0, cand_counts=(5, 3, 4), domains=True, shared_time=False) -> RankingBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, L - 2, 1][:B])
    real = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    cand_mask = torch.arange(C).unsqueeze(0) < torch.tensor(cand_counts).unsqueeze(1)  # [B, C]
    times = 1_600_000_000 + torch.cumsum(torch.randint(1, 50_000, (B, L), generator=g), dim=1)
    last = torch.where(real, times, torch.zeros_like(times)).max(dim=1).values
    offsets = torch.full((B, C), 7) if shared_time else torch.randint(1, 50_000, (B, C), generator=g)
    cand_domains = torch.randint(1, len(DOMAINS) + 1, (B, C), generator=g) * cand_mask
    return RankingBatch(
        user_ids=torch.arange(1, B + 1),
        hist_items=torch.randint(1, 31, (B, L), generator=g) * real,
        hist_actions=torch.randint(0, 8, (B, L), generator=g) * real,
        hist_times=times * real,
        hist_lengths=lengths,
        cand_items=torch.randint(1, 31, (B, C), generator=g) * cand_mask,
        cand_times=(last.unsqueeze(1) + offsets) * cand_mask,
        cand_mask=cand_mask,
        user_features=torch.stack([torch.randint(0, 6, (B,), generator=g), torch.randint(0, 3, (B,), generator=g)], 1),
        dense_features=torch.zeros(B, C, 0),
        labels=torch.randint(0, 2, (B, C, 2), generator=g).float() * cand_mask.unsqueeze(-1),
        cand_domains=cand_domains if domains else None,
    )


def _model(schema=DSCHEMA, variant="summed", **options) -> HSTURanker:
    torch.manual_seed(0)
    config = HSTURankerConfig(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=3,
                              dropout=0.0, linear_dropout=0.0, max_history=12, variant=variant, **options)
    model = HSTURanker(schema, config).eval()
    with torch.no_grad():  # larger weights than the init, so that every dependency shows clearly
        for layer in model.layers:
            layer.uvqk.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "domain" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("variant", ["summed", "interleaved"])
def test_options_off_leave_the_model_and_its_outputs_unchanged(variant):
    # a schema with domains and batches carrying cand_domains change nothing while every option is off
    plain, with_domains = _model(SCHEMA, variant), _model(DSCHEMA, variant)
    assert list(plain.state_dict()) == list(with_domains.state_dict())
    assert not any("domain" in k for k in with_domains.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), with_domains.state_dict().values()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(plain(_batch(domains=False)), with_domains(_batch()))
        torch.manual_seed(1)
        plain.train()
        loss_a = plain.loss(_batch(domains=False))[0]
        torch.manual_seed(1)
        with_domains.train()
        loss_b = with_domains.loss(_batch())[0]
    assert torch.equal(loss_a, loss_b)


def test_domain_parameters_exist_only_with_their_option():
    keys = {opt: {k for k in _model(**{opt: True}).state_dict() if "domain" in k} for opt in OPTIONS}
    assert keys["domain_token"] == {"domain_emb.weight"}
    assert {k.split(".")[0] for k in keys["domain_towers"]} == {"domain_heads"}
    assert "head.0.weight" not in _model(domain_towers=True).state_dict()  # the shared tower is replaced
    assert {k.split(".")[1] for k in keys["domain_towers"]} == {"0", "1", "2"}  # one tower per domain
    assert len(keys["domain_towers"]) == 3 * 6  # Linear, LayerNorm, Linear: weight and bias each
    assert {k.split(".")[0] for k in keys["domain_ffn"]} == {"domain_out"}
    assert len(keys["domain_ffn"]) == 2 * 3 * 2  # layers x domains x (weight, bias)


def _perturb(model: HSTURanker, prefix: str) -> HSTURanker:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("option, part", [("domain_towers", "domain_heads.{k}."),
                                          ("domain_ffn", "domain_out.0.{k}."), ("domain_ffn", "domain_out.1.{k}."),
                                          ("domain_token", "domain_emb")])
def test_a_candidate_depends_only_on_its_own_domains_parameters(option, part):
    batch = _batch()
    model = _model(**{option: True})
    with torch.no_grad():
        base = model(batch)
        for k in range(3):
            if option == "domain_token":  # one table: change domain k's row only
                other = _model(**{option: True})
                with torch.no_grad():
                    other.domain_emb.weight[k + 1].add_(torch.randn(8))  # (a constant shift would vanish in LN)
            else:
                other = _perturb(_model(**{option: True}), part.format(k=k))
            out = other(batch)
            own = batch.cand_mask & (batch.cand_domains == k + 1)
            rest = batch.cand_mask & ~own
            assert own.any() and rest.any()
            assert torch.equal(out[rest], base[rest])  # another domain's parameters: unchanged, bit for bit
            assert (out[own] - base[own]).abs().amax(-1).min() > 1e-4  # its own: every candidate changes


@pytest.mark.parametrize("option", OPTIONS)
def test_a_candidates_domain_changes_only_its_own_logits(option):
    model = _model(**{option: True})
    batch = _batch()
    moved = dataclasses.replace(batch, cand_domains=batch.cand_domains.clone())
    moved.cand_domains[0, 1] = moved.cand_domains[0, 1] % 3 + 1
    with torch.no_grad():
        a, b = model(batch), model(moved)
    changed = (a - b).abs().amax(-1) > 1e-5  # [B, C]
    assert changed[0, 1] and changed.sum() == 1


ALL = {"domain_token": True, "domain_towers": True, "domain_ffn": True}
TOKEN, TOWERS, FFN = {"domain_token": True}, {"domain_towers": True}, {"domain_ffn": True}
CACHED_CASES = [(TOKEN, "summed"), (TOWERS, "summed"), (FFN, "summed"), (ALL, "summed"), (TOKEN, "interleaved"),
                (FFN, "interleaved"), ({**TOKEN, **FFN}, "interleaved")]  # towers need the summed variant


@pytest.mark.parametrize("options, variant", CACHED_CASES)
@pytest.mark.parametrize("shared_time", [False, True])
def test_cached_scoring_equals_the_forward_with_domain_options(options, variant, shared_time):
    model = _model(variant=variant, **options)
    batch = _batch(shared_time=shared_time)
    tables = model.candidate_tables()
    with torch.no_grad():
        full = model(batch)
        for micro in (1, 2, 5):
            assert torch.allclose(model.rank_cached(batch, microbatch=micro), full, atol=1e-5)
            assert torch.allclose(model.rank_cached(batch, microbatch=micro, tables=tables), full, atol=1e-5)


def test_domain_options_train_their_parameters():
    model = _model(domain_token=True, domain_towers=True, domain_ffn=True).train()
    batch = _batch()
    loss, _ = model.loss(batch)
    loss.backward()
    present = set(batch.cand_domains[batch.cand_mask].tolist())
    for k in range(3):
        got = model.domain_heads[k][0].weight.grad
        assert (got is not None and got.abs().sum() > 0) == (k + 1 in present)
    assert model.domain_emb.weight.grad[1:].abs().sum() > 0 and model.domain_out[0][0].weight.grad is not None


def test_domain_options_refuse_what_they_cannot_use():
    with pytest.raises(ValueError, match="need a schema with domains"):
        HSTURanker(SCHEMA, HSTURankerConfig(domain_token=True))
    with pytest.raises(ValueError, match="domain_towers needs variant='summed'"):
        HSTURankerConfig(domain_towers=True, variant="interleaved")
    model = _model(domain_ffn=True)
    with pytest.raises(ValueError, match="needs batch.cand_domains"):
        model(_batch(domains=False))
    unknown = _batch()
    unknown.cand_domains[1, 0] = 0
    for m in (model, _model(domain_token=True), _model(domain_towers=True)):
        with pytest.raises(ValueError, match="a real candidate has domain 0"):
            m(unknown)
        with pytest.raises(ValueError, match="a real candidate has domain 0"):
            m.rank_cached(unknown)
    bad = _batch()
    bad.cand_domains[0, 0] = 4
    with pytest.raises(ValueError, match="cand_domains: values must be in"):
        model(bad)
