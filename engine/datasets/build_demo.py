"""Builds the two demo datasets shipped with PEFT Studio (deterministic).

Run `python -m engine.datasets.build_demo` to regenerate the .jsonl files.
The sentences are composed from small phrase lists written for this project.

demo-sentiment: short product/service reviews labelled positive / negative,
including negations ("not bad") and mixed clauses, so a bag-of-words
baseline is imperfect and a fine-tuned encoder has something to learn.
demo-instruct: prompt/response pairs for a few small skills (capitals,
addition, opposites, plurals, upper-casing), for causal LM fine-tuning.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

SUBJECTS = ["The coffee", "This laptop", "The hotel room", "Our waiter", "The delivery", "This phone",
            "The movie", "The soundtrack", "The battery", "The checkout process", "The new update",
            "The headphones", "The pasta", "The customer support", "This jacket", "The train ride",
            "The keyboard", "The concert", "The app", "The museum tour", "The mattress", "The camera"]
POSITIVE = ["excellent", "wonderful", "delightful", "fantastic", "great", "superb", "reliable", "pleasant",
            "impressive", "comfortable", "fast", "friendly", "brilliant", "charming", "solid", "lovely"]
NEGATIVE = ["terrible", "awful", "disappointing", "horrible", "broken", "slow", "rude", "unreliable",
            "noisy", "flimsy", "boring", "overpriced", "dreadful", "useless", "mediocre", "frustrating"]
INTENS = ["", "", "really ", "truly ", "absolutely ", "quite ", "incredibly ", "rather "]
POS_TAILS = ["and I would buy it again.", "and I recommend it to everyone.", "which made my day.",
             "and worth every penny.", "beyond my expectations.", "so I left five stars."]
NEG_TAILS = ["and I want a refund.", "and I will not come back.", "which ruined the evening.",
             "and a waste of money.", "far below my expectations.", "so I left one star."]


def sentiment_example(rng: random.Random) -> dict:
    label = rng.randrange(2)
    form = rng.randrange(4)
    subj = rng.choice(SUBJECTS)
    good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    if form == 0:      # plain
        adj, tail = (good, rng.choice(POS_TAILS)) if label else (bad, rng.choice(NEG_TAILS))
        text = f"{subj} was {rng.choice(INTENS)}{adj}, {tail}"
    elif form == 1:    # negated opposite
        adj = bad if label else good
        text = f"{subj} was not {adj} at all."
    elif form == 2:    # contrast: the clause after 'but' decides
        first, second = (bad, good) if label else (good, bad)
        text = f"At first {subj.lower()} seemed {first}, but in the end it was {rng.choice(INTENS)}{second}."
    else:              # short verdict
        adj = good if label else bad
        text = f"{rng.choice(INTENS).strip().capitalize() or 'Simply'} {adj}. {subj} {'delivered' if label else 'let me down'}."
    return {"text": text, "label": "positive" if label else "negative"}


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna",
            "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana", "Sweden": "Stockholm"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
             "open": "closed", "full": "empty", "strong": "weak", "high": "low", "young": "old",
             "rich": "poor", "loud": "quiet", "hard": "soft", "wet": "dry", "thick": "thin"}
NOUNS = ["apple", "chair", "river", "window", "garden", "pencil", "bottle", "rocket", "teacher", "cloud",
         "mountain", "candle", "basket", "ticket", "planet", "button", "blanket", "tiger", "violin", "island"]


def instruct_example(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    if kind == 0:
        country, city = rng.choice(list(CAPITALS.items()))
        return {"prompt": f"What is the capital of {country}?", "response": f"The capital of {country} is {city}."}
    if kind == 1:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    if kind == 2:
        w, o = rng.choice(list(OPPOSITES.items()))
        return {"prompt": f"Give the opposite of the word '{w}'.", "response": f"The opposite of '{w}' is '{o}'."}
    if kind == 3:
        n = rng.choice(NOUNS)
        return {"prompt": f"What is the plural of '{n}'?", "response": f"The plural of '{n}' is '{n}s'."}
    n = rng.choice(NOUNS)
    return {"prompt": f"Write '{n}' in capital letters.", "response": n.upper()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build() -> None:
    rng = random.Random(20261123)
    for name, make, n_train, n_val in (("demo-sentiment", sentiment_example, 1200, 300),
                                        ("demo-instruct", instruct_example, 800, 200)):
        seen, rows = set(), []
        while len(rows) < n_train + n_val:
            r = make(rng)
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(r)
        write_jsonl(HERE / f"{name}.train.jsonl", rows[:n_train])
        write_jsonl(HERE / f"{name}.validation.jsonl", rows[n_train:])


if __name__ == "__main__":
    build()
