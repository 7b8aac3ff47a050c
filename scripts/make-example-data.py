"""Write the example datasets of data/examples/ from the E2E development set (CC BY-SA 4.0), one per
data format: deterministic, a few hundred rows each. Run from the repository root:
    .venv/bin/python scripts/make-example-data.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from splitlora.data import parse_mr

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "examples"


def rows():
    with (ROOT / "data" / "e2e" / "devset.csv").open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            yield parse_mr(r["mr"]), r["ref"].strip()


def facts(attrs: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in attrs.items())


def main() -> None:
    data = list(rows())
    random.Random(0).shuffle(data)
    OUT.mkdir(parents=True, exist_ok=True)

    with (OUT / "alpaca.jsonl").open("w", encoding="utf-8") as f:        # instruction / input / output
        for attrs, ref in data[:300]:
            f.write(json.dumps({"instruction": "Write one sentence for a restaurant guide from these facts.",
                                "input": facts(attrs), "output": ref,
                                "eatType": attrs.get("eatType", "none")}, ensure_ascii=False) + "\n")

    with (OUT / "chat.jsonl").open("w", encoding="utf-8") as f:          # messages, two assistant turns
        kept = [(a, r) for a, r in data[300:] if "food" in a][:200]
        for attrs, ref in kept:
            messages = [{"role": "user", "content": f"Tell me about {attrs['name']}. Facts: {facts(attrs)}"},
                        {"role": "assistant", "content": ref},
                        {"role": "user", "content": "What food do they serve?"},
                        {"role": "assistant", "content": f"{attrs['name']} serves {attrs['food']} food."}]
            f.write(json.dumps({"messages": messages, "food": attrs["food"]}, ensure_ascii=False) + "\n")

    with (OUT / "family.csv").open("w", encoding="utf-8", newline="") as f:   # a yes/no task, a label column
        w = csv.writer(f)
        w.writerow(["question", "answer", "area"])
        kept = [(a, r) for a, r in data[600:] if "familyFriendly" in a][:300]
        for attrs, ref in kept:
            w.writerow([f"Is this place family friendly? {ref}\nAnswer:", f" {attrs['familyFriendly']}",
                        attrs.get("area", "none")])

    texts = [ref for _, ref in data[1000:1300]]                          # plain text
    pq.write_table(pa.table({"text": texts}), OUT / "text.parquet")


if __name__ == "__main__":
    main()
