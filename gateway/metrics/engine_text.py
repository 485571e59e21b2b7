"""vLLM's own metrics, from several LLM replicas, on one page.

Each replica's engine writes its ``vllm:*`` families in the Prometheus text
format; two replicas of one model would give identical series, so every
sample gains a ``replica`` label, and each family's HELP and TYPE lines
appear once, with the samples of every replica under them. ``_created``
series (prometheus_client's creation timestamps) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "vllm:"


def relabel(texts: Mapping[str, str]) -> str:
    """``texts`` (replica id -> exposition) merged, ``vllm:*`` families only."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family.startswith(PREFIX) and not family.endswith("_created"):
                    heads = headers.setdefault(family, [])
                    if len(heads) < 2 and line not in heads:
                        heads.append(line)
                    samples.setdefault(family, [])
                continue
            if not line or line.startswith("#") or family not in samples:
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name.endswith("_created"):
                continue
            samples[family].append(_with_replica(line, name, replica))
    out: list[str] = []
    for family, lines in samples.items():
        out.extend(headers[family])
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


def _with_replica(line: str, name: str, replica: str) -> str:
    label = f'replica="{replica}"'
    rest = line[len(name) :]
    if rest.startswith("{"):
        inner = rest[1:]
        return f"{name}{{{label}{'' if inner.startswith('}') else ','}{inner}"
    return f"{name}{{{label}}}{rest}"
