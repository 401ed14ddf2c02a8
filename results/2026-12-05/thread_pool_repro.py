"""One-token HALO partials (8 groups x 30 layers) in a new thread after torch.set_num_threads(1) in main: unbound (nofix) vs bound (fix). Run: .venv/bin/python results/2026-12-05/thread_pool_repro.py nofix|fix"""
import time, torch, sys, threading, os
from mesh import split
from transformers import AutoModelForCausalLM
from pathlib import Path
torch.set_num_threads(1)
m = AutoModelForCausalLM.from_pretrained(str(Path.home()/'.cache/mesh/models/smollm2-135m'), dtype=torch.float32).eval()
layout = split.model_layout(m.config, 64)
ws = [split.extract_groups(m, l, list(range(8)), layout) for l in range(30)]
x = torch.randn(1,1,m.config.hidden_size)
def run():
  if sys.argv[1]=='fix': torch.set_num_threads(1)
  ts=[]
  with torch.inference_mode():
    for r in range(100):
      for w in ws:
        t0=time.perf_counter(); w.partial(x); ts.append(time.perf_counter()-t0)
      time.sleep(0.002)
  ts.sort(); print(sys.argv[1], 'median ms', round(ts[len(ts)//2]*1000,3), 'p90', round(ts[int(len(ts)*.9)]*1000,3), 'threads', len(os.listdir('/proc/self/task')))
t=threading.Thread(target=run); t.start(); t.join()
