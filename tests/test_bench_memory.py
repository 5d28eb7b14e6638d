"""The allocation tracker behind the CPU memory numbers: known op sequences give known peaks."""

import torch

from bench.memory import AllocationTracker, held_tensor_bytes, step_peak_memory

N = 10_000
VECTOR = 4 * N  # bytes of one float32 vector of N


def test_out_of_place_sequence_peaks_at_two_live_vectors():
    x = torch.randn(N)
    with AllocationTracker() as tracker:
        y = x * 2  # one vector
        z = y + 1  # two
        del y  # one
        w = z * 3  # two again
        del z, w  # none
    assert tracker.peak_bytes == 2 * VECTOR
    assert tracker.current_bytes == 0
    assert [a.op for a in tracker.allocations] == ["aten.mul", "aten.add", "aten.mul"]
    assert all(a.nbytes == VECTOR for a in tracker.allocations)


def test_in_place_ops_views_and_out_arguments_allocate_nothing():
    x, y, out = torch.randn(N), torch.randn(N), torch.empty(N)
    with AllocationTracker() as tracker:
        x.mul_(2).add_(y, alpha=0.5)
        x.view(100, 100).t()[3].zero_()
        torch.mul(x, y, out=out)
        torch._foreach_lerp_([x], [y], 0.1)
    assert tracker.peak_bytes == 0
    assert tracker.allocations == []


def test_rebinding_keeps_two_vectors_live_and_frees_the_old_one():
    # q = q - a * y: the product and the new q are live together; the old q dies.
    q, y = torch.randn(N), torch.randn(N)
    with AllocationTracker() as tracker:
        for _ in range(5):
            q = q - 0.5 * y
    assert tracker.peak_bytes == 2 * VECTOR
    assert tracker.current_bytes == 0  # the pre-existing q died, its successor lives


def test_freeing_a_pre_existing_tensor_lowers_the_count():
    holder = [torch.randn(N)]
    with AllocationTracker() as tracker:
        holder[0].sum()  # seen by an op: now tracked
        holder.clear()  # -1 vector
        fresh = torch.empty(N)  # +1 vector
    assert tracker.current_bytes == 0
    assert tracker.peak_bytes == 4  # the 0-dim sum, nothing else at once
    del fresh


def test_step_peak_memory_of_optimizers_known_to_be_in_place_or_not():
    params = [torch.nn.Parameter(torch.randn(N))]
    params[0].grad = torch.randn(N)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
    sgd.step()
    assert step_peak_memory(sgd.step, torch.device("cpu"))["peak_bytes"] == 0
    # foreach Adam forms sqrt(exp_avg_sq) out of place: one vector (give or take 0-dim scalars).
    adam = torch.optim.Adam(params, lr=0.1, foreach=True)
    adam.step()
    assert abs(step_peak_memory(adam.step, torch.device("cpu"))["peak_bytes"] - VECTOR) <= 64


def test_held_tensor_bytes_counts_state_once_and_skips_parameters():
    params = [torch.nn.Parameter(torch.randn(N)), torch.nn.Parameter(torch.randn(N))]
    for p in params:
        p.grad = torch.randn(N)
    adam = torch.optim.Adam(params, foreach=True)
    adam.step()
    held = held_tensor_bytes(adam, params + [p.grad for p in params])
    assert held == 2 * 2 * VECTOR + 2 * 4  # two moments per parameter, plus the float32 step counters
