"""MetaMeter: live meta storages, counted once per allocation, freed with their last user."""
from __future__ import annotations

import torch

from optimizedSD.memory import CUDA_BLOCK, MetaMeter, cuda_block_bytes


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
