"""Decoding speed and state size: HOPE's recurrent state against Transformer++'s KV cache.

    python bench/decode.py             # contexts 1K, 4K, 16K (a few minutes on 2 cores)
    python bench/decode.py --quick     # smoke run (contexts 64, 128)

For ``hope-tiny`` and ``transformer-tiny`` (d_model 128, 2 layers, float32, batch 1, the torch
memory path, ``max_seq_len`` raised so that Transformer++ may attend over the longest context), at
each context length: prefill a random prompt of that many tokens through
:class:`nl_pretrain.infer.Session` (chunk-parallel), then decode tokens one at a time with
``Session.step``. Decoding tokens/s is the fastest of the timed repetitions (each ``--steps``
tokens, after warm-up; on a shared machine other processes only slow a repetition down); the
state bytes per sequence are ``DecodeState.nbytes_per_sequence()`` after the prefill (HOPE: fast
weights, momenta, convolution inputs and the pending partial chunk; Transformer++: the keys and
values of every token). Ratios are HOPE / Transformer++ in the same run. Prints a table and writes
bench/results/decode.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import load_average, machine, write_json  # noqa: E402
from nl_pretrain.config import build_config  # noqa: E402
from nl_pretrain.infer.session import Session  # noqa: E402
from nl_pretrain.infer.tokenizer import load_tokenizer_path  # noqa: E402
from nl_pretrain.model import LanguageModel  # noqa: E402

FULL = dict(contexts=(1024, 4096, 16384), steps=32, reps=3, warmup=4)
QUICK = dict(contexts=(64, 128), steps=8, reps=2, warmup=2)
PRESETS = ("hope-tiny", "transformer-tiny")


def session(preset: str, longest: int) -> Session:
    cfg = build_config({"model": {"preset": preset, "memory_impl": "torch", "max_seq_len": longest + 1024},
                        "data": {"seq_len": 256}})
    torch.manual_seed(0)
    return Session(LanguageModel(cfg.model).eval(), cfg, load_tokenizer_path("bytes"))


def measure(s: Session, context: int, steps: int, reps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(3, 259, (1, context), generator=g)
    t0 = time.perf_counter()
    logits, state = s.prefill(ids)
    prefill_s = time.perf_counter() - t0
    nbytes = state.nbytes_per_sequence()
    tok = logits[:, -1].argmax(-1)
    for _ in range(warmup):
        logits, state = s.step(tok, state)
        tok = logits.argmax(-1)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = s.step(tok, state)
            tok = logits.argmax(-1)
        times.append(time.perf_counter() - t0)
    return {"context": context, "prefill_s": round(prefill_s, 3), "prefill_tokens_per_s": round(context / prefill_s, 1),
            "decode_tokens_per_s": round(steps / min(times), 2), "decode_tokens_per_s_median":
            round(steps / sorted(times)[len(times) // 2], 2), "state_bytes_per_sequence": nbytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    load_before = load_average()
    rows = {}
    for preset in PRESETS:
        s = session(preset, max(plan["contexts"]))
        rows[preset] = [measure(s, c, plan["steps"], plan["reps"], plan["warmup"]) for c in plan["contexts"]]
    ratios = []
    for h, t in zip(rows["hope-tiny"], rows["transformer-tiny"]):
        ratios.append({"context": h["context"],
                       "decode_tokens_per_s": round(h["decode_tokens_per_s"] / t["decode_tokens_per_s"], 3),
                       "state_bytes": round(h["state_bytes_per_sequence"] / t["state_bytes_per_sequence"], 4)})
    print(f"{'model':18s} {'context':>8s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'state bytes/seq':>16s}")
    for preset, rs in rows.items():
        for r in rs:
            print(f"{preset:18s} {r['context']:8d} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.2f} "
                  f"{r['state_bytes_per_sequence']:16,d}")
    for r in ratios:
        print(f"HOPE / Transformer++ at {r['context']:6d}: decode tokens/s x{r['decode_tokens_per_s']:.3f}, "
              f"state bytes x{r['state_bytes']:.4f}")
    result = {"what": "decoding tokens/s and state bytes per sequence, hope-tiny vs transformer-tiny (KV cache), "
                      "float32, batch 1, CPU", "quick": args.quick, "plan": plan,
              "machine": machine(torch.get_num_threads()),
              "load_before": load_before, "load_after": load_average(), "results": rows, "ratios": ratios}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
