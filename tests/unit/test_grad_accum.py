"""Gradient accumulation in ``train_epoch``: N micro-batches give the large batch's gradient and step, a last
partial group still steps (with its own mean), the scheduler counts optimizer steps, and a DDP model skips the
all-reduce on the accumulation micro-batches (``no_sync``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.train.steps import train_epoch, warmup_cosine, with_step_flags
from tests.helpers import SPACES

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """A ``CxrNet``-shaped model (``backbone``, ``heads``) without BatchNorm or dropout: BatchNorm normalises
    with each batch's own statistics in training mode, so a micro-batch would legitimately see other activations
    than the large batch, and the equivalence tested here is the optimizer's, not the network's."""

    def __init__(self) -> None:
        super().__init__()
        self.label_spaces = SPACES[:2]  # nih14 (14 findings) and covid (4 classes)
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleDict({s.head: nn.Linear(8, len(s.classes)) for s in self.label_spaces})

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.backbone(images.float() / 255.0)
        return {name: head(features) for name, head in self.heads.items()}


def micro_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of 2 NIH and 2 COVID rows each.

    The masked multi-task loss averages each source over the rows of that source in the batch. With the same
    number of NIH (and of COVID) rows in every micro-batch, the large batch's per-source mean equals the mean of
    the micro-batches' per-source means, so loss / N accumulated over N micro-batches is exactly the large batch's
    loss. With unequal mixes the two differ by design (each micro-batch weighs its own rows), not by a bug.
    """
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batches.append(
            {
                "image": torch.randint(0, 256, (4, 1, 4, 4), generator=gen, dtype=torch.uint8),
                "source": torch.tensor([0, 1, 0, 1]),
                "label_nih14": (torch.rand(4, 14, generator=gen) < 0.3).float() * torch.tensor([1, 0, 1, 0])[:, None],
                "label_covid": torch.tensor([-1, int(torch.randint(0, 4, (1,), generator=gen)), -1, 2]),
            }
        )
    return batches


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def run(model: nn.Module, batches, accum: int, lr: float = 0.5, clip: float = 1e3):
    """One epoch with plain SGD: Adam's first step is about lr x sign(gradient) and would hide a wrong scale (so
    would an active clip, which rescales the gradient to its norm)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = warmup_cosine(optimizer, 0, 100)
    stats = train_epoch(model, batches, optimizer, scheduler, CPU, grad_clip=clip, grad_accum_steps=accum)
    return stats, scheduler


def assert_same(a: nn.Module, b: nn.Module, grads: bool = True) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=f"parameter {name}")
        if grads:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")


def test_step_flags_mark_every_nth_and_the_last_batch():
    assert [flag for _, flag in with_step_flags(range(5), 2)] == [False, True, False, True, True]
    assert [flag for _, flag in with_step_flags(range(4), 2)] == [False, True, False, True]
    assert [flag for _, flag in with_step_flags(range(3), 1)] == [True, True, True]
    assert list(with_step_flags([], 3)) == []
    assert [b for b, _ in with_step_flags(range(5), 2)] == list(range(5))


@pytest.mark.parametrize(("accum", "clip"), [(2, 1e3), (3, 1e3), (3, 0.05)])
def test_accumulated_micro_batches_give_the_large_batch_gradient_and_step(accum, clip):
    """``clip`` 1e3 never acts (a wrong loss scale shows); 0.05 always does (it must see the accumulated gradient,
    not each micro-batch's)."""
    torch.manual_seed(0)
    large = TinyNet()
    small = copy.deepcopy(large)
    micros = micro_batches(accum)
    stats_large, _ = run(large, [concat(micros)], accum=1, clip=clip)
    stats_small, scheduler = run(small, micros, accum=accum, clip=clip)
    assert stats_small["optimizer_steps"] == stats_large["optimizer_steps"] == 1
    assert scheduler.last_epoch == 1  # the scheduler stepped once, with the optimizer
    assert_same(large, small)  # same gradient (left in .grad after the step) and same parameters
    assert stats_small["loss"] == pytest.approx(stats_large["loss"], rel=1e-5)


def test_a_last_partial_group_steps_with_its_own_mean():
    """5 micro-batches, 2 per step: steps on (0, 1), (2, 3) and (4) alone, like 3 plain steps on those groups."""
    torch.manual_seed(1)
    accumulated = TinyNet()
    reference = copy.deepcopy(accumulated)
    micros = micro_batches(5, seed=3)
    stats, scheduler = run(accumulated, micros, accum=2)
    run(reference, [concat(micros[0:2]), concat(micros[2:4]), micros[4]], accum=1)
    assert stats["optimizer_steps"] == 3 and scheduler.last_epoch == 3
    assert_same(accumulated, reference)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: enough for torch's DDP wrapper and its reducer, no Ray."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp_counting(model: nn.Module) -> tuple[DistributedDataParallel, dict[str, int]]:
    """DDP around ``model`` counting its all-reduces (a comm hook runs once per gradient bucket that is reduced)
    and its ``no_sync`` contexts."""
    ddp = DistributedDataParallel(model)
    counts = {"allreduce": 0, "no_sync": 0}

    def hook(state, bucket):
        counts["allreduce"] += 1
        future = torch.futures.Future()
        future.set_result(bucket.buffer())  # one process: the sum over ranks is the local gradient
        return future

    ddp.register_comm_hook(None, hook)
    original = ddp.no_sync

    def no_sync():
        counts["no_sync"] += 1
        return original()

    ddp.no_sync = no_sync
    return ddp, counts


def test_ddp_all_reduces_once_per_optimizer_step(process_group):
    torch.manual_seed(2)
    base = TinyNet()
    micros = micro_batches(6, seed=5)
    every_batch, counts_plain = ddp_counting(copy.deepcopy(base))
    run(every_batch, micros, accum=1)
    accumulated, counts_accum = ddp_counting(copy.deepcopy(base))
    stats, _ = run(accumulated, micros, accum=3)
    assert stats["optimizer_steps"] == 2
    assert counts_plain["no_sync"] == 0 and counts_accum["no_sync"] == 4  # 2 groups x 2 accumulation batches
    buckets = counts_plain["allreduce"] // 6
    assert buckets >= 1 and counts_plain["allreduce"] == 6 * buckets
    assert counts_accum["allreduce"] == 2 * buckets  # only on the last micro-batch of each group
    plain = copy.deepcopy(base)
    run(plain, micros, accum=3)
    assert_same(accumulated.module, plain)  # no_sync changed when gradients are reduced, not what they are
