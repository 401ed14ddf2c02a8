"""The testbed plan: names, addresses, profiles, steps, cleanup matching, state, calibration."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import pytest

from mesh.errors import ConfigError
from nodes.testbed.plan import (
    Found,
    MakeDir,
    RemoveDir,
    Run,
    WriteFile,
    broker_argv,
    loss_rules,
    mosquitto_conf,
    node_argv,
    owned,
    owned_objects,
    plan_cleanup,
    plan_set_cpu,
    plan_set_loss,
    plan_set_mem,
    plan_set_rate,
    plan_unthrottle,
    plan_up,
    spawn_argv,
    tbf_args,
)
from nodes.testbed.profiles import (
    PI4_VS_PI_ZERO_CPU,
    PI5_LINK_MBIT,
    PI_ZERO_LINK_MBIT,
    PROFILE_NAMES,
    UNCALIBRATED_PI_ZERO_QUOTA,
    Calibration,
    CpuQuota,
    Trial,
    calibrated_from,
    calibrations_from_json,
    calibrations_to_json,
    closest_trial,
    device_profile,
    next_quota,
)
from nodes.testbed.record import ProcessRecord, TestbedState
from nodes.testbed.spec import (
    NodeSpec,
    TestbedSpec,
    check_node_name,
    layout,
    make_spec,
    parse_loss,
)


def spec3(instance: int = 4) -> TestbedSpec:
    return make_spec(3, device_profile("pi-zero-2w"), loss={"pi2": 5}, instance=instance)


def runs(steps: list) -> list[tuple[str, ...]]:
    return [s.argv for s in steps if isinstance(s, Run)]


# ---------------------------------------------------------------- names, profiles, spec


def test_layout_names_and_addresses() -> None:
    lay = layout(spec3())
    assert lay.gw_netns == "mt-4-gw" and lay.gw_address == "10.213.4.2"
    assert lay.host_link == "mt-4-host" and lay.host_address == "10.213.4.1"
    assert [n.netns for n in lay.nodes] == ["mt-4-pi1", "mt-4-pi2", "mt-4-pi3"]
    assert [n.address for n in lay.nodes] == ["10.213.4.10", "10.213.4.11", "10.213.4.12"]
    assert [n.cgroup for n in lay.nodes] == ["mesh-tb-4-pi1", "mesh-tb-4-pi2", "mesh-tb-4-pi3"]
    assert lay.broker_host == "10.213.4.2" and lay.broker_port == 1883
    # every interface name fits Linux's 15 characters, even for the longest names
    long = layout(make_spec(1, device_profile("native"), instance=98, prefix="abcdefghijk"))
    assert len(long.host_link) <= 15 and all(len(n.gw_if) <= 15 for n in long.nodes)


def test_profiles() -> None:
    assert device_profile("native") == device_profile("native")
    assert device_profile("native").link_mbit is None and device_profile("native").cpu is None
    assert device_profile("pi5").link_mbit == PI5_LINK_MBIT and device_profile("pi5").cpu is None
    uncal = device_profile("pi-zero-2w")
    assert uncal.link_mbit == PI_ZERO_LINK_MBIT and uncal.cpu == UNCALIBRATED_PI_ZERO_QUOTA
    assert not uncal.calibrated
    cal = device_profile("pi-zero-2w", _calibration())
    assert cal.calibrated and cal.cpu == CpuQuota(1_000_000, 18_800)
    with pytest.raises(ConfigError):
        device_profile("pi4")


def test_every_device_profile_states_its_ram_and_caps_the_node_below_it() -> None:
    caps = {p: (device_profile(p).mem_cap_mib, device_profile(p).ram_mib) for p in PROFILE_NAMES}
    assert caps == {"native": (None, None), "pi5": (3072, 4096), "pi4-2gb": (1536, 2048),
                    "pi-zero-2w": (400, 512)}


def test_pi4_quota_is_the_pi_zero_calibration_times_the_published_per_core_ratio() -> None:
    # sysbench single thread: Pi 4 (A72, 1.5 GHz) 1477.83, Pi 3B+ (A53, 1.4 GHz) 687.45 events/s
    assert PI4_VS_PI_ZERO_CPU == pytest.approx(1477.83 / (687.45 / 1.4))
    assert 2.9 < PI4_VS_PI_ZERO_CPU < 3.1
    pi4 = device_profile("pi4-2gb", _calibration())
    assert pi4.calibrated and pi4.cpu == CpuQuota(1_000_000, round(18_800 * PI4_VS_PI_ZERO_CPU / 100) * 100)
    assert not device_profile("pi4-2gb").calibrated  # derived from the uncalibrated first guess
    assert calibrated_from("pi4-2gb") == calibrated_from("pi-zero-2w") == "pi-zero-2w"
    assert calibrated_from("pi5") is None
    with pytest.raises(ConfigError, match="pi-zero-2w"):
        device_profile("pi4-2gb", dataclasses.replace(_calibration(), profile="pi5"))


def test_a_memory_cap_override_is_explicit_and_recorded_beside_the_profile_cap() -> None:
    spec = make_spec(2, device_profile("pi-zero-2w"), instance=3)
    assert [n.mem_cap_mib for n in spec.nodes] == [400, 400]
    over = make_spec(2, device_profile("pi-zero-2w"), instance=3, mem_cap_mib=2048)
    assert [n.mem_cap_mib for n in over.nodes] == [2048, 2048]
    st = TestbedState(instance=3, created_at="2026-01-01T00:00:00+00:00", owner_pid=1, detached=False, spec=over)
    node = json.loads(st.to_json())["spec"]["nodes"][0]
    assert (node["mem_cap_mib"], node["profile_mem_cap_mib"]) == (2048, 400)
    assert TestbedState.from_json(st.to_json()).spec == over
    with pytest.raises(ConfigError):
        make_spec(1, device_profile("pi5"), mem_cap_mib=8)


def test_make_spec_applies_profile_overrides_and_loss() -> None:
    spec = make_spec(2, device_profile("pi5"), link_mbit=10, loss={"pi2": 1.5}, instance=3)
    assert spec.names == ("pi1", "pi2")
    assert [n.link_mbit for n in spec.nodes] == [10, 10]
    assert [n.loss_pct for n in spec.nodes] == [0.0, 1.5]
    with pytest.raises(ConfigError, match="unknown nodes"):
        make_spec(2, device_profile("pi5"), loss={"pi9": 1})


@pytest.mark.parametrize("bad", ["", "Pi1", "1pi", "pi-1", "gw", "host", "abcdefghijklm"])
def test_bad_node_names(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_node_name(bad)


def test_spec_validation() -> None:
    ok = NodeSpec(name=check_node_name("a"), link_mbit=None, loss_pct=0, cpu=None)
    with pytest.raises(ConfigError):
        TestbedSpec(nodes=(ok, ok))
    with pytest.raises(ConfigError):
        TestbedSpec(nodes=(ok,), instance=100)
    with pytest.raises(ConfigError):
        TestbedSpec(nodes=())
    with pytest.raises(ConfigError):
        NodeSpec(name=check_node_name("a"), link_mbit=None, loss_pct=100, cpu=None)
    with pytest.raises(ConfigError):
        CpuQuota(period_us=1_000_000, quota_us=500)
    assert CpuQuota(1_000_000, 20_000).share == pytest.approx(0.02)


def test_parse_loss() -> None:
    assert parse_loss(["pi2=5", "pi3=0.5"]) == {"pi2": 5.0, "pi3": 0.5}
    for bad in (["pi2"], ["pi2=x"], ["pi2=100"], ["GW=1"]):
        with pytest.raises(ConfigError):
            parse_loss(bad)


# ---------------------------------------------------------------- steps


def test_plan_up_shapes_both_directions_and_drops_inside_the_node_namespace() -> None:
    lay = layout(spec3())
    steps = plan_up(lay)
    argvs = runs(steps)
    for n in lay.nodes:
        uplink = ("tc", "-n", n.netns, "qdisc", "replace", "dev", "eth0", "root") + tbf_args(21.0)
        downlink = ("tc", "-n", lay.gw_netns, "qdisc", "replace", "dev", n.gw_if, "root") + tbf_args(21.0)
        assert uplink in argvs and downlink in argvs
    # iptables only ever runs inside one of our namespaces, never in the root one
    for argv in argvs:
        if any(a.startswith("iptables") for a in argv):
            assert argv[:3] == ("ip", "netns", "exec") and argv[3].startswith("mt-4-"), argv
    loss = [s for s in steps if isinstance(s, Run) and s.argv[:4] == ("ip", "netns", "exec", "mt-4-pi2")
            and s.argv[4:] == ("iptables-restore", "--noflush")]
    assert loss and "--probability 0.050000 -j DROP" in loss[0].stdin
    # a CPU quota per node, none for the gateway
    writes = {s.path: s.text for s in steps if isinstance(s, WriteFile)}
    assert writes["/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cpu.cfs_quota_us"] == str(UNCALIBRATED_PI_ZERO_QUOTA.quota_us)
    assert writes["/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cpu.cfs_period_us"] == "1000000"
    assert writes["/sys/fs/cgroup/cpu/mesh-tb-4-gw/cpu.cfs_quota_us"] == "-1"
    assert MakeDir("/sys/fs/cgroup/cpu/mesh-tb-4-gw") in steps
    # a memory cgroup per node at the profile's cap with swap off (memsw = memory); gateway uncapped
    mem = "/sys/fs/cgroup/memory/mesh-tb-4-pi1"
    i = steps.index(MakeDir(mem))
    assert steps[i + 1:i + 4] == [WriteFile(f"{mem}/memory.memsw.limit_in_bytes", "-1"),
                                  WriteFile(f"{mem}/memory.limit_in_bytes", str(400 << 20)),
                                  WriteFile(f"{mem}/memory.memsw.limit_in_bytes", str(400 << 20))]
    assert writes["/sys/fs/cgroup/memory/mesh-tb-4-gw/memory.limit_in_bytes"] == "-1"
    # every object named in the root namespace carries the instance prefix
    for argv in argvs:
        if argv[:3] == ("ip", "link", "add"):
            assert argv[3] == "mt-4-host"


def test_plan_up_without_shaping_or_loss() -> None:
    lay = layout(make_spec(1, device_profile("native"), instance=1))
    argvs = runs(plan_up(lay))
    assert not any("tbf" in a for a in argvs)
    assert ("tc", "-n", "mt-1-pi1", "qdisc", "del", "dev", "eth0", "root") in argvs  # no-op, unchecked


def test_tbf_args() -> None:
    assert tbf_args(21) == ("tbf", "rate", "21mbit", "burst", "16384", "latency", "50ms")
    assert tbf_args(1000)[4] == str(int(1000e6 / 8 * 0.004))  # 4 ms worth at high rates


def test_loss_rules_and_live_changes() -> None:
    assert loss_rules(0) == "*filter\n:mesh-loss - [0:0]\nCOMMIT\n"
    assert "--probability 0.100000" in loss_rules(10)
    lay = layout(spec3())
    [step] = plan_set_loss(lay, "pi3", 2)
    assert step.argv == ("ip", "netns", "exec", "mt-4-pi3", "iptables-restore", "--noflush")
    assert "--probability 0.020000" in step.stdin
    rate = runs(plan_set_rate(lay, "pi1", 5))
    assert rate[0][:2] == ("tc", "-n") and rate[0][2] == "mt-4-pi1" and "5mbit" in rate[0]
    assert rate[1][2] == "mt-4-gw" and "v-pi1" in rate[1]
    with pytest.raises(ConfigError):
        plan_set_loss(lay, "nope", 1)


def test_plan_set_cpu_changes_quota_without_creating() -> None:
    lay = layout(spec3())
    steps = plan_set_cpu(lay, "pi1", CpuQuota(100_000, 25_000))
    assert steps == [
        WriteFile("/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cpu.cfs_quota_us", "-1"),
        WriteFile("/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cpu.cfs_period_us", "100000"),
        WriteFile("/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cpu.cfs_quota_us", "25000"),
    ]
    assert plan_set_cpu(lay, "gw", None)[-1] == WriteFile("/sys/fs/cgroup/cpu/mesh-tb-4-gw/cpu.cfs_quota_us", "-1")


def test_plan_set_mem_lifts_swap_first_so_any_change_is_valid() -> None:
    lay = layout(spec3())
    mem = "/sys/fs/cgroup/memory/mesh-tb-4-pi2"
    assert plan_set_mem(lay, "pi2", 64) == [WriteFile(f"{mem}/memory.memsw.limit_in_bytes", "-1"),
                                            WriteFile(f"{mem}/memory.limit_in_bytes", str(64 << 20)),
                                            WriteFile(f"{mem}/memory.memsw.limit_in_bytes", str(64 << 20))]
    assert plan_set_mem(lay, "gw", None)[1] == WriteFile(
        "/sys/fs/cgroup/memory/mesh-tb-4-gw/memory.limit_in_bytes", "-1")


def test_spawn_argv_joins_both_cgroups_before_the_namespace() -> None:
    argv = spawn_argv("mesh-tb-4-pi1", "mt-4-pi1", ["python", "-m", "x"])
    assert argv[:3] == ("sh", "-c", 'echo $$ > "$0" && echo $$ > "$1" && shift && exec "$@"')
    assert argv[3] == "/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cgroup.procs"
    assert argv[4] == "/sys/fs/cgroup/memory/mesh-tb-4-pi1/cgroup.procs"
    # only the network namespace: the process keeps the mount namespace, and so /sys/fs/cgroup
    assert argv[5:] == ("nsenter", "--net=/run/netns/mt-4-pi1", "--", "python", "-m", "x")
    assert spawn_argv("g", None, ["true"])[5:] == ("true",)
    with pytest.raises(ConfigError):
        spawn_argv("g", None, [])


# ---------------------------------------------------------------- cleanup matching


def test_owned_matches_only_our_names_and_instance() -> None:
    found = Found(
        netns=("mt-4-gw", "mt-4-pi1", "mt-40-pi1", "mt-x-pi1", "mt-4", "other", "mt-4-pi1.bak"),
        links=("eth0", "lo", "mt-4-host", "mt-44-host", "docker0", "mt-host"),
        cgroups=("mesh-tb-4-gw", "mesh-tb-4-pi1", "mesh-tb-cal-123", "mesh-tbx-4-a", "system.slice", "mesh-tb-41-a"),
    )
    mine = owned(found, 4)
    assert mine == Found(netns=("mt-4-gw", "mt-4-pi1"), links=("mt-4-host",), cgroups=("mesh-tb-4-gw", "mesh-tb-4-pi1"))
    every = owned(found, None)
    assert every.netns == ("mt-4-gw", "mt-4-pi1", "mt-40-pi1")
    assert every.links == ("mt-4-host", "mt-44-host")
    assert every.cgroups == ("mesh-tb-4-gw", "mesh-tb-4-pi1", "mesh-tb-41-a", "mesh-tb-cal-123")


def test_plan_cleanup_is_tolerant_and_covers_owned_objects() -> None:
    lay = layout(spec3())
    objs = owned_objects(lay)
    assert owned(objs, 4) == Found(tuple(sorted(objs.netns)), objs.links, tuple(sorted(objs.cgroups)))
    steps = plan_cleanup(owned(objs, 4))
    assert all(s.check is False for s in steps if isinstance(s, Run))
    assert Run(("ip", "netns", "del", "mt-4-gw"), check=False) in steps
    assert Run(("ip", "link", "del", "mt-4-host"), check=False) in steps
    assert RemoveDir("/sys/fs/cgroup/cpu/mesh-tb-4-pi3") in steps
    assert RemoveDir("/sys/fs/cgroup/memory/mesh-tb-4-pi3") in steps
    assert plan_cleanup(Found()) == []
    assert plan_unthrottle(Found(cgroups=("mesh-tb-4-pi1",))) == [
        WriteFile("/sys/fs/cgroup/cpu/mesh-tb-4-pi1/cpu.cfs_quota_us", "-1")]


# ---------------------------------------------------------------- processes


def test_broker_and_node_argv_follow_the_process_contract() -> None:
    assert broker_argv("amqtt", "/py", "10.213.0.2", 1883, "/c") == (
        "/py", "-m", "nodes.cli", "broker", "--host", "10.213.0.2", "--port", "1883")
    assert broker_argv("mosquitto", "/py", "h", 1, "/run/c.conf") == ("mosquitto", "-c", "/run/c.conf")
    with pytest.raises(ConfigError):
        broker_argv("emqx", "/py", "h", 1, "/c")
    assert node_argv("/py", "pi1", "10.213.0.2:1883", "gemma3-270m") == (
        "/py", "-m", "nodes.cli", "node", "--name", "pi1", "--broker", "10.213.0.2:1883", "--model", "gemma3-270m")
    conf = mosquitto_conf("10.213.0.2", 1883)
    assert "listener 1883 10.213.0.2\n" in conf and "set_tcp_nodelay true\n" in conf
    assert "allow_anonymous true\n" in conf


# ---------------------------------------------------------------- state


def test_state_round_trip_and_lists_what_was_created() -> None:
    spec = spec3()
    st = TestbedState(
        instance=4, created_at="2026-01-01T00:00:00+00:00", owner_pid=42, detached=True, spec=spec,
        broker={"kind": "mosquitto", "host": "10.213.4.2", "port": 1883},
        processes=(ProcessRecord("node", "pi1", 77, ("python", "-m", "nodes.cli"), "/run/x.log"),),
        calibration=_calibration().to_dict(),
    )
    text = st.to_json()
    assert TestbedState.from_json(text) == st
    doc = json.loads(text)
    assert doc["version"] == 1
    assert doc["objects"]["netns"] == ["mt-4-gw", "mt-4-pi1", "mt-4-pi2", "mt-4-pi3"]
    assert doc["objects"]["links"] == ["mt-4-host"]
    assert doc["addresses"]["pi2"] == "10.213.4.11"
    for bad in ("{", '{"version": 2}', '{"version": 1}'):
        with pytest.raises(ConfigError):
            TestbedState.from_json(bad)


# ---------------------------------------------------------------- calibration


def _calibration() -> Calibration:
    return Calibration(
        profile="pi-zero-2w", model="gemma3-270m", tokens=65, threads=1, period_us=1_000_000, quota_us=18_800,
        target_s=12.6, measured_s=13.01, samples=(12.9, 13.01, 13.99), native_s=0.27, date="2026-01-01",
        machine={"cpu": "x"}, trials=(Trial(18_800, (12.9, 13.01, 13.99)),), native_cpu_s=0.237,
    )


def test_calibration_file_round_trip() -> None:
    cal = _calibration()
    assert calibrations_from_json(calibrations_to_json({"pi-zero-2w": cal})) == {"pi-zero-2w": cal}
    assert cal.quota == CpuQuota(1_000_000, 18_800)
    assert cal.slowdown == pytest.approx(13.01 / 0.27)
    for bad in ("nope", '{"version": 9, "profiles": {}}', '{"version": 1}',
                '{"version": 1, "profiles": {"x": {"profile": "x"}}}'):
        with pytest.raises(ConfigError):
            calibrations_from_json(bad)


def _search(time_of: Callable[[int], float], target: float, native: float, period: int = 1_000_000, limit: int = 12) -> list[Trial]:
    trials: list[Trial] = []
    for _ in range(limit):
        q = next_quota(trials, target_s=target, period_us=period, native_s=native)
        if q is None:
            break
        trials.append(Trial(q, (time_of(q),)))
    return trials


@pytest.mark.parametrize("exponent", [1.0, 1.3, 0.8])
def test_next_quota_converges_on_a_non_linear_response(exponent: float) -> None:
    native, period, target = 0.24, 1_000_000, 12.6

    def time_of(q: int) -> float:  # time ~ share^-exponent, 1/share when exponent is 1
        return native * (period / q) ** exponent

    trials = _search(time_of, target, native)
    best = closest_trial(trials, target)
    assert abs(best.median - target) <= 0.05 * target or len(trials) >= 2
    assert abs(best.median - target) <= 0.10 * target
    assert len(trials) <= 6


def test_next_quota_first_guess_and_stops() -> None:
    assert next_quota([], target_s=12.6, period_us=1_000_000, native_s=0.252) == 20_000
    assert next_quota([Trial(20_000, (12.7,))], target_s=12.6, period_us=1_000_000, native_s=0.25) is None
    # a bracket that cannot shrink below one step stops the search
    stuck = [Trial(20_000, (14.0,)), Trial(20_100, (11.0,))]
    assert next_quota(stuck, target_s=12.6, period_us=1_000_000, native_s=0.25) is None
    # inconsistent noise (bigger quota slower) stops too instead of oscillating
    noisy = [Trial(30_000, (14.0,)), Trial(20_000, (11.0,))]
    assert next_quota(noisy, target_s=12.6, period_us=1_000_000, native_s=0.25) is None
    # never below the kernel minimum nor above the period
    assert next_quota([], target_s=1000.0, period_us=100_000, native_s=0.001) == 1_000
    assert next_quota([], target_s=0.01, period_us=100_000, native_s=1.0) == 100_000


def test_next_quota_one_sided_steps_are_bounded() -> None:
    slow = [Trial(10_000, (1000.0,))]  # hugely too slow: at most 4x more quota
    assert next_quota(slow, target_s=10.0, period_us=1_000_000, native_s=0.2) == 40_000
    fast = [Trial(40_000, (10.5,))]  # a bit too fast: at least 1.1x less
    q = next_quota(fast, target_s=12.6, period_us=1_000_000, native_s=0.2)
    assert q is not None and q <= 40_000 / 1.1 and math.isclose(q, 33_300, abs_tol=100)


def test_private_homes_are_found_by_instance_and_nothing_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nodes.testbed.state import private_homes

    root = tmp_path / "testbed" / "nodes"
    for name in ("9-pi1", "96-pi1", "96-pi2", "x-pi1"):
        (root / name).mkdir(parents=True)
    (root / "9-file").write_text("not a copy")
    assert [p.name for p in private_homes(tmp_path, 96)] == ["96-pi1", "96-pi2"]
    assert [p.name for p in private_homes(tmp_path, 9)] == ["9-pi1"]
    assert [p.name for p in private_homes(tmp_path, None)] == ["9-pi1", "96-pi1", "96-pi2"]
    assert private_homes(tmp_path / "nowhere", None) == []
