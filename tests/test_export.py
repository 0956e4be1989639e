"""Export of the encoder and scorer (torch.export): parity with the eager model, files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genrec.api import Recommender
from genrec.cli import main
from genrec.export import check_parity, export_recommender, load_exported, random_batch

from .conftest import synthetic_interactions

TINY = {
    "data": {"max_len": 12},
    "model": {"embedding_dim": 8, "num_blocks": 1, "num_heads": 2, "attention_dim": 4, "linear_dim": 4, "ffn_dim": 8},
    "train": {"epochs": 2, "batch_size": 8, "num_negatives": 16, "eval_batch_size": 16, "lr": 0.01, "num_threads": 1},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> (fitted Recommender, its saved directory, its export directory), for HSTU (both paths) and SASRec."""
    out = {}
    for name in ("hstu", "hstu-jagged", "sasrec"):
        model = {**TINY["model"], "name": name.split("-")[0]}
        if name == "hstu-jagged":  # trained with the jagged fast path; the export holds the plain path
            model["attention_impl"] = "jagged"
        rec = Recommender(**{**TINY, "model": model}).fit(synthetic_interactions())
        root = tmp_path_factory.mktemp(f"export-{name}")
        out[name] = (rec, rec.save(root / "model"), export_recommender(rec, root / "exported"))
    return out


@pytest.fixture(params=["hstu", "hstu-jagged", "sasrec"])
def trained(request, models):
    return models[request.param]


def test_exported_encoder_and_scorer_match_eager_within_1e5(trained):
    rec, _, out = trained
    exported = load_exported(out)
    assert check_parity(rec, exported) <= 1e-5
    # a batch wider and longer than the export example, all rows with timestamps, then none
    rng = np.random.default_rng(1)
    for timed in ("all", "none"):
        inputs = random_batch(len(rec.item_map_), 33, rec.config_.data.max_len, rng, timed=timed)
        user = exported.encoder(*inputs)
        assert user.shape == (33, rec.item_vectors_.shape[1])
        assert exported.scorer(user).shape == (33, len(rec.item_map_) + 1)


def test_exported_top_k_equals_the_python_api(trained):
    rec, _, out = trained
    exported = load_exported(out)
    history = ["i3", "i4", "i5"]
    ids = torch.as_tensor(exported.item_map.to_internal(history)).unsqueeze(0)
    zeros = torch.zeros_like(ids)
    with torch.inference_mode():
        scores = exported.scorer(exported.encoder(ids, zeros, zeros, torch.tensor([3]), torch.tensor([False])))[0]
        scores[0] = float("-inf")
    top = torch.topk(scores, 5)
    items, expected = rec.recommend(history, k=5, exclude_seen=False)
    assert exported.item_map.to_external(top.indices.tolist()) == items
    assert np.allclose(top.values.numpy(), expected, atol=1e-5)


def test_export_directory_contents_and_no_overwrite(trained):
    rec, _, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt2", "item_ids.json", "manifest.json", "scorer.pt2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_id"] == rec.model_id_ and manifest["max_len"] == 12 and manifest["num_items"] == 30
    with pytest.raises(FileExistsError):
        export_recommender(rec, out)
    with pytest.raises(ValueError, match="format"):
        export_recommender(rec, out.parent / "other", "onnx")


def test_genrec_export_command(models, tmp_path, capsys):
    _, model_dir, _ = models["hstu"]
    args = ["export", "--checkpoint", str(model_dir), "--format", "torch-export", "--output", str(tmp_path / "x")]
    assert main(args) == 0
    assert "max |exported - eager|" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(model_dir), "--output", str(tmp_path / "x")]) == 2  # exists: clear error
