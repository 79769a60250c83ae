"""`edge bias audit --repeat` speed: sequential Runtime.stream vs the batched sampler, one run.

1. The same N probes × (K sampled + 1 greedy) answers, sequentially (one sequence at a
   time through Runtime.stream, llama.cpp's sampler) and batched (bias.sampler: up to
   --n-seq sequences per llama_decode, each prompt decoded once for all its runs): wall
   and CPU seconds, answer tokens/s, the ratio, and how many greedy answers agree.
2. The batched sampler alone, continuous batching (a freed slot takes the next prompt's
   runs) vs waves (a new set of prompts only when the batch is empty): seconds, decodes,
   rows decoded, rows/s.

    python benchmarks/repeat_speed.py [--probes 30] [--repeat 3] [--threads 2] [--n-seq 32]
"""

from __future__ import annotations

import argparse
import os
import time

from bias.repeat import RepeatConfig, prompt_tokens, sample_suite, seeded_groups
from bias.sampler import BatchSampler, common_prefix
from bias.suites import load_suite
from edge.catalog import default_entry
from edge.runtime import Runtime, RuntimeConfig
from edge.sampling import Sampling


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-seq", type=int, default=32)
    ap.add_argument("--skip-waves", action="store_true")
    a = ap.parse_args()
    rt = Runtime(default_entry().local_path, RuntimeConfig(n_ctx=512, threads=a.threads))
    probes = load_suite("probes")
    step = max(1, len(probes.items) // a.probes)  # spread over the categories
    suite = probes.subset(list(range(0, len(probes.items), step))[: a.probes])
    cfg = RepeatConfig(repeat=a.repeat, temp=a.temp, n_seq=a.n_seq)
    print(f"threads {rt.threads}, load {os.getloadavg()[0]:.2f}; {len(suite.items)} probes × "
          f"({a.repeat} at T={a.temp} + greedy), max_tokens {cfg.max_tokens}, n_seq {a.n_seq}", flush=True)

    res = {}
    for name, batched in (("sequential", False), ("batched", True)):
        t0, c0 = time.perf_counter(), time.process_time()
        r = sample_suite(rt, suite, cfg, n_boot=10, batched=batched)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res[name] = (wall, cpu, r)
        e = r.overall["stereo_rate"]
        print(f"{name:10s}: {wall:7.1f} s wall, {cpu:7.1f} s CPU, {r.tokens_generated} answer tokens, "
              f"{r.tokens_generated / wall:6.1f} tokens/s; stereo_rate {e.value:.3f} "
              f"[{e.lo:.3f}, {e.hi:.3f}]", flush=True)
    (ws, cs, rs), (wb, cb, rb) = res["sequential"], res["batched"]
    same = sum(x["greedy"]["answer"] == y["greedy"]["answer"] for x, y in zip(rs.items, rb.items, strict=True))
    print(f"speed-up batched / sequential: {ws / wb:.2f}x wall, {cs / cb:.2f}x CPU "
          f"(tokens/s {rb.tokens_generated / wb / (rs.tokens_generated / ws):.2f}x); "
          f"greedy answers equal {same}/{len(suite.items)}", flush=True)

    if a.skip_waves:
        return
    prompts = [prompt_tokens(rt, it)[2] for it in suite.items]
    runs = [(k + 1, cfg.seed + k, cfg.temp) for k in range(cfg.repeat)] + [(0, cfg.seed, 0.0)]
    for name, refill in (("continuous", True), ("waves", False)):
        with BatchSampler(rt, n_seq=cfg.n_seq, max_tokens=cfg.max_tokens, max_prompt=max(map(len, prompts)),
                          prefix=common_prefix(prompts), group_size=len(runs)) as bs:
            t0, c0 = time.perf_counter(), time.process_time()
            bs.run(seeded_groups(suite, prompts, runs), Sampling(temp=cfg.temp), refill=refill)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            st = bs.stats
            print(f"{name:10s}: {wall:7.1f} s wall, {cpu:7.1f} s CPU, {st.decodes} decodes, {st.tokens_decoded} rows "
                  f"({st.prompt_tokens} prompt, head {st.shared_prefix} shared), "
                  f"{st.tokens_decoded / wall:.1f} rows/s, {st.answer_tokens / wall:.1f} answer tokens/s, "
                  f"{st.tokens_decoded / st.decodes:.1f} rows/decode, cache {bs.n_ctx} cells", flush=True)
    rt.close()


if __name__ == "__main__":
    main()
