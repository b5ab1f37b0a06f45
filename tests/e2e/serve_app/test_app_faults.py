"""Live reconfigure, overload shedding and a killed model replica (the package's one app). This module runs last
in the package: it changes the gate and restarts a replica."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import APP_ROUTER_QUEUE, HEADERS, deploy_schema, png, post, replica_actors

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _reconfigure(served, gate: dict[str, float]) -> None:
    """Redeploy with new gate settings and wait until the router reports them."""
    served["client"].deploy_apps(deploy_schema(served["args"], served["port"], gate), _blocking=True)
    deadline = time.monotonic() + 30
    while True:
        live = requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=10).json()["ensemble"]
        if all(live[key] == value for key, value in gate.items()):
            return
        assert time.monotonic() < deadline, "reconfigure never reached the router"
        time.sleep(0.2)


def _explain_covid(served, answer) -> float:
    """/v1/explain's probability of the answer's top covid class for the same image (seed 7), from the CNN."""
    params = {"head": "covid", "target": answer["covid"]["top_class"], "model": "cnn"}
    found = requests.post(served["url"] + "/v1/explain", params=params, data=png(seed=7), headers=HEADERS, timeout=60)
    assert found.status_code == 200, found.text
    return found.json()["probability"]


def test_live_reconfigure_changes_the_gate_without_restarting_replicas(served):
    before = replica_actors()
    assert {name.split("#")[0] for name in before} == {"CNNModel", "ViTModel", "EnsembleRouter"}
    always_cnn = {"w_cnn": 0.7, "threshold": 0.0}  # confidence >= 0 always: the CNN answers alone
    _reconfigure(served, always_cnn)
    body = post(served, data=png(seed=7)).json()
    gate = {"threshold": 0.0, "w_cnn": 0.7, "heads": ["nih14", "covid", "pneumonia"], "escalated": False}
    assert body["models_used"] == ["cnn"] and body["gate"] == gate
    always_vit = {"w_cnn": 0.7, "threshold": 1.0}
    _reconfigure(served, always_vit)
    body = post(served, data=png(seed=7)).json()
    assert body["models_used"] == ["cnn", "vit"] and body["gate"]["escalated"] is True
    assert body["refer"] is False and body["refer_reason"] is None  # no referral floor in the config's settings
    _reconfigure(served, {**always_vit, "refer_below": 1.0})  # nothing is that sure: every answer is referred
    body = post(served, data=png(seed=7)).json()
    assert body["refer"] is True and "below the referral floor 1.000" in body["refer_reason"]
    _reconfigure(served, {**always_vit, "temperatures": {"cnn": {"covid": 4.0}}})
    calibrated = post(served, data=png(seed=7), mode="cnn").json()
    explained = _explain_covid(served, calibrated)
    _reconfigure(served, always_vit)
    raw = post(served, data=png(seed=7), mode="cnn").json()
    softer = [max(answer["covid"]["probabilities"].values()) for answer in (calibrated, raw)]
    assert softer[0] < softer[1]  # T = 4 flattens the covid head's answer; the other heads keep theirs
    assert calibrated["nih14"]["probabilities"] == raw["nih14"]["probabilities"]
    # /v1/explain's probability is the calibrated answer's too
    assert explained == pytest.approx(max(calibrated["covid"]["probabilities"].values()), abs=1e-5)
    assert _explain_covid(served, raw) == pytest.approx(softer[1], abs=1e-5)
    assert replica_actors() == before  # same replicas (names carry replica ids), same actors


def test_overload_answers_503_fast(served):
    """A burst far past the router's max_ongoing + max_queued: the excess is shed at once with 503. Distinct
    images, so no admitted request is a result-cache hit: each one is model work."""
    images, start = [png(400, seed=100 + i) for i in range(48)], threading.Barrier(48)

    def one(index):
        start.wait()
        began = time.perf_counter()
        answer = post(served, data=images[index], mode="ensemble")
        return answer.status_code, time.perf_counter() - began

    with ThreadPoolExecutor(48) as pool:
        outcomes = list(pool.map(one, range(48)))
    statuses = [status for status, _ in outcomes]
    shed = sorted(seconds for status, seconds in outcomes if status == 503)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and len(shed) >= 48 - 4 * (4 + APP_ROUTER_QUEUE), statuses
    assert shed[len(shed) // 2] < 1.0, f"median 503 took {shed[len(shed) // 2]:.2f}s"
    assert post(served, data=png(seed=10), mode="cnn").status_code == 200  # and it recovers at once (a new image)


def test_killed_model_replica_is_restarted_and_requests_succeed_again(served):
    import ray

    cnn_name, cnn_actor = next((n, a) for n, a in replica_actors().items() if n.startswith("CNNModel"))
    pid = ray._private.state.actors(cnn_actor)["Pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at, statuses = time.monotonic(), []
    while True:
        answer = post(served, data=png(seed=9), mode="cnn", timeout=30)
        statuses.append(answer.status_code)
        if answer.status_code == 200:
            break
        assert time.monotonic() - killed_at < 120, f"no recovery within 120 s: {statuses}"
        time.sleep(0.5)
    recovered_s = time.monotonic() - killed_at
    assert answer.json()["cache"]["hit"] is False  # the new replica answered, not the result cache
    assert set(statuses) <= {200, 503}, statuses  # while it is down: 503 with a reason, never a crash
    assert cnn_name not in replica_actors()  # a new replica took its place
    print(f"recovered {recovered_s:.1f}s after SIGKILL; statuses while down: {statuses}")
