"""apply_rope: native kernel against the reference, gradients, registration, bad input."""
import pytest
import torch

from vqext import _native
from vqext.ops import apply_rope, apply_rope_reference

from conftest import devices

native = pytest.mark.skipif(not _native.native_available(), reason="native extension not built")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (1, 1, 1, 2), (3, 5, 16), (2, 2, 33, 128), (1, 4, 9, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=device)
    for offset in (0, 5, 1000):
        torch.testing.assert_close(apply_rope(x, offset), apply_rope_reference(x, offset))


@pytest.mark.parametrize("device", devices())
def test_per_batch_offsets_and_noncontiguous(device):
    x = torch.randn(3, 10, 4, 16, device=device).transpose(1, 2)  # (3, 4, 10, 16), not contiguous
    off = torch.tensor([0, 7, 300], device=device)
    torch.testing.assert_close(apply_rope(x, off), apply_rope_reference(x, off))
    torch.testing.assert_close(apply_rope(x, off.to(torch.int32)), apply_rope_reference(x, off))
    one = torch.tensor([4], device=device)
    torch.testing.assert_close(apply_rope(x, one), apply_rope_reference(x, 4))


def test_half_precision_cpu():
    x = torch.randn(2, 3, 5, 8)
    for dt in (torch.float16, torch.bfloat16):
        y = apply_rope(x.to(dt), 3)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), apply_rope_reference(x, 3), atol=2e-2, rtol=2e-2)


def test_rotation_preserves_norm_and_inverts():
    x = torch.randn(2, 3, 50, 32, dtype=torch.float64)
    y = apply_rope(x, 11)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # turning by position p then the gradient path (R^T) gives x back
    x.requires_grad_(True)
    y = apply_rope(x, 11)
    (g,) = torch.autograd.grad(y, x, y.detach())
    torch.testing.assert_close(g, x.detach())


def test_gradcheck():
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, 3), (x,))
    off = torch.tensor([1, 9])
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, off), (x,))


@native
def test_opcheck():
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.vqext.apply_rope.default, (x, 3, None, 10000.0, False))
    torch.library.opcheck(torch.ops.vqext.apply_rope.default, (x, 0, torch.tensor([1, 2]), 500.0, True))


@native
def test_torch_compile():
    x = torch.randn(2, 3, 5, 8)
    f = torch.compile(lambda t: apply_rope(t, 4) * 2, fullgraph=True)
    torch.testing.assert_close(f(x), apply_rope_reference(x, 4) * 2)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(2, 3, 5, 7),), {}, "even"),
    ((torch.randn(2, 8),), {}, "x must have shape"),
    ((torch.randint(0, 3, (2, 3, 4)),), {}, "x must be a floating-point"),
    ((torch.randn(2, 3, 4), torch.tensor([1.0, 2.0])), {}, "offset"),
    ((torch.randn(2, 3, 4), torch.tensor([1, 2, 3])), {}, "offset"),
    ((torch.randn(2, 3, 4), torch.tensor([[1], [2]])), {}, "offset"),
    ((torch.randn(2, 3, 4), 1.5), {}, "offset"),
    ((torch.randn(2, 3, 4),), {"base": -1.0}, "base"),
    (("x",), {}, "x must be a torch.Tensor"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        apply_rope(*args, **kwargs)
