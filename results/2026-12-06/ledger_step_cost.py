"""Cost of the relaxed gather's per-step bookkeeping (SyncLedger.deadline, first_arrival,
straggler_wait, stalled) with 3 workers and full sample windows. Run: .venv/bin/python results/2026-12-06/ledger_step_cost.py"""
import random, time
from mesh.halo_sync import SyncLedger
from mesh.scheduler import SyncPolicy
pol, L, t = SyncPolicy(), SyncLedger(), 0.0
random.seed(0)
for step in range(300):
    L.spread(step, 3)
    for w in ("pi2", "pi3", "pi4"):
        L.sent(w, step, t)
    for w in ("pi2", "pi3", "pi4"):
        L.arrived(w, step, t + random.uniform(0.001, 0.003), True)
        L.closed(w, True, step)
    t += 0.003
N = 2000
for name, f in [("deadline", lambda: L.deadline(pol)), ("first_arrival", L.first_arrival),
                ("straggler_wait", lambda: L.straggler_wait(pol, 0.005)),
                ("stalled", lambda: L.stalled(300, t, 0.005, pol.cut_overdue_factor))]:
    t0 = time.perf_counter()
    for _ in range(N):
        f()
    print(name, round((time.perf_counter() - t0) / N * 1e6, 1), "us per call")
