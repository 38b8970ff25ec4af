#!/usr/bin/env python3
"""Generate the tiny instruction dataset bundled with qlora-lab for the offline demo.

What the data is
----------------
Synthetic "structured extraction" rows in the Dolly schema
(``instruction``, ``context``, ``response``, ``category``).  Each ``context`` is a
short (1-3 sentence) natural-language shop note -- an order, a booking or a
shipping note -- that mentions a customer, an item, a quantity and a city, in
varied sentence templates and orders, sometimes with distracting details.  The
``response`` is always exactly one compact JSON object with a fixed key order::

    {"customer": "Maria Lopez", "item": "blue umbrella", "quantity": 3, "city": "Lisbon"}

Quantities may be written as digits ("3"), words ("three") or "a"/"an" in the
context, but are always integers in the response; items appear in plural form
in the context when the quantity is above one, but singular in the response.

The task is chosen so that a few minutes of CPU QLoRA training of a small
instruct model (SmolLM2-135M-Instruct) visibly changes its answers: the base
model does not emit this exact format, yet the mapping is quick to learn.

Held-out split
--------------
``eval.jsonl`` is built so it measures generalisation: roughly half of its
names, items and cities come from pools never used in training, two context
templates and one instruction phrasing are eval-only, and no eval context
duplicates a train context.

Everything here is made up by this script (no real people or orders); it was
written for qlora-lab and the generated data is dedicated to the public domain
(CC0 1.0).  Standard library only; output is deterministic (fixed seed).

Usage::

    python scripts/make_demo_data.py          # writes src/qlora_lab/demo_data/{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 300
N_EVAL = 60
CATEGORY = "information_extraction"

OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "qlora_lab" / "demo_data"

# --------------------------------------------------------------------------
# Vocabulary pools.  "train" pools are used for both splits; "heldout" pools
# appear only in eval rows.
# --------------------------------------------------------------------------
FIRST_TRAIN = [
    "Maria", "James", "Aisha", "Tom", "Yuki", "Lena", "Carlos", "Priya", "Omar",
    "Sofia", "Daniel", "Chen", "Fatima", "Lucas", "Emma", "Ivan", "Grace",
    "Mateo", "Hannah", "Kofi", "Elena", "Ravi", "Nora", "Diego",
]
LAST_TRAIN = [
    "Lopez", "Smith", "Khan", "Baker", "Tanaka", "Novak", "Silva", "Patel",
    "Haddad", "Rossi", "Meyer", "Wang", "Diallo", "Martin", "Clarke", "Petrov",
    "Kim", "Garcia", "Berg", "Mensah", "Costa", "Singh", "Walsh", "Ortiz",
]
FIRST_HELDOUT = ["Amara", "Felix", "Ingrid", "Tariq", "Zoe", "Mikhail", "Lucia", "Bongani"]
LAST_HELDOUT = ["Okafor", "Lindqvist", "Moreau", "Nakamura", "Fischer", "Alvarez", "Quinn", "Horvat"]

# (singular, plural)
ITEMS_TRAIN = [
    ("blue umbrella", "blue umbrellas"),
    ("coffee mug", "coffee mugs"),
    ("wool scarf", "wool scarves"),
    ("desk lamp", "desk lamps"),
    ("yoga mat", "yoga mats"),
    ("leather wallet", "leather wallets"),
    ("water bottle", "water bottles"),
    ("notebook", "notebooks"),
    ("phone charger", "phone chargers"),
    ("garden hose", "garden hoses"),
    ("throw pillow", "throw pillows"),
    ("bike helmet", "bike helmets"),
    ("tea kettle", "tea kettles"),
    ("canvas bag", "canvas bags"),
    ("wall clock", "wall clocks"),
    ("running shoe", "running shoes"),
    ("picture frame", "picture frames"),
    ("cutting board", "cutting boards"),
    ("sun hat", "sun hats"),
    ("bath towel", "bath towels"),
    ("flower vase", "flower vases"),
    ("table lamp", "table lamps"),
]
ITEMS_HELDOUT = [
    ("red backpack", "red backpacks"),
    ("frying pan", "frying pans"),
    ("silk tie", "silk ties"),
    ("camping stove", "camping stoves"),
    ("ceramic bowl", "ceramic bowls"),
    ("reading light", "reading lights"),
    ("travel pillow", "travel pillows"),
]

CITIES_TRAIN = [
    "Lisbon", "Berlin", "Toronto", "Osaka", "Nairobi", "Madrid", "Chicago",
    "Mumbai", "Dublin", "Seoul", "Lyon", "Cairo", "Melbourne", "Oslo", "Lima",
    "Prague", "Denver", "Accra", "Vienna", "Porto",
]
CITIES_HELDOUT = ["Helsinki", "Bogota", "Krakow", "Auckland", "Marseille", "Hanoi", "Tunis"]

NUM_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
    8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve",
    15: "fifteen", 20: "twenty",
}
QUANTITIES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 20]

# Distractors: extra details that must NOT end up in the JSON.
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
EXTRAS = [
    "Payment was made by card.",
    "Gift wrapping was requested.",
    "The customer asked for express delivery.",
    "Please use the side entrance.",
    "A discount code was applied.",
    "The invoice has already been sent.",
    "Leave the parcel with a neighbour if nobody is home.",
    "The order was placed on {day}.",
    "Delivery is expected by {day}.",
]

# --------------------------------------------------------------------------
# Instructions (the last phrasing is eval-only).
# --------------------------------------------------------------------------
INSTRUCTIONS_TRAIN = [
    "Extract the order details as JSON.",
    "Convert this note into a JSON object.",
    "Pull out the customer, item, quantity and city as JSON.",
    "Return the key details of this order in JSON format.",
    "Read the note and output the order as a JSON object.",
    "Give me the structured order data as JSON.",
    "Parse this shop note into JSON.",
    "Summarise the order as a single JSON object.",
    "Turn the following message into JSON with customer, item, quantity and city.",
    "Extract customer, item, quantity and city from the text as JSON.",
]
INSTRUCTIONS_HELDOUT = ["Please give the details of this order as a JSON record."]

# --------------------------------------------------------------------------
# Context templates.  {name} {qty} {items} {city}; {qty} {items} is rendered
# as e.g. "3 blue umbrellas", "three blue umbrellas" or "a blue umbrella".
# The last two templates are eval-only.
# --------------------------------------------------------------------------
TEMPLATES_TRAIN = [
    "{name} ordered {qi} to be delivered in {city}.",
    "New order from {name} in {city}: {qi}.",
    "Please ship {qi} to {name} in {city}.",
    "{name} from {city} wants to buy {qi}.",
    "Order note: {qi} for {name}, shipping to {city}.",
    "A customer in {city}, {name}, has placed an order for {qi}.",
    "Shipping {qi} to {city} today. The recipient is {name}.",
    "{name} called to book {qi}. They will pick them up at our {city} store.",
    "Deliver {qi} to {city}. Customer name: {name}.",
    "We received a request from {name} for {qi}. Destination: {city}.",
    "{city} branch: {name} reserved {qi}.",
    "Hi team, {name} just bought {qi}. It ships to {city}.",
    "Customer {name} ({city}) asked for {qi}.",
    "Reminder: {qi} need to go out to {name} in {city}.",
]
TEMPLATES_HELDOUT = [
    "Booking confirmed for {name}: {qi}, collection point {city}.",
    "The warehouse is packing {qi}. They go to {name}, who lives in {city}.",
]

ARTICLE_VOWELS = tuple("aeiou")


def render_qty_items(rng: random.Random, qty: int, singular: str, plural: str) -> str:
    """Write quantity + item the way a person might, e.g. 'three wool scarves'."""
    if qty == 1:
        style = rng.random()
        if style < 0.4:
            article = "an" if singular.startswith(ARTICLE_VOWELS) else "a"
            return f"{article} {singular}"
        if style < 0.7:
            return f"one {singular}"
        return f"1 {singular}"
    if rng.random() < 0.4 and qty in NUM_WORDS:
        return f"{NUM_WORDS[qty]} {plural}"
    return f"{qty} {plural}"


def capitalise_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_row(rng: random.Random, first, last, items, cities, templates, instructions) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    singular, plural = rng.choice(items)
    city = rng.choice(cities)
    qty = rng.choice(QUANTITIES)

    qi = render_qty_items(rng, qty, singular, plural)
    context = capitalise_first(rng.choice(templates).format(name=name, qi=qi, city=city))
    if qty == 1:
        # keep the grammar right for single items
        for plural_form, singular_form in (
            ("need to go out", "needs to go out"),
            ("pick them up", "pick it up"),
            ("They go to", "It goes to"),
        ):
            context = context.replace(plural_form, singular_form)
    if rng.random() < 0.35:
        context += " " + rng.choice(EXTRAS).format(day=rng.choice(DAYS))

    response = json.dumps(
        {"customer": name, "item": singular, "quantity": qty, "city": city},
        ensure_ascii=False,
    )
    return {
        "instruction": rng.choice(instructions),
        "context": context,
        "response": response,
        "category": CATEGORY,
    }


def mix(rng: random.Random, seen: list, heldout: list, p_heldout: float) -> list:
    """Pick a pool for one eval field: held-out with probability p_heldout."""
    return heldout if rng.random() < p_heldout else seen


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)

    train: list[dict] = []
    train_contexts: set[str] = set()
    while len(train) < N_TRAIN:
        row = make_row(rng, FIRST_TRAIN, LAST_TRAIN, ITEMS_TRAIN, CITIES_TRAIN,
                       TEMPLATES_TRAIN, INSTRUCTIONS_TRAIN)
        if row["context"] in train_contexts:
            continue
        train_contexts.add(row["context"])
        train.append(row)

    eval_rows: list[dict] = []
    eval_contexts: set[str] = set()
    while len(eval_rows) < N_EVAL:
        row = make_row(
            rng,
            mix(rng, FIRST_TRAIN, FIRST_HELDOUT, 0.5),
            mix(rng, LAST_TRAIN, LAST_HELDOUT, 0.5),
            mix(rng, ITEMS_TRAIN, ITEMS_HELDOUT, 0.5),
            mix(rng, CITIES_TRAIN, CITIES_HELDOUT, 0.5),
            mix(rng, TEMPLATES_TRAIN, TEMPLATES_HELDOUT, 0.3),
            mix(rng, INSTRUCTIONS_TRAIN, INSTRUCTIONS_HELDOUT, 0.2),
        )
        if row["context"] in train_contexts or row["context"] in eval_contexts:
            continue
        eval_contexts.add(row["context"])
        eval_rows.append(row)

    return train, eval_rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, eval_rows = build()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT_DIR / "train.jsonl", train)
    write_jsonl(OUT_DIR / "eval.jsonl", eval_rows)
    print(f"wrote {len(train)} rows to {OUT_DIR / 'train.jsonl'}")
    print(f"wrote {len(eval_rows)} rows to {OUT_DIR / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
