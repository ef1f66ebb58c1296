"""Regenerate the example's text files (seeded; no downloads).

``public.txt``: short everyday stories (the public, non-private pretraining corpus).
``private.txt``: weather station reports, another domain with its own words and
number formats (the private fine-tuning corpus). The two share no line.

    python -m dpcore_transformers.data.generate
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["anna", "ben", "carla", "dev", "emma", "farid", "greta", "hugo", "ines", "jonas"]
PLACES = ["park", "market", "library", "kitchen", "garden", "station", "school", "beach"]
THINGS = ["a red ball", "some bread", "an old book", "a small dog", "a green apple", "a letter"]
VERBS = ["found", "bought", "lost", "painted", "carried", "shared", "washed", "hid"]
FEEL = ["happy", "tired", "curious", "calm", "hungry", "proud", "sleepy"]

CITIES = ["oslo", "lima", "cairo", "perth", "quito", "seoul", "dakar", "turin", "hanoi"]
SKIES = ["clear", "cloudy", "overcast", "foggy", "stormy", "hazy", "sunny"]
WINDS = ["n", "ne", "e", "se", "s", "sw", "w", "nw"]
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    return (
        f"{a} went to the {rng.choice(PLACES)} and {rng.choice(VERBS)} {rng.choice(THINGS)}. "
        f"then {a} met {b}, who felt {rng.choice(FEEL)}."
    )


def report(rng: random.Random) -> str:
    lo = rng.randint(-5, 25)
    hi = lo + rng.randint(2, 12)
    return (
        f"station {rng.choice(CITIES)} {rng.choice(DAYS)}: sky {rng.choice(SKIES)}, "
        f"temp {lo}..{hi} c, wind {rng.choice(WINDS)} {rng.randint(2, 40)} kmh, "
        f"rain {rng.randint(0, 90)}%."
    )


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(0)
    public = sorted({story(rng) for _ in range(1500)})
    private = sorted({report(rng) for _ in range(1500)})
    rng.shuffle(public)
    rng.shuffle(private)
    (here / "public.txt").write_text("\n".join(public) + "\n")
    (here / "private.txt").write_text("\n".join(private) + "\n")


if __name__ == "__main__":
    main()
