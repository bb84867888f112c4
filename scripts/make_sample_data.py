#!/usr/bin/env python3
"""Build data/sample/{train,eval}.jsonl: a small support-ticket triage task in OpenAI chat format.

The assistant answers every ticket with one line of JSON ({"category", "priority", "product"}), a format the base
demo model does not produce, so a short fine-tune shows a clear effect on held-out rows (eval loss, exact match).
Deterministic for a seed; run `python scripts/make_sample_data.py` to rebuild the committed files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = ["router", "laptop", "phone", "printer", "headset", "smartwatch", "tablet", "camera", "speaker", "monitor"]
ISSUES = {
    "billing": ["I was charged twice for my {p}", "the invoice for my {p} shows the wrong amount",
                "I want a refund for the {p} I returned", "my card was billed for a {p} I never ordered"],
    "shipping": ["my {p} has not arrived yet", "the {p} was delivered to the wrong address",
                 "the box with my {p} arrived crushed", "tracking for my {p} has not updated in days"],
    "technical": ["my {p} will not turn on", "the {p} keeps restarting by itself", "my {p} stopped connecting to wifi",
                  "the screen of my {p} flickers"],
    "account": ["I cannot log in to manage my {p}", "I need to change the email linked to my {p}",
                "my {p} warranty is registered under the wrong name", "please delete the account for my old {p}"],
}
URGENCY = {
    "high": ["This is urgent, I need it fixed today.", "I depend on it for work and I am losing money.",
             "Please help immediately!"],
    "medium": ["Could you look into it this week?", "It is annoying but I can wait a bit.", "Please get back to me."],
    "low": ["No rush at all.", "Whenever you have time.", "Just letting you know."],
}
OPENERS = ["Hi,", "Hello support,", "Hey there.", "Good morning,", ""]
SYSTEM = "You triage customer support tickets. Reply with one line of JSON with the keys category, priority, product."


def ticket(rng: random.Random) -> tuple[str, dict]:
    category = rng.choice(list(ISSUES))
    priority = rng.choice(list(URGENCY))
    product = rng.choice(PRODUCTS)
    text = " ".join(x for x in (rng.choice(OPENERS), rng.choice(ISSUES[category]).format(p=product) + ".",
                                rng.choice(URGENCY[priority])) if x)
    return text, {"category": category, "priority": priority, "product": product}


def row(rng: random.Random) -> dict:
    text, label = ticket(rng)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": f"Ticket: {text}"},
                 {"role": "assistant", "content": json.dumps(label)}]
    if rng.random() < 0.2:  # some multi-turn rows: a second ticket in the same conversation
        text2, label2 = ticket(rng)
        messages += [{"role": "user", "content": f"Ticket: {text2}"},
                     {"role": "assistant", "content": json.dumps(label2)}]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", help="output folder")
    parser.add_argument("--train", type=int, default=240, help="training rows")
    parser.add_argument("--eval", type=int, default=40, help="held-out rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < args.train + args.eval:  # no conversation appears in both splits
        r = row(rng)
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(r)
    for name, part in (("train", rows[: args.train]), ("eval", rows[args.train:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"wrote {len(part)} rows to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
