#!/usr/bin/env python3
"""Build data/preference/{train,eval}.jsonl: preference pairs for the sample ticket-triage task (DPO/ORPO demo).

Each pair answers one support ticket with the correct triage JSON (chosen) and with the same JSON but one field wrong
(rejected): the priority the ticket's urgency calls for, or the category its issue belongs to. The base demo model
has no idea which of the two is right, so held-out preference accuracy shows what preference tuning taught it.
Rows use TRL's conversational format (prompt as a message list), some with a "system" key, some with plain strings.
Deterministic for a seed; run `python scripts/make_preference_data.py` to rebuild the committed files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_data import ISSUES, URGENCY, ticket  # noqa: E402  the same tickets as the SFT sample

# Short, and in every row (else the demo model's template adds its own default): each prompt token is read twice per
# pair, and again by the reference model.
SYSTEM = "Triage the ticket as JSON."


def pair(rng: random.Random) -> dict:
    text, label = ticket(rng)
    field = rng.choice(["priority", "category"])
    wrong = dict(label)
    wrong[field] = rng.choice([v for v in (URGENCY if field == "priority" else ISSUES) if v != label[field]])
    chosen, rejected = json.dumps(label), json.dumps(wrong)
    if rng.random() < 0.3:  # TRL's standard format: plain strings, the system prompt as its own key
        return {"system": SYSTEM, "prompt": f"Ticket: {text}", "chosen": chosen, "rejected": rejected}
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Ticket: {text}"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/preference", help="output folder")
    parser.add_argument("--train", type=int, default=240, help="training pairs")
    parser.add_argument("--eval", type=int, default=60, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < args.train + args.eval:  # no ticket appears in both splits
        r = pair(rng)
        key = json.dumps(r["prompt"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    for name, part in (("train", rows[: args.train]), ("eval", rows[args.train:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"wrote {len(part)} pairs to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
