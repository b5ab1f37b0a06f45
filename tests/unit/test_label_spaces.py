"""Label spaces and what follows them: confidence and binary answers, labels per head from shard rows, the masked
multi-task loss over three heads, and checkpoints that carry their heads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.checkpoint import CheckpointError, label_spaces_of, model_from_checkpoint
from models.labels import LabelError, LabelSpace, label_key
from models.losses import multitask_loss
from pipelines.data.transforms import labels_from_table
from tests.helpers import SPACES, tiny_checkpoint

NIH, COVID, PNEUMONIA = SPACES


def test_confidence_and_binary_answer_follow_the_kind_of_space():
    findings = np.array([[0.9, 0.05], [0.6, 0.1]])
    np.testing.assert_allclose(LabelSpace("h", "s", ("a", "b"), multi_label=True).confidence(findings), [0.9, 0.6])
    np.testing.assert_allclose(NIH.binary_probability(np.array([[0.2, 0.7] + [0.0] * 12])), [0.7])
    classes = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_allclose(PNEUMONIA.confidence(classes), [0.7, 0.6])
    np.testing.assert_allclose(PNEUMONIA.binary_probability(classes), [0.3, 0.9])
    assert NIH.binary_target(np.array([[0] * 14, [1] + [0] * 13])).tolist() == [False, True]


def test_a_space_round_trips_and_narrows_to_the_classes_a_download_has():
    assert LabelSpace.from_dict(PNEUMONIA.to_dict()) == PNEUMONIA
    three = COVID.with_classes(("COVID", "Normal", "Viral Pneumonia"))
    assert three.classes == ("COVID", "Normal", "Viral Pneumonia") and three.head == "covid"
    with pytest.raises(LabelError, match="negatives"):
        LabelSpace("x", "x", ("a", "b"), multi_label=False, binary="x", negatives=("c",))


def test_shard_rows_fill_only_their_own_head():
    table = pa.table(
        {
            "source": ["pneumonia", "nih", "covid"],
            "labels": pa.array([[2], [1] + [0] * 12 + [1], [3]], pa.list_(pa.int64())),
        }
    )
    arrays = labels_from_table(table, SPACES)
    assert arrays["source"].tolist() == [2, 0, 1]
    assert arrays[label_key("nih14")].shape == (3, 14) and arrays[label_key("nih14")][1].sum() == 2
    assert arrays[label_key("nih14")][[0, 2]].sum() == 0
    assert arrays[label_key("covid")].tolist() == [-1, -1, 3]
    assert arrays[label_key("pneumonia")].tolist() == [2, -1, -1]
    with pytest.raises(ValueError, match=r"source \['pneumonia'\].*heads are for \['nih', 'covid'\]"):
        labels_from_table(table, SPACES[:2])


def test_each_head_is_trained_on_its_own_rows_only():
    torch.manual_seed(0)
    logits = {s.head: torch.randn(3, len(s.classes), requires_grad=True) for s in SPACES}
    batch = {
        "source": torch.tensor([2, 2, 1]),
        "label_nih14": torch.zeros(3, 14),
        "label_covid": torch.tensor([-1, -1, 0]),
        "label_pneumonia": torch.tensor([1, 2, -1]),
    }
    total, parts = multitask_loss(logits, batch, SPACES)
    total.backward()
    assert parts["nih14"] == 0 and logits["nih14"].grad.abs().sum() == 0  # no NIH row: no signal, still a graph
    assert logits["pneumonia"].grad[2].abs().sum() == 0 and logits["pneumonia"].grad[:2].abs().sum() > 0
    expected = torch.nn.functional.cross_entropy(logits["pneumonia"][:2], torch.tensor([1, 2]))
    torch.testing.assert_close(parts["pneumonia"], expected.detach())


def test_checkpoints_store_their_heads(tmp_path):
    folder = tiny_checkpoint(tmp_path, "cnn", "test_efficientnet", size=32)
    model = model_from_checkpoint(folder)
    assert model.label_spaces == SPACES and list(model.heads) == ["nih14", "covid", "pneumonia"]
    with pytest.raises(CheckpointError, match="predates the dataset registry"):
        label_spaces_of({"label_spaces": {"nih14": [], "covid": []}})
