"""Real `mesh node` processes inside the testbed: link figures in heartbeats, and device profiles."""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import pytest

from mesh.config import BrokerAddress
from nodes.client import MeshClient
from nodes.testbed.bed import Testbed
from nodes.testbed.calibrate import (
    calibrate,
    calibration_dir,
    load_calibration,
    save_calibration,
)
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import TestbedSpec, make_spec
from tests.conftest import CACHE_ROOT, asker_keys, require_model

pytestmark = pytest.mark.testbed

CALIBRATION_DIR = calibration_dir(CACHE_ROOT)
FP32_GEMMA_NODE_CAP_MIB = 2048  # an explicit memory-cap override (see where it is used)


def _client(tb: Testbed) -> MeshClient:
    host, port = tb.broker_address
    return MeshClient(BrokerAddress(host, port), name=f"t-{tb.spec.instance}", keyring=asker_keys())


def test_a_lossy_node_reports_worse_link_figures_than_a_clean_one(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed], mosquitto_ok: None) -> None:
    require_model("smollm2-135m")
    tb = make_testbed(lambda i: make_spec(2, device_profile("pi5"), loss={"pi2": 5.0}, instance=i))
    tb.start_broker("mosquitto")
    tb.start_nodes("smollm2-135m", extra=["--link-ping", "0.05", "--heartbeat", "1"])
    with _client(tb) as client:
        deadline = time.monotonic() + 60
        while True:
            time.sleep(1.0)
            links = {v.name: v.heartbeat.get("link", {}) for v in client.nodes() if v.online}
            if all((links.get(n) or {}).get("resolved", 0) >= 200 for n in ("pi1", "pi2")) \
                    or time.monotonic() > deadline:
                break
    clean, lossy = links["pi1"], links["pi2"]
    bad = lambda f: (f["late_fraction"] or 0) + (f["loss_fraction"] or 0)  # noqa: E731
    assert clean["resolved"] >= 200 and lossy["resolved"] >= 200, links  # the window holds 200 pings
    # 5 % drop each way stalls ~10 % of round trips on TCP retransmission timers
    assert bad(lossy) >= 0.03 and bad(lossy) > 2 * bad(clean) + 0.01, (clean, lossy)
    # The late and lost counts are the figures loss moves reliably. The RTT p99 of 200 pings is not
    # compared: a dropped segment is often resent by TCP's tail-loss probe within ~2 RTT (a short stall,
    # counted late), so the lossy tail can sit below a clean node's CPU hiccup on a loaded machine (two CI
    # runs: lossy p99 57.7 ms vs clean 64.3; lossy 53.6 ms with 23 late vs clean 67.8 ms with 6 late).
    assert lossy["late"] + lossy["lost"] > clean["late"] + clean["lost"], (clean, lossy)
    # the bandwidth probe crossed a 27 Mbit/s link each way
    assert clean["bw_ewma_mbit"] is not None and 10 < clean["bw_ewma_mbit"] < 30, clean


def _calibration():  # type: ignore[no-untyped-def]
    cal = load_calibration(CALIBRATION_DIR, "pi-zero-2w")
    if cal is None:  # a fresh machine: measure it once (about two minutes), as `mesh testbed calibrate` does
        cal = calibrate(profile="pi-zero-2w", model="gemma3-270m", tokens=65,
                        date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        save_calibration(CALIBRATION_DIR, cal)
    return cal


def test_a_pi_zero_node_prefills_slower_by_the_calibrated_ratio(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed], mosquitto_ok: None) -> None:
    require_model("gemma3-270m")
    cal = _calibration()
    # Override: an fp32 Gemma node (~1.7 GiB RSS) is OOM-killed under the Pi Zero's 400 MiB until lighter weights land.
    tb = make_testbed(lambda i: make_spec(2, device_profile("pi-zero-2w", cal), link_mbit=100, instance=i,
                                          mem_cap_mib=FP32_GEMMA_NODE_CAP_MIB))
    tb.start_broker("mosquitto")
    # quiet housekeeping: link pings and heartbeats also spend the quota (see the closing note)
    tb.start_nodes("gemma3-270m", extra=["--threads", "1", "--link-ping", "5", "--heartbeat", "5"])
    tb.set_cpu("pi1", None)  # pi1 runs native, pi2 keeps the calibrated quota
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(require_model("gemma3-270m"))
    words = ("the mesh shares prompt state between small devices over a lossy link " * 12).split()
    prompt = " ".join(words[:60])
    while len(tok(prompt)["input_ids"]) > 65:
        prompt = prompt.rsplit(" ", 1)[0]
    times: dict[str, list[float]] = {"pi1": [], "pi2": []}
    with _client(tb) as client:
        for node, repeats in (("pi1", 3), ("pi2", 3)):
            for _ in range(repeats):
                # 300 s: the same quota'd prefill took 12-71 s within 15 minutes on this VM
                r = client.ask(prompt, node=node, max_new_tokens=1, no_cache=True, timeout=300)
                times[node].append(float(r.node_figures["prefill_s"]))
    # The quota'd node's fastest run: a busy host stretches a throttled process's slices (the same
    # 65-token prefill at the same quota took 12-15 s, then 31-71 s during a 15-minute episode,
    # while unthrottled runs stayed at 0.22-0.26 s; 2026-12-06), which only ever adds time.
    native, zero = statistics.median(times["pi1"]), min(times["pi2"])
    calibrated = cal.measured_s / cal.native_s
    assert 8 < zero < 25, times  # the paper's Pi Zero 2W prompt decode: 12.58 s
    assert 0.6 * calibrated < zero / native < 1.7 * calibrated, (times, calibrated)
