"""The ``data`` section of the configuration tree: dataset paths, storage, splits, twins, the synthetic sets and
augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import Strict


class PneumoniaSplitCounts(Strict):
    """Images per class in one official split of the synthetic Kermany pneumonia set."""

    normal: int = Field(ge=0)
    bacterial: int = Field(ge=0)
    viral: int = Field(ge=0)


class PneumoniaClassCounts(Strict):
    """Images per official split and class (the real set: train 1341/2530/1345, val 8/8/0, test 234/242/148)."""

    train: PneumoniaSplitCounts
    val: PneumoniaSplitCounts
    test: PneumoniaSplitCounts

    @model_validator(mode="after")
    def _every_class_in_train_and_test(self) -> PneumoniaClassCounts:
        for split in ("train", "test"):
            for cls, count in getattr(self, split).model_dump().items():
                if count < 1:
                    raise ValueError(f"{split}.{cls} must be >= 1: train and test need every class")
        return self


class SynthConfig(Strict):
    """Synthetic radiographs written in the real NIH, COVID-19 Radiography Database and Kermany pneumonia layouts."""

    seed: int = 0
    nih_patients: int = Field(400, ge=2)
    max_images_per_patient: int = Field(4, ge=1)
    nih_image_size: int = Field(512, ge=32, le=4096)
    nih_test_patient_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    nih_images_per_archive: int = Field(500, ge=1)
    covid_images: int = Field(800, ge=4)
    covid_image_size: int = Field(299, ge=32, le=4096)
    odd_mode_fraction: float = Field(0.02, ge=0.0, le=1.0)  # RGBA / 16-bit NIH, RGB COVID, like the real sets
    near_duplicates: int = Field(0, ge=0)  # COVID images that are re-encoded copies of NIH images
    corrupt_files: int = Field(0, ge=0)  # zero-byte, truncated and text-as-PNG files planted for tests
    # uniform: 1..max_images_per_patient follow-ups each; nih: the real set's spread (43% one image, a long tail)
    images_per_patient: Literal["uniform", "nih"] = "uniform"
    nih_images: int | None = Field(None, ge=2)  # exact NIH image count: follow-ups are added or removed to hit it
    covid_class_counts: dict[str, int] | None = None  # exact images per COVID class (else covid_images, floored)
    # 0: render every image; N: render at most N images per label set and source and derive the others from one
    # by a seeded shift, scale, rotation, gamma and noise (the full-size stand-in in minutes instead of hours)
    render_pool: int = Field(0, ge=0)
    # Kermany's pediatric pneumonia set (chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg): pneumonia_images
    # spread over the official splits and classes in the real proportions, or exactly pneumonia_class_counts.
    # 0 (the built-in default, so small test configs stay NIH + COVID): no pneumonia set; ray_config.yaml sets it.
    pneumonia_images: int = Field(0, ge=0)
    pneumonia_class_counts: PneumoniaClassCounts | None = None
    pneumonia_image_size: tuple[int, int] = (1000, 2000)  # [min, max] of an image's longer side in px (never square)
    pneumonia_rgb_fraction: float = Field(0.05, ge=0.0, le=1.0)  # RGB JPEGs among the grayscale ones
    # burn a site tag into every image, in a corner of its own per source (as hospitals stamp films): a planted
    # shortcut for the shortcut check of `cxr evaluate`; false keeps the images byte for byte as before
    source_marker: bool = False

    @field_validator("pneumonia_images")
    @classmethod
    def _pneumonia_images(cls, value: int) -> int:
        if 0 < value < 8:
            raise ValueError("must be 0 (no pneumonia set) or >= 8 (one image per split and class of the real set)")
        return value

    @field_validator("pneumonia_image_size")
    @classmethod
    def _pneumonia_image_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not 32 <= low <= high <= 4096:
            raise ValueError("needs 32 <= min <= max <= 4096")
        return value

    @model_validator(mode="after")
    def _exact_counts(self) -> SynthConfig:
        if self.nih_images is not None and not (
            self.nih_patients <= self.nih_images <= self.nih_patients * self.max_images_per_patient
        ):
            raise ValueError(
                f"nih_images must lie between nih_patients ({self.nih_patients}) and nih_patients x "
                f"max_images_per_patient ({self.nih_patients * self.max_images_per_patient})"
            )
        if self.covid_class_counts is not None:
            from pipelines.data.datasets.covid import COVID_CLASSES

            if set(self.covid_class_counts) != set(COVID_CLASSES) or min(self.covid_class_counts.values()) < 1:
                raise ValueError(f"covid_class_counts needs a count >= 1 for each of {', '.join(COVID_CLASSES)}")
        return self


class AugmentConfig(Strict):
    """Training-time augmentation (albumentations); evaluation only resizes and normalises."""

    rotate_limit: float = Field(7.0, ge=0.0, le=45.0)
    brightness_limit: float = Field(0.15, ge=0.0, le=1.0)
    contrast_limit: float = Field(0.15, ge=0.0, le=1.0)
    clahe: bool = False
    scale_limit: float = Field(0.05, ge=0.0, le=0.5)


class DataConfig(Strict):
    """Where raw data and shards live, how ingest stores and splits images, and how they are streamed."""

    nih_dir: Path = Path("runs/data/nih")
    covid_dir: Path = Path("runs/data/covid")
    # Kermany pneumonia root, holds chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg; null: "pneumonia" beside
    # nih_dir (runs/data/pneumonia by default), so a run that moves nih_dir moves it too (see pneumonia_root)
    pneumonia_dir: Path | None = None
    shards_dir: Path = Path("runs/shards")
    storage_size: int = Field(256, ge=16, le=2048)  # images are stored square, grayscale, at this size
    # png (zlib level 1), png_uncompressed (cheaper to decode, larger) or raw (uint8 pixels: no decoding at all)
    storage_format: Literal["png", "png_uncompressed", "raw"] = "png"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # of NIH train_val patients
    covid_val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    covid_test_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    split_seed: int = 42
    dedup_max_distance: int = Field(4, ge=0, le=15)  # perceptual-hash Hamming distance of twin candidates
    dedup_min_correlation: float = Field(0.995, ge=0.0, le=1.0)  # 32x32 thumbnail correlation that confirms one
    rows_per_shard: int = Field(2048, ge=1)
    decode_files_per_task: int = Field(512, ge=1)  # ingest pass 1: files one Ray task decodes into one parquet file
    synth: SynthConfig = SynthConfig()
    augment: AugmentConfig = AugmentConfig()

    @property
    def pneumonia_root(self) -> Path:
        """The pneumonia set's folder: ``pneumonia_dir``, or ``pneumonia`` beside ``nih_dir`` when that is null."""
        return self.pneumonia_dir if self.pneumonia_dir is not None else self.nih_dir.parent / "pneumonia"

    @model_validator(mode="after")
    def _covid_fractions(self) -> DataConfig:
        if self.covid_val_fraction + self.covid_test_fraction >= 1.0:
            raise ValueError("covid_val_fraction + covid_test_fraction must leave images for training")
        return self
