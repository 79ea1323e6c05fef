"""How much does the Vague sketch help or hurt? Attention-output error against the full cache, per layer.

On the embedded SmolLM2 and real prose, one layer at a time: the prompt's keys, values and cumulative scores go
through KVReviver's compress step at a budget; the last queries then attend over the revived K/V. The relative
error of that attention output against the full cache's is compared for:

* ``sum``: the paper's sketch (summed keys, signed values);
* ``mean``: buckets averaged (an option);
* ``signed-keys``: keys get the values' +-1 signs (an option);
* ``rows' mean``: the sketch rows averaged instead of their median (``combine="mean"``, the linear combine that the
  decode kernel attends without rebuilding tokens), with the paper's sum and with signed keys;
* ``evict-same-set``: the same exact set as ``sum`` with the Vague tokens masked out, which isolates the sketch;
* ``vague=0``: the ablation, the split (0, 0.5, 0.5), whose exact parts take the Vague share.

Usage: python benchmarks/bench_vague_probe.py [--tokens 2048] [--budget 0.1] [--layers 3,15,27] [--queries 64]
"""

from __future__ import annotations

import platform

import pydoc_data.topics
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvreviver_core import Budget, make_cache, models
from kvreviver_core.generation import cache_kwargs
from kvreviver_core.methods.reviver import ReviverLayer
from cli_args import BenchmarkParser, int_list


def capture(model, ids, layers):
    """Post-RoPE queries of the chosen layers, and the full cache's keys/values."""
    queries = {}

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        queries[module.layer_idx] = apply_rotary_pos_emb(q, k, cos, sin)[0]

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    cache = make_cache("full", 1.0, model=model)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    for handle in handles:
        handle.remove()
    return queries, {i: (cache.layers[i].keys, cache.layers[i].values) for i in layers}


def attend(q, k, v, key_mask=None):
    """Causal attention of the last ``q`` queries (they sit at the end of the sequence); GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n, t = k.shape[2], q.shape[2]
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.arange(n).view(1, -1) <= torch.arange(n - t, n).view(-1, 1)
    allowed = causal if key_mask is None else causal & key_mask.repeat_interleave(group, 0).unsqueeze(1)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v


def column_scores(q, k):
    """Cumulative softmax scores of every key over all (causal) queries, summed per KV group: (1, Hkv, N)."""
    group = q.shape[1] // k.shape[1]
    n = k.shape[2]
    probs = torch.softmax(
        (q @ k.repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(
            torch.arange(n).view(1, -1) > torch.arange(n).view(-1, 1), float("-inf")), -1)
    return probs.sum(2).view(1, k.shape[1], group, n).sum(2)


def compressed(k, v, scores, budget, estimator, signed_keys=False, combine="median"):
    layer = ReviverLayer(0, budget, estimator=estimator, signed_keys=signed_keys, combine=combine)
    layer.update(k, v)
    layer.observe(scores, torch.ones(1, k.shape[2], dtype=torch.bool))
    return layer


def main() -> None:
    parser = BenchmarkParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--layers", type=int_list, default="3,15,27")
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()
    layers = args.layers
    model, tokenizer = models.load_model(None, dtype="float32", device="cpu")
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    queries, kv = capture(model, ids, layers)
    print(f"device: CPU ({platform.processor() or platform.machine()}), SmolLM2-135M-Instruct fp32, "
          f"{ids.shape[1]} tokens of pydoc prose, budget {args.budget}, last {args.queries} queries")
    print("| layer | sum (paper) | mean | signed-keys | sum, rows' mean | signed-keys, rows' mean | evict-same-set | "
          "vague=0 ablation |")
    print("|---|---|---|---|---|---|---|---|")
    for i in layers:
        q, (k, v) = queries[i], kv[i]
        scores = column_scores(q, k)
        last = q[:, :, -args.queries:]
        reference = attend(last, k, v)
        error = lambda out: ((out - reference).norm() / reference.norm()).item()  # noqa: E731
        row = []
        for estimator in ("sum", "mean"):
            layer = compressed(k, v, scores, Budget(args.budget), estimator)
            row.append(error(attend(last, *layer.revive())))
            if estimator == "sum":
                same_set = error(attend(last, *layer.revive(), key_mask=layer.exact_map()[0]))
        signed = compressed(k, v, scores, Budget(args.budget), "sum", signed_keys=True)
        row.append(error(attend(last, *signed.revive())))
        for signed_keys in (False, True):
            linear = compressed(k, v, scores, Budget(args.budget), "sum", signed_keys=signed_keys, combine="mean")
            row.append(error(attend(last, *linear.revive())))
        row.append(same_set)
        ablation = compressed(k, v, scores, Budget(args.budget, split=(0.0, 0.5, 0.5)), "sum")
        row.append(error(attend(last, *ablation.revive(), key_mask=ablation.exact_map()[0])))
        print(f"| {i} | " + " | ".join(f"{x:.3f}" for x in row) + " |")


if __name__ == "__main__":
    main()
