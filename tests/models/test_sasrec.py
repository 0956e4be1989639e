import torch

from genrec.data.batches import Batch
from genrec.models.sasrec import SASRec, SASRecConfig


def test_sasrec_causal_and_normalised():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=20, max_len=10, embedding_dim=8, num_blocks=2, num_heads=2, ffn_dim=8, dropout=0.0)).eval()
    ids = torch.randint(1, 21, (2, 8))
    lengths = torch.tensor([8, 8])
    zeros = torch.zeros_like(ids)
    b1 = Batch(ids, zeros, zeros, lengths, torch.zeros(2, dtype=torch.bool))
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] % 20) + 1
    b2 = Batch(ids2, zeros, zeros, lengths, torch.zeros(2, dtype=torch.bool))
    with torch.no_grad():
        a, b = model.encode(b1), model.encode(b2)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2, 8), atol=1e-5)


def test_sasrec_encode_last_is_the_last_real_position():
    from tests.ops import make_batch

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=20, max_len=16, embedding_dim=8, num_blocks=1, num_heads=2, ffn_dim=8)).eval()
    batch = make_batch(B=3, N=9, lengths=[9, 1, 4])
    assert torch.allclose(model.encode_last(batch), model.encode(batch)[torch.arange(3), batch.lengths - 1])
