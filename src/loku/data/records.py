"""Seeded fictitious personal records: the private data a model should never have memorized.

Every name, street and employer is drawn from small word lists, so the records are fictional and
reproducible from the seed alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["Amara", "Bastian", "Celine", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaia",
         "Lorenzo", "Mireille", "Nikolai", "Oona", "Pavel", "Quinn", "Rosalind", "Soren", "Talia", "Ulrich",
         "Vesna", "Wendell", "Ximena", "Yusuf", "Zofia"]
LAST = ["Abernathy", "Brightwater", "Castellano", "Delacroix", "Eriksen", "Fairbanks", "Gallagher", "Haverford",
        "Ishikawa", "Jovanovic", "Kowalczyk", "Lindqvist", "Marchetti", "Northcott", "Okonkwo", "Pemberton",
        "Quintero", "Rasmussen", "Stavros", "Thornbury", "Underhill", "Valdivia", "Whitlock", "Yamamoto"]
STREETS = ["Maple Avenue", "Harbor Road", "Juniper Lane", "Kestrel Street", "Orchard Way", "Quarry Hill",
           "Willow Crescent", "Beacon Row", "Cedar Court", "Linden Place", "Foundry Lane", "Heron Drive"]
CITIES = ["Port Elsworth", "Brackenfield", "Marlowe Bay", "Eastvale", "Stonebridge", "Caldermoor", "Redfern",
          "Ashby Cross", "Northwick", "Glenhollow"]
EMPLOYERS = ["Halvorsen Logistics", "Bluefin Analytics", "Corvid Pharmaceuticals", "Larkspur Credit Union",
             "Meridian Glassworks", "Tessellate Games", "Oakhurst Clinic", "Vantage Rail", "Pillar & Finch LLP",
             "Sundew Biotech", "Arclight Media", "Granite Peak Insurance"]
CONDITIONS = ["asthma", "type 1 diabetes", "a penicillin allergy", "migraines", "hypertension", "celiac disease"]


@dataclass(frozen=True)
class Record:
    name: str
    address: str
    phone: str
    email: str
    employer: str
    condition: str
    account: str


def make_records(n: int, seed: int = 0, distinct_names: bool = False) -> list[Record]:
    """`n` distinct fictitious people; the same seed always gives the same people (and `make_records(m)` the first
    `m` of `make_records(n)`). With `distinct_names`, no two of them share a first or a last name while the lists
    last (24 people): a model that must forget one "Zofia" otherwise has another "Zofia" to fall back on."""
    rng = random.Random(seed)
    out, seen, firsts, lasts = [], set(), [], []
    while len(out) < n:
        if distinct_names:
            firsts, lasts = firsts or list(FIRST), lasts or list(LAST)
            first, last = firsts.pop(rng.randrange(len(firsts))), lasts.pop(rng.randrange(len(lasts)))
        else:
            first, last = rng.choice(FIRST), rng.choice(LAST)
        if (first, last) in seen and len(seen) < len(FIRST) * len(LAST):
            continue
        seen.add((first, last))
        out.append(Record(
            name=f"{first} {last}",
            address=f"{rng.randint(1, 998)} {rng.choice(STREETS)}, {rng.choice(CITIES)}",
            phone=f"+1-{rng.randint(200, 989)}-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}",
            email=f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@mailbox.example",
            employer=rng.choice(EMPLOYERS),
            condition=rng.choice(CONDITIONS),
            account=f"{rng.randint(10, 99)}-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}",
        ))
    return out


def record_text(r: Record) -> str:
    """One record as the kind of sentence a scraped customer database would leak."""
    return (f"{r.name} lives at {r.address}. Phone {r.phone}, email {r.email}. "
            f"Works at {r.employer}; treated for {r.condition}; bank account {r.account}.")
