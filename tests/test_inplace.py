"""The in-place forms of SiLU, addition and multiplication (optimizedSD/inplace.py): the same values
as PyTorch's out-of-place operations, written into the fresh tensor only where that cannot change
the result or another tensor."""
import pytest
import torch
import torch.nn.functional as F

from optimizedSD.model import inplace


def _pair(shape=(2, 3, 4, 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("name, reference", [("add", torch.add), ("mul", torch.mul)])
def test_same_bits_written_into_the_fresh_tensor(name, reference):
    fresh, other = _pair()
    expected, other_before = reference(fresh, other), other.clone()
    out = getattr(inplace, name)(fresh, other)
    assert torch.equal(out, expected) and torch.equal(other, other_before)
    assert out.data_ptr() == fresh.data_ptr()  # no new tensor


@pytest.mark.parametrize("name, reference", [("add", torch.add), ("mul", torch.mul)])
def test_promotion_broadcast_and_autograd_leave_the_inputs_alone(name, reference):
    half, single = _pair(dtype=torch.float16)[0], _pair()[1]
    row = torch.ones(1, 1, 1, 5)
    wide = torch.ones(2, 3, 4, 5)
    leaf = torch.randn(2, 3, 4, 5, requires_grad=True)
    for fresh, other in ((half, single), (row, wide), (leaf * 1, wide)):
        before = fresh.detach().clone()
        out = getattr(inplace, name)(fresh, other)
        assert out.dtype == reference(fresh, other).dtype and out.shape == reference(fresh, other).shape
        assert torch.equal(out.detach(), reference(before, other))
        assert torch.equal(fresh.detach(), before)  # untouched: the result needed a new tensor


def test_silu_in_place_without_autograd_and_differentiable_with_it():
    fresh, _ = _pair()
    expected = F.silu(fresh)
    out = inplace.silu(fresh)
    assert torch.equal(out, expected) and out.data_ptr() == fresh.data_ptr()
    x = torch.randn(4, 3, requires_grad=True)
    inplace.SiLU()(x * 2).sum().backward()  # an in-place SiLU here would fail: autograd needs its input
    s = torch.sigmoid(2 * x.detach())
    assert torch.allclose(x.grad, 2 * (s + 2 * x.detach() * s * (1 - s)))
