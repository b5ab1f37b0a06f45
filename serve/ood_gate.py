"""The router's out-of-distribution check: every decoded image is scored before any model is asked.

The check is stage B's ``models.ood.OodDetector`` (from ensemble.yaml's ``ood``; none: no check, answers carry
``"ood": null``). An image scoring past its threshold gets 422 ``not_a_chest_radiograph`` with the score, unless
``ood.enabled`` is false or the request says ``?ood=off`` (research use): then it is answered and the answer says
the check was skipped. Every answer carries ``{"score", "threshold", "checked"}``; every score is observed by the
``cxr_ood_score`` histogram.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.datastructures import QueryParams

from models.ood import OodDetector
from serve.inputs import InputRejected
from serve.schema import error_body

SWITCH_VALUES = {"on": True, "off": False}


class OodGate:
    REASON = "not_a_chest_radiograph"

    def __init__(self, detector: dict[str, Any] | None, enabled: bool) -> None:
        self.detector = OodDetector.from_dict(detector) if detector else None
        self.enabled = enabled

    @staticmethod
    def requested(params: QueryParams) -> bool:
        """``?ood=on`` (default) or ``off``; anything else is 400 ``bad_ood``."""
        value = params.get("ood", "on")
        if value not in SWITCH_VALUES:
            raise InputRejected(400, "bad_ood", f"ood must be on or off, got {value!r}")
        return SWITCH_VALUES[value]

    def score(self, gray: np.ndarray) -> float | None:
        """The image's score (None without a check); cheap enough (~0.5 ms) to run in the decode thread."""
        return None if self.detector is None else self.detector.score(gray)

    def verdict(self, score: float | None, requested: bool) -> dict[str, Any] | None:
        """The answer's ``ood`` object: the score, the threshold, whether refusal was checked, and ``refused``."""
        if score is None or self.detector is None:
            return None
        checked = self.enabled and requested
        return {
            "score": score,
            "threshold": self.detector.threshold,
            "checked": checked,
            "refused": checked and self.detector.refuses(score),
        }

    @staticmethod
    def refusal(verdict: dict[str, Any]) -> dict[str, Any]:
        """The 422 body of a refused image."""
        detail = (
            f"the image scores {verdict['score']:.2f} against the training radiographs, past the refusal threshold "
            f"{verdict['threshold']:.2f}: it does not look like the chest radiographs the models learned from "
            "(send ?ood=off to have it answered anyway, for research use)"
        )
        return {**error_body(422, OodGate.REASON, detail), "ood": verdict}

    def describe(self) -> dict[str, Any] | None:
        """For /v1/model: the check's threshold, its validation refusal rate and whether it refuses."""
        if self.detector is None:
            return None
        return {
            "enabled": self.enabled,
            "threshold": self.detector.threshold,
            "false_refusal": self.detector.false_refusal,
            "side": self.detector.side,
            "components": int(self.detector.components.shape[0]),
        }
