"""The feedback loop on the bundled model, judged on held-out CrowS-Pairs rows.

Prints the loop's iterations, then the held-out before/after with paired-bootstrap CIs,
PPL on neutral text, BBQ disambiguated accuracy, the excluded category and the probe
suite; compare with the issue's naive frontier (uniform 0.2: −52% at +4.2% PPL).

    python benchmarks/mitigation.py [--threads 1] [--out /tmp/mitigation] [--calib-frac 0.3]
        [--precision auto|file|f16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bias.feedback import LoopConfig
from bias.mitigate import mitigate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="/tmp/mitigation")
    ap.add_argument("--direction-pairs", type=int, default=64)
    ap.add_argument("--calib-limit", type=int, default=200)
    ap.add_argument("--heldout-limit", type=int, default=400)
    ap.add_argument("--bbq-limit", type=int, default=60)
    ap.add_argument("--max-iter", type=int, default=6)
    ap.add_argument("--calib-frac", type=float, default=0.3)
    ap.add_argument("--precision", default="auto", choices=["auto", "file", "f16"])
    a = ap.parse_args()
    out = Path(a.out)
    r = mitigate(None, f"crows_pairs:{DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}",
                 str(out / "fair.gguf"),
                 cfg=LoopConfig(max_iter=a.max_iter, exclude_category="disability",
                                calib_frac=a.calib_frac),
                 n_direction_pairs=a.direction_pairs, calib_limit=a.calib_limit,
                 heldout_limit=a.heldout_limit, bbq_spec=f"bbq:{DATA / 'bbq'}", bbq_limit=a.bbq_limit,
                 second_suite="probes", out_dir=str(out), threads=a.threads,
                 precision=a.precision,
                 on_event=lambda kind, d: print(kind, json.dumps(d), flush=True))
    print((out / "report.md").read_text())
    dis = r.heldout_per_category.get("disability")
    if dis:
        d = dis.to_dict()
        print("excluded category disability:", json.dumps(d["before"]), "→", json.dumps(d["after"]))
    if r.second_suite:
        print("probes before:", json.dumps(r.second_suite["before"]))
        print("probes after: ", json.dumps(r.second_suite["after"]))
    print(f"elapsed {r.elapsed_s:.0f} s")


if __name__ == "__main__":
    main()
