"""The metadata fusion head: age, sex and view position encoded with missing values, read by the heads next to the
image features, trained by ``train_epoch``, and kept by checkpoints."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from models import metadata
from models.checkpoint import model_from_checkpoint, save_checkpoint
from models.factory import build_model
from pipelines.data.transforms import metadata_from_table
from pipelines.train.steps import predict, train_epoch, warmup_cosine
from tests.helpers import SPACES

CPU = torch.device("cpu")


def _named(vector: np.ndarray) -> dict[str, float]:
    return dict(zip(metadata.FEATURES, vector.tolist(), strict=True))


def test_fields_encode_with_missing_indicators():
    assert _named(metadata.encode(58, "M", "PA")) == pytest.approx(
        {"age": 0.58, "age_missing": 0, "sex_male": 1, "sex_female": 0, "sex_missing": 0,
         "view_pa": 1, "view_ap": 0, "view_missing": 0}
    )  # fmt: skip
    assert _named(metadata.encode("058Y", "F", "ap"))["age"] == pytest.approx(0.58)  # the DICOM age string
    nothing = _named(metadata.encode())
    assert nothing["age"] == 0 and nothing["age_missing"] == nothing["sex_missing"] == nothing["view_missing"] == 1
    odd = _named(metadata.encode("unknown", "O", "LL"))  # unparseable age, other sex, lateral view: missing
    assert odd["age_missing"] == odd["sex_missing"] == odd["view_missing"] == 1


def test_shard_rows_without_metadata_are_all_missing():
    table = pa.table({"age": pa.array([40, None], pa.int64()), "sex": ["F", None], "view_position": ["AP", None]})
    rows = metadata_from_table(table)
    assert rows.shape == (2, len(metadata.FEATURES)) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[1], metadata.encode())
    assert _named(rows[0])["view_ap"] == 1
    np.testing.assert_array_equal(metadata_from_table(pa.table({"x": [1]})), metadata.encode()[None])


def _fusion_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("test_efficientnet", 32, SPACES, metadata=True).eval()


def test_the_heads_read_the_metadata_and_a_missing_one_is_the_default():
    model = _fusion_model()
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = model(images)
        missing = model(images, torch.from_numpy(np.stack([metadata.encode()] * 2)))
        known = model(images, torch.from_numpy(np.stack([metadata.encode(80, "M", "AP")] * 2)))
    for head in plain:
        torch.testing.assert_close(plain[head], missing[head])
        assert not torch.allclose(plain[head], known[head])
    without = build_model("test_efficientnet", 32, SPACES)
    assert not without.uses_metadata and without.metadata_encoder is None


def test_a_mixed_batch_trains_the_encoder_and_predict_can_hide_the_metadata(tmp_path):
    model = _fusion_model()
    gen = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randint(0, 256, (4, 1, 32, 32), generator=gen, dtype=torch.uint8),
        "source": torch.tensor([0, 0, 1, 2]),
        "label_nih14": torch.tensor([[1.0] * 14, [0.0] * 14, [0.0] * 14, [0.0] * 14]),
        "label_covid": torch.tensor([-1, -1, 2, -1]),
        "label_pneumonia": torch.tensor([-1, -1, -1, 1]),
        # NIH rows carry metadata, the COVID and pneumonia rows none
        "metadata": torch.from_numpy(
            np.stack([metadata.encode(30, "F", "PA"), metadata.encode(70, "M", "AP")] + [metadata.encode()] * 2)
        ),
    }
    before = [p.detach().clone() for p in model.metadata_encoder.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, [batch], optimizer, warmup_cosine(optimizer, 0, 10), CPU)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.metadata_encoder.parameters(), strict=True))

    with_meta, without_meta = predict(model, [batch], CPU), predict(model, [batch], CPU, use_metadata=False)
    assert not np.allclose(with_meta["nih14"][:2], without_meta["nih14"][:2])  # the NIH rows' answers change
    np.testing.assert_allclose(with_meta["covid"][2:], without_meta["covid"][2:], rtol=1e-5)  # already missing

    folder = save_checkpoint(tmp_path / "cnn", model, role="cnn", epoch=0, config={}, metrics={})
    again = model_from_checkpoint(folder)
    assert again.uses_metadata
    np.testing.assert_allclose(predict(again, [batch], CPU)["nih14"], with_meta["nih14"], rtol=1e-5)
