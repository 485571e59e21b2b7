"""A MiniLM replica's resident memory under varied batches, with and without heap trimming.

Runs the embedding model as a replica does (``EmbeddingPredictor``, one
intra-op thread, on one thread) in two child processes one after the other,
the same seeded load in each: batches of 1–16 requests of 1–8 texts of 3–30
words, for ``--seconds`` each. One trims the heap as replicas do
(``models.classical.heap``), the other never does. Reported: batches per
second and resident memory after a 20 s warm-up and every 15 s after.

    python -m benchmarks.heap_trim [--seconds 110] [--model-dir .models/all-minilm-l6-v2]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WARM_UP_S, SAMPLE_S = 20.0, 15.0


def child(model_dir: str, seconds: float, trim: bool) -> None:
    from models.classical.embedding import EmbeddingPredictor
    from models.classical.heap import HeapTrimmer, malloc_trim

    predictor = EmbeddingPredictor.load(model_dir, threads=1)
    glibc = malloc_trim()
    assert glibc is not None
    trims: list[float] = []

    def timed(pad: int) -> int:
        started = time.perf_counter()
        given_back = glibc(pad) if trim else 0
        trims.append(time.perf_counter() - started)
        return given_back

    trimmer = HeapTrimmer(trim=timed)
    rng = random.Random(1)
    words = (ROOT / "models" / "llm" / "corpus.txt").read_text().split()
    process = psutil.Process()

    def batch() -> None:
        jobs = []
        for _ in range(rng.randint(1, 16)):
            texts = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(rng.randint(1, 8))]
            jobs.append(predictor.inputs(texts, "input"))
        predictor.predict(jobs)
        trimmer.after_batch()

    started, batches = time.monotonic(), 0
    while time.monotonic() - started < WARM_UP_S:
        batch()
    rss = [process.memory_info().rss / 2**20]
    counted = time.monotonic()
    while time.monotonic() - started < WARM_UP_S + seconds:
        sample = time.monotonic()
        while time.monotonic() - sample < SAMPLE_S:
            batch()
            batches += 1
        rss.append(process.memory_info().rss / 2**20)
    print(json.dumps({"batches_per_s": batches / (time.monotonic() - counted), "rss_mib": rss,
                      "trims": len(trims), "trim_ms": 1000 * sum(trims) / max(len(trims), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=110.0)
    parser.add_argument("--model-dir", default=str(ROOT / ".models" / "all-minilm-l6-v2"))
    parser.add_argument("--order", default="keep,trim", help="which runs first")
    parser.add_argument("--child", choices=["trim", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model_dir, args.seconds, args.child == "trim")
        return
    print(f"MiniLM, {args.seconds:.0f} s each after {WARM_UP_S:.0f} s of warm-up; RSS every {SAMPLE_S:.0f} s")
    print(f"{'heap':<10} {'batches/s':>9}  {'RSS MiB':<60} growth    peak  trims (mean)")
    for mode in args.order.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.heap_trim", "--child", mode,
             "--seconds", str(args.seconds), "--model-dir", args.model_dir],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rss = result["rss_mib"]
        samples = ", ".join(f"{r:,.0f}" for r in rss)
        print(f"{'trimmed' if mode == 'trim' else 'untrimmed':<10} {result['batches_per_s']:>9.1f}  {samples:<60} "
              f"{(rss[-1] / rss[0] - 1) * 100:+5.1f} % {(max(rss) / rss[0] - 1) * 100:+5.1f} %  "
              + (f"{result['trims']} ({result['trim_ms']:.1f} ms)" if mode == "trim" else "-"))


if __name__ == "__main__":
    main()
