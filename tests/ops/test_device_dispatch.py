"""Which engine runs jagged HSTU attention on which device, and the flat jagged path that CUDA devices take.

There is no GPU in CI: the dispatch rule is tested with device objects, and the flat path is run on CPU with the
per-sequence reference attention standing in for the Triton kernel (the Triton kernel itself is parity-tested under
Triton's interpreter in ``test_triton_hstu.py``). Every shipped retrieval config runs a forward and backward step
through the code path a CUDA device takes.
"""

from pathlib import Path

import pytest
import torch

import genrec.models.fuxi_alpha as fuxi_module
import genrec.models.hstu as hstu_module
from genrec.config import load_config
from genrec.models import build_model
from genrec.ops.jagged import (
    jagged_attention_engine,
    jagged_encode,
    jagged_encode_batch,
)
from tests.ops import assert_same_outputs_and_grads, make_batch, make_model

# the retrieval configs (ranking-*.yaml configure plain PyTorch rankers, device-agnostic: tests/train/test_ranking.py)
CONFIGS = sorted(p for p in Path(__file__).resolve().parents[2].glob("configs/*/*.yaml") if not p.stem.startswith("ranking"))


@pytest.mark.parametrize(("device", "has_triton", "engine"), [
    ("cpu", True, "blocked"), ("cpu", False, "blocked"), ("cuda", True, "triton"), ("cuda:1", True, "triton"),
    ("cuda", False, "padded"), ("mps", True, "padded"), ("meta", False, "padded"),
])  # fmt: skip
def test_engine_follows_the_device(device, has_triton, engine):
    assert jagged_attention_engine(torch.device(device), has_triton) == engine


@pytest.mark.parametrize("kw", [{}, {"attention_norm": "length"}, {"use_time_bias": False}, {"use_position_bias": False}])
def test_flat_jagged_path_equals_the_blocked_engine_and_the_padded_path(kw):
    model = make_model(max_len=40, **kw)
    batch = make_batch(B=4, N=37, lengths=[37, 5, 20, 1], has_time=[True, False, True, True])
    for other in (model.encode(batch), jagged_encode_batch(model, batch, block=8)):
        assert_same_outputs_and_grads(model, other, model, jagged_encode_batch(model, batch, engine="reference"))


def test_flat_path_without_timestamps_and_engine_checks():
    model = make_model()
    values, offsets = torch.arange(1, 12), torch.tensor([0, 8, 11])
    assert torch.allclose(jagged_encode(model, values, offsets, engine="reference"),
                          jagged_encode(model, values, offsets, block=4), atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="engine"):
        jagged_encode(model, values, offsets, engine="cuda")
    with pytest.raises(ValueError, match="max_len"):
        jagged_encode(make_model(max_len=8), torch.ones(9, dtype=torch.long), torch.tensor([0, 9]), engine="reference")


def test_hstu_takes_the_engine_its_device_gets(monkeypatch):
    """HSTU.encode asks jagged_attention_engine for the batch's device: "padded" means its own padded path, a flat
    engine means the flat jagged path (here the reference standing in for Triton), with the padded path's results."""
    model = make_model(max_len=40, attention_impl="jagged")
    batch = make_batch(B=3, N=30, lengths=[30, 9, 2], has_time=[True, True, False])
    reference_model = make_model(max_len=40)  # same seed and weights, padded path
    calls = []

    def engine(device, has_triton=None):
        calls.append(torch.device(device).type)
        return chosen

    monkeypatch.setattr(hstu_module, "jagged_attention_engine", engine)
    for chosen in ("padded", "reference"):
        assert_same_outputs_and_grads(reference_model, reference_model.encode(batch), model, model.encode(batch))
    assert calls == ["cpu", "cpu"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_retrieval_config_trains_a_step_on_the_cuda_code_path(path, monkeypatch):
    """Each retrieval config's model (shrunk to a small catalogue) runs forward + backward through the engine a
    CUDA device with Triton gets: the flat jagged path for HSTU configs with attention_impl=jagged, the padded path
    for FuXi-α (its jagged engine is CPU-only) and SASRec."""
    config = load_config(path)
    for module in (hstu_module, fuxi_module):  # what a CUDA device gets, with the reference standing in for Triton
        monkeypatch.setattr(module, "jagged_attention_engine", lambda device, has_triton=None: "reference")
    model = build_model(config.model, 50, config.data.max_len).train()
    N = min(config.data.max_len, 24)
    batch = make_batch(B=3, N=N, num_items=50, lengths=[N, 7, 1], has_time=[True, False, True])
    out = model.encode(batch)
    assert out.shape == (3, N, config.model.embedding_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "item_emb" in n)
