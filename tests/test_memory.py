"""MetaMeter: live meta storages, counted once per allocation, freed with their last user."""
from __future__ import annotations

import torch

from optimizedSD.engine.memory import CUDA_BLOCK, MetaMeter, cuda_block_bytes


def test_block_rounding():
    assert [cuda_block_bytes(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]


def test_counts_allocations_not_views_and_frees_with_the_last_user():
    with MetaMeter() as m:
        a = torch.empty(1000, device="meta")  # 4000 bytes -> 4096
        assert m.live == 4096
        v = a.view(10, 100)[2:]  # views share the allocation
        p = torch.nn.Parameter(a)  # so does a Parameter wrapping it
        assert m.live == 4096
        b = a * 2
        assert m.live == 2 * 4096 and m.peak == 2 * 4096
        del a
        assert m.live == 2 * 4096  # v and p still use it
        del v, p
        assert m.live == 4096
        b.add_(1)  # in place: no new allocation
        assert m.live == 4096
        del b
        assert m.live == 0 and m.peak == 2 * 4096


def test_phase_peak_and_cpu_tensors_ignored():
    with MetaMeter() as m:
        keep = torch.empty(256, dtype=torch.float16, device="meta")  # 512 bytes
        torch.empty(10**6)  # host memory is not device memory
        m.phase_start()
        assert m.phase_peak() == CUDA_BLOCK
        tmp = torch.empty(2 * CUDA_BLOCK, dtype=torch.uint8, device="meta")
        del tmp
        assert m.phase_peak() == 3 * CUDA_BLOCK and m.live == CUDA_BLOCK
        m.phase_start()
        assert m.phase_peak() == CUDA_BLOCK
        del keep


# --- replaying: the meter's shortcuts count what running everything counts ----------------------

class _Stash(torch.nn.Module):
    """Keeps a tensor it made past its return: its trace must not be replayed."""

    def forward(self, x):
        self.kept = x * 2
        return x + 1


def _trace(model, inputs):
    """(live, peak) after each call of `model` under a fresh meter."""
    from optimizedSD.engine.memory import MetaMeter

    out = []
    with MetaMeter() as m:
        for p in model.parameters():  # the weights on the device, allocated under the meter as a run's are
            p.data = torch.empty_like(p)
        xs = [torch.empty(shape, device="meta") for shape in inputs]
        for x in xs:
            y = model(x)
            out.append((m.live, m.peak))
            del y
        out.append((m.live, m.peak))
    return out


def test_cached_ops_and_replayed_calls_count_what_running_them_counts(monkeypatch):
    from optimizedSD.engine import memory

    torch.manual_seed(0)
    with torch.device("meta"):
        block = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                                    torch.nn.Flatten(2), torch.nn.Identity())
        head = torch.nn.Linear(16, 5)  # (B, 8, 16) @ (16, 5): matmul through a view of mm's output
        stash = _Stash()
    model = torch.nn.Sequential(block, head, stash)
    for m in (block[0], block, head, stash, block[4]):
        memory.replayable(m)
    inputs = [(2, 4, 4, 4), (2, 4, 4, 4), (3, 4, 4, 4), (2, 4, 4, 4)]
    traces = {}
    for grad in (False, True):  # with autograd, saved tensors outlive calls: nothing is replayed
        model.requires_grad_(grad)
        traces[grad] = [_trace(model, inputs), _trace(model, inputs)]  # the second with everything recorded
    recorded = dict(memory._Replayed._TRACES)
    monkeypatch.setattr(memory, "_signature", lambda *a: None)
    monkeypatch.setattr(memory._Replayed, "__call__", lambda self, *a, **k: self.forward(*a, **k))
    for grad in (False, True):
        model.requires_grad_(grad)
        assert traces[grad] == [_trace(model, inputs)] * 2, grad
    assert any(k[0] is block[0] and v is not None for k, v in recorded.items())  # pure: replayed
    assert all(v is None for k, v in recorded.items() if k[0] in (stash, block[4]))  # keeps a tensor / returns its input
