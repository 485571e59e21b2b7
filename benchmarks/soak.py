"""Soak: ten minutes of mixed traffic on the default gateway, then nothing left behind.

Starts ``llm-gateway serve`` with ``configs/default.yaml`` (two vLLM models
behind the ``chat`` alias, echo, iris, MiniLM) and runs closed-loop clients
sending a mix: chat streams through the alias (40 %), whole chat answers
(20 %), embeddings (20 %) and iris predictions (20 %). One request in five is
abandoned by its client: a stream after its first chunk, a whole answer
after 50 ms.

Reported: requests and statuses by kind; the resident memory of every
process of the gateway (Ray's daemons, Serve, HAProxy, the replicas, the
engines) after a one-minute warm-up and at the end, and its growth; after
the load, that the gateway's in-flight gauge and vLLM's running and waiting
requests are back to 0. Any answer that is not 200 (and not a hang-up the
client made) is listed.

    python -m benchmarks.soak [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import httpx
import psutil

from benchmarks.servers import cpu_model, stop, wait_ready
from gateway.affinity import process_tree

ROOT = Path(__file__).resolve().parents[1]
WARM_UP_S = 60
CLIENTS = 8
CANCEL_SHARE = 0.2


def resident(root: int) -> dict[str, int]:
    """Resident bytes of each process in ``root``'s tree, by a stable name."""
    out: dict[str, int] = {}
    for pid in process_tree(root):
        try:
            proc = psutil.Process(pid)
            name = " ".join(proc.cmdline())[:80] or proc.name()
            out[f"{name} [{pid}]"] = proc.memory_info().rss
        except psutil.Error:
            continue
    return out


async def one(session: aiohttp.ClientSession, base: str, rng: random.Random, tally: Counter[str], odd: list[str]) -> None:
    kind = rng.choices(["stream", "chat", "embed", "predict"], weights=[40, 20, 20, 20])[0]
    cancel = rng.random() < CANCEL_SHARE
    words = " ".join(rng.choice(["harbour", "ship", "tide", "gull", "rope", "lantern"]) for _ in range(rng.randint(3, 30)))
    if kind in ("stream", "chat"):
        url = base + "/v1/chat/completions"
        body = {"model": "chat", "messages": [{"role": "user", "content": words}], "max_tokens": rng.randint(8, 64),
                "stream": kind == "stream", "user": f"u{rng.randint(0, 50)}"}
    elif kind == "embed":
        url, body = base + "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": [words] * rng.randint(1, 8)}
    else:
        url = base + "/v1/models/iris:predict"
        body = {"instances": [[round(rng.uniform(0, 8), 1) for _ in range(4)] for _ in range(rng.randint(1, 16))]}
    try:
        if cancel and kind == "stream":
            async with session.post(url, json=body) as response:
                await response.content.readany()  # the first chunk, then the client leaves
            tally[f"{kind} abandoned"] += 1
            return
        if cancel:
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=0.05)) as response:
                    await response.read()
                    tally[f"{kind} {response.status}"] += 1
            except asyncio.TimeoutError:
                tally[f"{kind} abandoned"] += 1
            return
        async with session.post(url, json=body) as response:
            data = await response.read()
            tally[f"{kind} {response.status}"] += 1
            if response.status != 200 or (kind == "stream" and not data.endswith(b"data: [DONE]\n\n")) or b'"error"' in data:
                odd.append(f"{kind} {response.status} {data[-200:]!r}")
    except aiohttp.ClientError as exc:
        tally[f"{kind} failed"] += 1
        odd.append(f"{kind} {exc!r}")


async def load(
    base: str, seconds: float, seed: int, tally: Counter[str], odd: list[str],
    sample: tuple[int, list[dict[str, int]]] | None = None,
) -> None:
    """``sample``: (root pid, list) to append the tree's resident memory to each minute."""
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=CLIENTS + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        until = time.monotonic() + seconds

        async def client(i: int) -> None:
            own = random.Random(rng.random())
            while time.monotonic() < until:
                await one(session, base, own, tally, odd)

        async def sampler() -> None:
            while sample is not None and time.monotonic() < until - 30:
                await asyncio.sleep(60)
                sample[1].append(await asyncio.to_thread(resident, sample[0]))

        await asyncio.gather(*(client(i) for i in range(CLIENTS)), sampler())


def gauges(base: str) -> dict[str, float]:
    """The in-flight gauge (summed) and vLLM's running and waiting requests (summed)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for name in ("llm_gateway_in_flight_requests", "vllm:num_requests_running", "vllm:num_requests_waiting"):
        values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        out[name] = sum(float(v) for v in values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(ROOT / "configs" / "default.yaml"),
         "--host", "127.0.0.1", "--port", str(args.port)], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    tally: Counter[str] = Counter()
    odd: list[str] = []
    try:
        wait_ready(base + "/ready", proc)
        started = time.monotonic()
        asyncio.run(load(base, WARM_UP_S, 1, Counter(), []))
        before = resident(proc.pid)
        minutes: list[dict[str, int]] = []
        asyncio.run(load(base, args.minutes * 60 - WARM_UP_S, 2, tally, odd, (proc.pid, minutes)))
        after = resident(proc.pid)
        took = time.monotonic() - started
        time.sleep(3)  # abandoned requests' engines stop; the metrics hub's next report
        settled = gauges(base)
    finally:
        stop(proc)
    print(f"\nllm-gateway soak, {cpu_model()}, configs/default.yaml, {CLIENTS} clients, "
          f"{took / 60:.1f} min ({WARM_UP_S} s warm-up), {CANCEL_SHARE:.0%} abandoned")
    print(f"  answers after warm-up: {dict(sorted(tally.items()))}")
    print(f"  unexplained: {len(odd)}" + (f", e.g. {odd[:5]}" if odd else ""))
    print(f"  after the load: {settled}")
    growth = []
    for name, rss in before.items():
        if name in after:
            growth.append((after[name] / rss - 1, name, rss, after[name]))
    growth.sort(reverse=True)
    total_before = sum(r for _, n, r, _ in growth)
    total_after = sum(a for _, _, _, a in growth)
    print(f"  resident memory, {len(growth)} processes: {total_before / 2**20:.0f} MiB after warm-up, "
          f"{total_after / 2**20:.0f} MiB at the end ({total_after / total_before - 1:+.1%})")
    for change, name, rss, end in growth[:8]:
        print(f"    {change:+6.1%}  {rss / 2**20:7.1f} -> {end / 2**20:7.1f} MiB  {name}")
    for _, name, _, _ in growth[:3]:  # the largest growths, minute by minute
        curve = [before[name], *(m[name] for m in minutes if name in m), after[name]]
        print(f"    each minute: {' '.join(f'{v / 2**20:.0f}' for v in curve)} MiB  {name[:60]}")
    gone = set(before) - set(after)
    if gone:
        print(f"  processes gone during the run: {sorted(gone)}")


if __name__ == "__main__":
    main()
