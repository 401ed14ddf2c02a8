"""How much importance the coldest 20 % of a layer's 64-neuron groups hold on held-out Wikipedia text: contiguous groups (as placed today) vs groups of neurons sorted by mean importance on 2,048 training tokens (data) or by a weight-norm proxy (no data). Run: .venv/bin/python results/2026-12-05/halo_group_importance.py"""
import torch, itertools
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from mesh import split
torch.set_num_threads(2)
path = Path.home() / '.cache/mesh/models/smollm2-135m'
m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(str(path))
text = (Path.home() / '.cache/mesh/data/wiki-0.3.2/wiki.utf8').read_text(errors='ignore')
ids = tok(text[:200000])['input_ids']
train, held = ids[:2048], ids[100000 // 4: 100000 // 4 + 1024]
layout = split.model_layout(m.config, 64)
layers = split.decoder_layers(m)
inputs = {}
def hook(i):
    def f(mod, args):
        inputs.setdefault(i, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
    return f
hs = [l.mlp.register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
def run(seq):
    inputs.clear()
    with torch.inference_mode():
        for k in range(0, len(seq), 512):
            m(torch.tensor([seq[k:k + 512]]))
    return {i: torch.cat(v) for i, v in inputs.items()}
xt = run(train); xh = run(held)
for h in hs: h.remove()
act = split.mlp_act_name(m.config)
res = {'contiguous': [], 'sorted': [], 'weight-proxy': []}
cold = round(0.2 * layout.n_groups)
for i, l in enumerate(layers):
    full = split.full_weights(l.mlp, layout, act, i)
    with torch.inference_mode():
        a = full.activations(xt[i])  # (N, I)
        neuron = (a.abs() * full.down.norm(dim=0)).mean(0)  # mean |contribution| per neuron
    for name in res:
        if name == 'contiguous':
            w = full
        else:
            perm = torch.argsort(neuron if name == 'sorted' else
                                 full.down.norm(dim=0) * full.up.norm(dim=1) * full.gate.norm(dim=1))
            w = split.GroupWeights(layer=i, groups=full.groups, sizes=full.sizes, act=act, gate=full.gate[perm],
                                   up=full.up[perm], down=full.down[:, perm])
        with torch.inference_mode():
            gram = split.importance_gram(w)
            it = split.group_importance(w, xt[i], gram).reshape(-1, layout.n_groups)
            ih = split.group_importance(w, xh[i], gram).reshape(-1, layout.n_groups)
        coldest = torch.argsort(it.mean(0))[:cold]
        share = (ih[:, coldest].sum(1) / ih.sum(1)).mean().item()
        res[name].append(share)
for name, v in res.items():
    print(name, 'coldest', cold, 'of', layout.n_groups, 'groups hold on held-out text: mean share', round(sum(v) / len(v), 4),
          'min', round(min(v), 4), 'max', round(max(v), 4))
