"""VectorQuantizer: quantisation, straight-through gradient, losses, EMA, k-means, dead codes."""
import pytest
import torch

from vqext.errors import ConfigError
from vqext.nn import VectorQuantizer
from vqext.ops import nearest_code_reference


@pytest.mark.parametrize("heads", [1, 4])
def test_quantized_values_are_nearest_codes(heads):
    vq = VectorQuantizer(32, 16, heads=heads)
    x = torch.randn(3, 7, 16)
    out = vq(x)
    want_shape = (3, 7) if heads == 1 else (3, 7, heads)
    assert out.indices.shape == want_shape and out.indices.dtype == torch.int64
    cb = vq.codebook.detach()
    xs = x.reshape(3, 7, heads, 16 // heads)
    ref_idx, _ = nearest_code_reference(xs, cb)
    assert torch.equal(out.indices.reshape(ref_idx.shape), ref_idx)
    q = cb[torch.arange(heads), ref_idx].reshape(x.shape)
    assert torch.allclose(out.quantized, q, atol=1e-6)  # x + (q - x) rounds


def test_straight_through_gradient_and_codebook_gradient():
    vq = VectorQuantizer(16, 8, heads=2, commitment_weight=0.5)
    x = torch.randn(20, 8, requires_grad=True)
    out = vq(x)
    w = torch.randn_like(out.quantized)
    (out.quantized * w).sum().backward(retain_graph=True)
    assert torch.equal(x.grad, w)  # identity: the gradient skips the quantiser
    assert vq.codebook.grad is None  # the straight-through path gives the codebook nothing
    x.grad = None
    out.loss.backward()
    # codebook_loss pulls chosen codes towards x; commitment pulls x towards its code.
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    q = out.quantized.detach()
    assert torch.allclose(x.grad, 0.5 * 2 * (x.detach() - q) / x.numel(), atol=1e-7)


def test_losses_match_definitions():
    vq = VectorQuantizer(8, 4, commitment_weight=0.3, codebook_weight=2.0)
    x = torch.randn(50, 4)
    out = vq(x)
    mse = (x - out.quantized.detach()).pow(2).mean()
    assert torch.allclose(out.commitment_loss, mse) and torch.allclose(out.codebook_loss, mse)
    assert torch.allclose(out.loss, 2.0 * mse + 0.3 * mse)


def test_stats_usage_and_perplexity():
    vq = VectorQuantizer(4, 2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[[10.0, 0], [0, 10], [-10, 0], [0, -10]]]))
    x = torch.tensor([[9.0, 0], [0, 9], [9.5, 0], [0, 11]])  # codes 0 and 1, twice each
    out = vq.eval()(x)
    assert out.usage.item() == pytest.approx(0.5)
    assert out.perplexity.item() == pytest.approx(2.0)


def test_ema_moves_codes_to_cluster_means():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]])
    vq = VectorQuantizer(3, 2, ema=True, decay=0.5)
    with torch.no_grad():
        vq.codebook.copy_(centers.unsqueeze(0) * 0.5)
        vq.ema_sum.copy_(vq.codebook)
    assert not isinstance(vq.codebook, torch.nn.Parameter)
    for _ in range(30):
        x = centers[torch.randint(0, 3, (300,))] + 0.1 * torch.randn(300, 2)
        out = vq(x)
    assert out.codebook_loss.item() == 0.0
    assert torch.allclose(vq.codebook[0], centers, atol=0.1)


def test_kmeans_init_finds_clusters():
    torch.manual_seed(1)
    centers = torch.randn(4, 3) * 10
    x = centers[torch.arange(400) % 4] + 0.01 * torch.randn(400, 3)
    vq = VectorQuantizer(4, 3, kmeans_init=True, kmeans_iters=20)
    assert not bool(vq.initialized)
    out = vq(x)
    assert bool(vq.initialized)
    # k-means++ seeding puts one seed in each tight cluster, so every center gets a code.
    d = torch.cdist(centers, vq.codebook[0].detach())
    assert d.min(1).values.max() < 0.1
    assert out.commitment_loss.item() < 1e-3


def test_kmeans_init_per_head_with_fewer_vectors_than_codes():
    vq = VectorQuantizer(64, 8, heads=2, kmeans_init=True)
    vq(torch.randn(10, 8))  # 10 vectors, 64 codes: sampled with replacement, no error
    assert torch.isfinite(vq.codebook).all()


def test_dead_code_reset():
    torch.manual_seed(2)
    vq = VectorQuantizer(8, 2, decay=0.5, dead_code_threshold=0.5)
    with torch.no_grad():
        vq.codebook.zero_()
        vq.codebook[0, 0] = torch.tensor([0.0, 0.0])
        vq.codebook[0, 1:] = 1000.0  # far away: never chosen, so their usage decays
    x = torch.randn(64, 2)
    vq(x)  # usage of codes 1..7 halves to 0.5: not yet below the threshold
    assert (vq.codebook[0, 1:] == 1000.0).all()
    vq(x)  # now 0.25 < 0.5: reset onto vectors of the batch
    moved = vq.codebook[0, 1:].detach()
    assert (moved.abs() < 100).all()
    assert all(any(torch.equal(m, row) for row in x) for m in moved)
    assert (vq.usage_ema[0, 1:] == 1.0).all()


def test_eval_mode_does_not_update_state():
    vq = VectorQuantizer(8, 4, ema=True, dead_code_threshold=10.0, kmeans_init=True).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(30, 4))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_deterministic_with_seed():
    def run():
        torch.manual_seed(5)
        vq = VectorQuantizer(16, 4, kmeans_init=True, dead_code_threshold=0.1)
        x = torch.randn(100, 4)
        return vq(x).quantized
    assert torch.equal(run(), run())


def test_float64_and_compile():
    vq = VectorQuantizer(16, 8, heads=2).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    out = vq(x)
    assert out.quantized.dtype == torch.float64
    compiled = torch.compile(vq.eval())
    assert torch.equal(compiled(x).indices, vq.eval()(x).indices)


@pytest.mark.parametrize("kwargs", [dict(num_codes=0, dim=4), dict(num_codes=4, dim=6, heads=4),
                                    dict(num_codes=4, dim=4, decay=1.0),
                                    dict(num_codes=4, dim=4, dead_code_threshold=-1.0)])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        VectorQuantizer(**kwargs)


def test_bad_input_dim():
    with pytest.raises(ValueError, match="dim"):
        VectorQuantizer(4, 8)(torch.randn(3, 5))
