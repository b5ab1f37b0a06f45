"""Training recipes: the config keys and their checks, the phase schedule (resume included), which parameters
train in each phase (BatchNorm statistics frozen with the backbone), the optimizer groups, and what DDP syncs
after unfreezing (a one-process gloo group, no Ray)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.factory import build_model
from pipelines.config import ConfigError, load_config
from pipelines.train import recipes
from pipelines.train.driver import for_role
from pipelines.train.recipes import ALL, HEADS, enter_phase, param_groups, phase_for_epoch
from pipelines.train.steps import train_epoch, warmup_cosine
from tests.helpers import CONFIG, SPACES

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ config


def test_defaults_keep_plain_fine_tuning():
    train = load_config(CONFIG).train
    assert (train.recipe, train.freeze_backbone_epochs, train.backbone_lr_scale, train.grad_accum_steps) == (
        "full",
        0,
        1.0,
        1,
    )


def test_valid_recipes_load():
    two = load_config(CONFIG, "demo", ["train.recipe=two_phase", "train.freeze_backbone_epochs=2"]).train
    assert (two.recipe, two.freeze_backbone_epochs) == ("two_phase", 2)
    probe = load_config(CONFIG, "demo", ["train.recipe=linear_probe", "train.grad_accum_steps=4"]).train
    assert (probe.recipe, probe.grad_accum_steps) == ("linear_probe", 4)


@pytest.mark.parametrize(
    ("sets", "dotted"),
    [
        (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
        (["train.recipe=probe"], "train.recipe"),
        (["train.backbone_lr_scale=0"], "train.backbone_lr_scale"),
        (["train.freeze_backbone_epochs=-1"], "train.freeze_backbone_epochs"),
        (["train.recipe=two_phase"], "train.freeze_backbone_epochs"),  # two_phase needs its heads-only epochs
        (["train.freeze_backbone_epochs=2"], "train.freeze_backbone_epochs"),  # ... and nothing else reads them
    ],
)
def test_bad_recipe_settings_fail_with_the_dotted_key(sets, dotted):
    with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
        load_config(CONFIG, "demo", sets)


def test_two_phase_must_unfreeze_within_the_roles_epochs():
    cfg = load_config(
        CONFIG, "demo", ["train.recipe=two_phase", "train.freeze_backbone_epochs=12", "model.vit.epochs=60"]
    )
    recipes.check_recipe(for_role(cfg, "vit"), "vit")  # the ViT's 60 epochs: unfreezes at 12
    with pytest.raises(ConfigError, match=r"train\.freeze_backbone_epochs \(12\).*cnn"):
        recipes.check_recipe(for_role(cfg, "cnn"), "cnn")  # the CNN's 10: it never would


# -------------------------------------------------------------------------------------------- schedule


def test_phase_schedule_is_a_function_of_the_epoch():
    """So a run resumed at any epoch lands in the phase that epoch belongs to."""
    assert [phase_for_epoch("full", 0, e) for e in range(3)] == [ALL] * 3
    assert [phase_for_epoch("linear_probe", 0, e) for e in range(3)] == [HEADS] * 3
    assert [phase_for_epoch("two_phase", 2, e) for e in range(4)] == [HEADS, HEADS, ALL, ALL]


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("test_efficientnet", 32, SPACES)  # has BatchNorm, whose running statistics must stay put


def batches(count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (4, 1, 32, 32), generator=gen, dtype=torch.uint8),
            "source": torch.tensor([0, 0, 1, 2]),
            "label_nih14": (torch.rand(4, 14, generator=gen) < 0.3).float() * torch.tensor([1, 1, 0, 0])[:, None],
            "label_covid": torch.tensor([-1, -1, 0, -1]),
            "label_pneumonia": torch.tensor([-1, -1, -1, 2]),
        }
        for _ in range(count)
    ]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module, floats_only: bool = True) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if (v.is_floating_point() or not floats_only) and not torch.equal(v, after[k])}


def make_optimizer(model: nn.Module, scale: float = 0.1):
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, scale), lr=1e-2, weight_decay=0.05)
    return optimizer, warmup_cosine(optimizer, 0, 20)


def test_param_groups_split_heads_and_backbone_with_the_scaled_rate():
    model = tiny_cnn()
    groups = param_groups(model, 1e-3, 0.1)
    assert [g["name"] for g in groups] == ["heads", "backbone"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter once
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.heads.parameters()}


def test_heads_phase_trains_only_the_heads_and_freezes_batchnorm_statistics():
    model = enter_phase(tiny_cnn(), HEADS, lambda m: m)
    optimizer, scheduler = make_optimizer(model)
    backbone_before, heads_before = snapshot(model.backbone), snapshot(model.heads)
    assert any(k.endswith("running_mean") for k in backbone_before)
    stats = train_epoch(model, batches(), optimizer, scheduler, CPU, phase=HEADS)
    assert stats["optimizer_steps"] == 2
    assert not changed(backbone_before, model.backbone, floats_only=False)  # weights, running stats, counters
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert changed(heads_before, model.heads) == set(heads_before)
    assert not model.backbone.training and model.heads.training


def test_two_phase_then_trains_everything_and_resumes_in_its_phase(tmp_path):
    model = enter_phase(tiny_cnn(), HEADS, lambda m: m)  # epoch 0 of two_phase with freeze_backbone_epochs=1
    optimizer, scheduler = make_optimizer(model)
    train_epoch(model, batches(), optimizer, scheduler, CPU, phase=HEADS)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp_path / "ckpt.pt")  # fmt: skip

    # a restarted worker rebuilds everything and resumes at epoch 1, which is the whole-network phase
    payload = torch.load(tmp_path / "ckpt.pt")
    resumed = tiny_cnn()
    resumed.load_state_dict(payload["model"])
    optimizer, scheduler = make_optimizer(resumed)
    optimizer.load_state_dict(payload["optimizer"])  # same groups in both phases: loads across the switch
    scheduler.load_state_dict(payload["scheduler"])
    phase = phase_for_epoch("two_phase", 1, 1)
    assert phase == ALL and scheduler.last_epoch == 2
    resumed = enter_phase(resumed, phase, lambda m: m)
    before = snapshot(resumed)
    train_epoch(resumed, batches(seed=1), optimizer, scheduler, CPU, phase=phase)
    moved = changed(before, resumed)
    assert {k for k in before if k.startswith("backbone.") and k.endswith(".weight")} <= moved
    assert any(k.endswith("running_mean") for k in moved)  # BatchNorm statistics move again
    assert resumed.backbone.training
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * optimizer.param_groups[0]["lr"])


# ------------------------------------------------------------------------------------------------- DDP


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
        self.heads = nn.ModuleDict({"out": nn.Linear(5, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["out"](self.backbone(x))


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: enough for torch's DDP wrapper and its reducer, no Ray."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def reduced_parameters(model: DistributedDataParallel) -> set[int]:
    """One training step; the ids of the parameters whose gradients DDP all-reduced (a comm hook sees every bucket
    the reducer sends across ranks)."""
    seen: set[int] = set()

    def hook(state, bucket):
        seen.update(id(p) for p in bucket.parameters())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, hook)
    model(torch.randn(4, 6)).square().mean().backward()
    return seen


def test_unfreezing_under_ddp_needs_a_new_wrapper(process_group):
    """DDP decides what it syncs when it wraps: a wrapper built while the backbone was frozen never all-reduces
    the backbone's gradients, even once they exist, so each rank would train its own backbone. The wrapper
    ``enter_phase`` builds after unfreezing syncs every trainable parameter."""
    torch.manual_seed(0)
    net = TinyNet()
    backbone, heads = {id(p) for p in net.backbone.parameters()}, {id(p) for p in net.heads.parameters()}
    heads_phase = enter_phase(net, HEADS, DistributedDataParallel)
    assert reduced_parameters(heads_phase) == heads
    assert all(p.grad is None for p in net.backbone.parameters())

    stale = enter_phase(net, HEADS, DistributedDataParallel)
    recipes.set_backbone_trainable(stale, True)  # unfreezing under a wrapper built for the heads phase
    assert reduced_parameters(stale) == heads  # the backbone got gradients, but they were never all-reduced
    assert all(p.grad is not None for p in net.backbone.parameters())

    rewrapped = enter_phase(stale, ALL, DistributedDataParallel)  # what the worker loop does at the switch
    assert reduced_parameters(rewrapped) == heads | backbone
