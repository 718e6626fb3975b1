"""A generated multi-hop RAG suite: fictional entities, encyclopedia-style pages, 1- and 2-hop questions.

Everything is generated in code from a seed (no checked-in data, no model, no network): the same
``seed`` and ``n_questions`` give byte-identical documents and queries in any process.

The world
    * **cities** (country, river), **companies** (headquarters city, founder, year founded),
      **products** (maker company, development leader, weight in kilograms, launch year) and
      **people** (birthplace city, birth year, profession, employer). Every name is invented from
      syllables and used once in the whole world, so a model cannot answer from memory and a gold
      answer matched as whole words cannot be hit by another name.
    * One document per entity, 150-400 tokens with a typical LLM tokenizer: a title line, then a
      few paragraphs of plausible but answer-free filler with the entity's facts embedded in natural
      sentences. Each fact is stated in exactly one document (the entity's own); links between
      entities (a product names its maker and leader, a company its founder and headquarters, a
      person their birthplace and employer, a city its country and river) are what two-hop
      questions follow. Filler sentences name no entity and contain no digits.

The questions
    * **one-hop**: the answer is in one document ("How many kilograms does the Zorbex Pro weigh?").
    * **two-hop**: the first document names a bridge entity, the bridge's own document holds the
      answer ("The development of the Zorbex Pro was led by a person. In which city was that person
      born?").
      The gold answer never appears in the first-hop document. 60% of the questions by default.
    * Gold answers are short: a city, country or river name, a person's full name, the distinctive
      word of a company name ("Quorvane" for "Quorvane Systems"), a profession, a year or a weight
      in kilograms as a bare integer ("14"). :func:`answer_correct` matches them as whole words of
      the normalized prediction, so "It weighs 14 kilograms." is correct for "14".
    * Every query gets ``docs_per_query`` documents (8 by default): the needed ones plus distractors
      of the same kinds (other people, products... with similar facts) and documents related to the
      question's entities, in a seeded shuffled order that puts the needed documents anywhere.
      ``Query.meta`` = ``{"hops", "needed", "kind", "subject", "bridge"}``; ``Query.topic`` is the
      document that holds the answer.

Faithfulness guard (:func:`guard_sets`, same world and documents as :func:`multihop_suite` for the
same ``seed`` and ``n_questions``, drawn with their own seeded generator so the main suite is
unchanged):
    * **leakage**: one-hop questions whose answer document is not among the ``docs_per_query``
      documents (its slot goes to another entity of the same kind) and no document given states
      the gold answer at all, so a full prefill cannot know it; a reuse method that answers
      correctly anyway took the answer from somewhere else (e.g. a document's index-time context).
    * **random distractors**: the needed documents plus random documents that share no entity with
      the question (they neither name the question's entities nor are named by them, and do not
      contain the gold answer), instead of the related distractors of the main suite.

Metrics: :func:`answer_correct`, :func:`answers_agree`, :func:`accuracy_by_hops`,
:func:`retention_by_hops`.
"""
from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

try:  # the benchmark package
    from kvboost_rag_bench.datasets import Doc, Query
except ImportError:  # pragma: no cover - imported outside the package, or before the move
    try:
        from kvboost_rag_bench.datasets import Doc, Query
    except ImportError:
        from kvboost_rag.corpora import Doc, Query

from kvboost_rag_bench.metrics import contains_answer, mean_ci95, normalize_answer, retention

__all__ = ["multihop_suite", "guard_sets", "answer_correct", "answers_agree", "accuracy_by_hops",
           "retention_by_hops", "ONE_HOP_KINDS", "TWO_HOP_KINDS"]

# ============================================================================ vocabulary
# weighted syllable parts: mostly single consonants and plain vowels, so names read naturally
_ONSETS = (["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"] * 3
           + ["br", "dr", "gr", "kr", "st", "tr", "th", "sh", "j", "w"])
_VOWELS = ["a", "e", "i", "o", "u"] * 5 + ["ai", "ei", "ou"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m"]
_LAST_CODAS = ["", "", "n", "r", "l", "s", "k", "m", "nd", "rn", "ld", "st", "x", "v", "th"]

_CITY_SUFFIXES = ["mont", "haven", "burg", "dal", "ora", "port", "stad", "vik", "ford", "ria", "wick", "holm"]
_COUNTRY_SUFFIXES = ["ia", "ovia", "land", "avia", "onia", "eria", "mark", "esh"]
_COMPANY_SUFFIXES = ["Systems", "Dynamics", "Instruments", "Works", "Industries", "Labs",
                     "Technologies", "Manufacturing", "Engineering", "Group"]
_PRODUCT_MODELS = ["Pro", "Max", "One", "Lite", "Air", "Prime", "Plus", "Mark II", "S", "X", "Go", "Neo"]

# (profession, what the work is about)
_PROFESSIONS = [
    ("hydrologist", "the movement of groundwater through fractured rock"),
    ("structural engineer", "the behaviour of long-span bridges under wind load"),
    ("industrial designer", "making household tools easier to hold and repair"),
    ("marine biologist", "the feeding habits of deep-water fish"),
    ("materials scientist", "ceramics that survive rapid changes in temperature"),
    ("software architect", "reliable control software for factory equipment"),
    ("economist", "how small manufacturers set their prices"),
    ("cartographer", "detailed maps of coastal wetlands"),
    ("acoustician", "reducing noise in open-plan workplaces"),
    ("agronomist", "soil health in dry farming regions"),
    ("chemical engineer", "cleaner processes for making industrial dyes"),
    ("landscape architect", "public parks and shaded city squares"),
    ("geologist", "the formation of mineral deposits in old mountain ranges"),
    ("meteorologist", "short-range forecasts of severe storms"),
    ("metallurgist", "lighter alloys for transport equipment"),
    ("urban planner", "the redesign of neglected industrial districts"),
    ("physician", "the early diagnosis of lung disease"),
    ("statistician", "methods for analysing small and incomplete data sets"),
]

# (category, weight range in kg, intended use)
_CATEGORIES = [
    ("portable water purifier", (3, 25), "expeditions and disaster relief"),
    ("agricultural survey drone", (4, 30), "mapping crops and irrigation on large farms"),
    ("electric cargo bicycle", (22, 60), "deliveries in crowded city centres"),
    ("field spectrometer", (2, 15), "identifying minerals and plant stress outdoors"),
    ("marine sonar buoy", (40, 180), "monitoring shipping lanes and marine life"),
    ("industrial sewing machine", (30, 95), "small clothing workshops"),
    ("solar-powered weather station", (8, 45), "remote farms and mountain huts"),
    ("modular telescope mount", (10, 70), "serious amateur astronomers"),
    ("autonomous lawn mower", (12, 40), "parks and large private gardens"),
    ("compact wind turbine", (60, 400), "off-grid homes and small businesses"),
    ("hospital infusion pump", (3, 12), "intensive care wards"),
    ("commercial espresso machine", (25, 90), "cafes and restaurants"),
    ("air-source heat pump", (50, 250), "heating detached houses"),
    ("electric outboard motor", (15, 90), "small fishing boats and ferries"),
    ("portable ultrasound scanner", (2, 9), "clinics without a permanent imaging department"),
    ("robotic warehouse picker", (150, 450), "sorting parcels in distribution centres"),
]

_INDUSTRIES = [
    "precision instruments", "outdoor equipment", "medical devices", "industrial machinery",
    "consumer electronics", "energy equipment", "marine technology", "agricultural machinery",
    "transport equipment", "laboratory equipment",
]

_INTERESTS = ["machines", "maps", "the natural world", "building things", "numbers", "music and mathematics"]

# ---------------------------------------------------------------------------------- filler
# Plausible, answer-free sentences. No digits, no entity names; {p}/{P} pronoun, {o} object,
# {s} possessive, {S} capitalized possessive.
_PERSON_FILLER = [
    "As a child {p} spent long summers outdoors and filled notebooks with sketches and careful measurements.",
    "{P} studied at a regional technical university, graduating with honours before completing a doctorate.",
    "{S} doctoral thesis examined a problem that many colleagues considered too narrow to be useful, but several of its methods later became standard practice.",
    "Colleagues describe {o} as meticulous, patient and unusually generous in sharing credit with junior staff.",
    "{P} has written dozens of papers and articles and is a frequent speaker at professional conferences.",
    "Outside work, {p} is a keen amateur cellist and a long-distance walker.",
    "{P} has served on several advisory panels and regularly reviews grant applications for a national research council.",
    "In interviews {p} has stressed the importance of careful documentation and of publishing failed experiments as well as successful ones.",
    "{P} mentors students through a volunteer programme and has supervised a number of doctoral candidates.",
    "Early in {s} career {p} took short contracts with several small firms, an experience {p} later described as formative.",
    "{P} received a national award for professional excellence and was later elected a fellow of {s} professional society.",
    "{P} is known among friends for a large collection of old maps, travel guides and technical handbooks.",
    "{P} speaks three languages and has translated several technical manuals for younger colleagues.",
    "A profile in a popular science magazine described {o} as one of the most influential figures of {s} generation.",
    "{P} has argued in public lectures that practical training deserves the same respect as academic research.",
    "{S} working notes, kept in a long series of bound volumes, are admired for their clarity and neat diagrams.",
]

_PRODUCT_FILLER = [
    "Its housing is made from a corrosion-resistant aluminium alloy, and most parts can be replaced with ordinary hand tools.",
    "Reviewers praised its quiet operation and clear controls, although some criticised the price of replacement parts.",
    "The design went through a long series of prototypes before the final version was approved for production.",
    "A companion application lets owners check the device's status and receive maintenance reminders.",
    "Early units suffered from a faulty seal, a problem that was corrected in later production runs.",
    "The manual is available in a dozen languages and includes detailed repair instructions.",
    "It is sold mainly through specialist dealers rather than general retailers.",
    "Several trade magazines named it one of the most practical designs on the market.",
    "The control panel uses large physical buttons so that it can be operated while wearing gloves.",
    "Spare batteries, filters and other consumables are sold separately.",
    "An upgraded version with a larger display was announced but never reached the market.",
    "Independent tests found that it used noticeably less energy than competing models.",
    "Its modular layout was widely copied by other manufacturers.",
    "Owners have formed online communities that share repair guides and home-made accessories.",
    "The standard warranty can be extended by registering the device with the manufacturer.",
    "Critics noted that the first software release was slow, but later updates fixed most complaints.",
]

_COMPANY_FILLER = [
    "The company began as a small workshop with a handful of employees and grew steadily over the following decades.",
    "Today it employs several thousand people and sells its products in many countries.",
    "Its research division works closely with universities and publishes some of its findings in open journals.",
    "The firm is privately owned and has never been listed on a stock exchange.",
    "Its logo, a stylised gear inside a circle, has changed little since the early years.",
    "Labour unions have criticised the company over long working hours, but it has also won awards as an employer.",
    "A charitable foundation funded by the company supports technical education for young people.",
    "Most of its manufacturing takes place in one large plant, supplemented by a few smaller workshops.",
    "The company publishes a yearly sustainability report and has pledged to cut its emissions sharply.",
    "Its revenue is not disclosed, but analysts consider it one of the larger firms in its sector.",
    "The company survived a difficult period of losses by selling its consumer division and concentrating on industrial customers.",
    "Management is known for a cautious strategy that favours gradual improvements over risky acquisitions.",
    "Its apprenticeship scheme is regarded as one of the best in the industry.",
    "The company has been involved in several long patent disputes with larger competitors.",
]

_CITY_FILLER = [
    "Its old town is known for narrow streets, timber-framed houses and a large covered market.",
    "The local economy was historically based on textiles and trade, while today services dominate.",
    "The city has a university, a concert hall and several museums devoted to regional history.",
    "Winters are cold and damp, while summers are mild with frequent afternoon showers.",
    "A tram network connects the centre with the outlying districts.",
    "Every autumn the city hosts a week-long festival of folk music and street theatre.",
    "The cathedral, begun in the Middle Ages, took several centuries to complete.",
    "Much of the centre was rebuilt after a great fire destroyed many of its wooden buildings.",
    "Local cuisine is known for smoked fish, dark rye bread and sweet pastries.",
    "Parks and allotment gardens cover a large share of the city's area.",
    "The main railway station lies a short walk from the old town.",
    "The city council has invested heavily in cycle lanes and pedestrian streets.",
    "Its football club has a loyal following despite rarely winning national titles.",
    "Tourism grew quickly once the historic bridges and merchant houses were restored.",
]


# ============================================================================== the world
@dataclass
class _Entity:
    kind: str                     # person | product | company | city | country
    name: str                     # full display name
    key: str                      # distinctive word(s): the gold answer when this entity is one
    facts: dict = field(default_factory=dict)
    doc_id: Optional[str] = None
    text: Optional[str] = None


class _Names:
    """Syllable-generated names, each word used once in the whole world."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set = set()

    def _word(self, syllables: int) -> str:
        rng = self.rng
        parts = []
        for i in range(syllables):
            coda = rng.choice(_LAST_CODAS if i == syllables - 1 else _CODAS)
            parts.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + coda)
        return "".join(parts)

    def word(self, syllables=(2, 3), suffix: str = "") -> str:
        for _ in range(10_000):
            w = (self._word(self.rng.choice(syllables) if isinstance(syllables, tuple) else syllables)
                 + suffix)
            if (not 4 <= len(w) <= 10 or re.search(r"(.)\1|[^aeiouy]{3}|[aeiouy]{3}", w)
                    or w in self.used):
                continue
            self.used.add(w)
            return w.capitalize()
        raise RuntimeError("ran out of names")  # pragma: no cover


def _pronouns(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"p": "she", "P": "She", "o": "her", "s": "her", "S": "Her"}
    return {"p": "he", "P": "He", "o": "him", "s": "his", "S": "His"}


def _sizes(n_questions: int) -> dict:
    n = max(1, int(n_questions))
    return {
        "countries": 4 + n // 100,
        "cities": 10 + n // 20,
        "companies": 8 + n // 16,
        "products": 10 + n // 7,
        "people_extra": 10 + n // 10,
    }


def _build_world(rng: random.Random, n_questions: int) -> dict:
    names = _Names(rng)
    size = _sizes(n_questions)
    countries = [_Entity("country", c, c) for c in
                 (names.word((1, 2), rng.choice(_COUNTRY_SUFFIXES)) for _ in range(size["countries"]))]
    rivers = [names.word((2,)) for _ in range(max(3, size["cities"] * 2 // 3))]
    cities = []
    for i in range(size["cities"]):
        name = names.word((1, 2), rng.choice(_CITY_SUFFIXES))
        country = countries[i] if i < len(countries) else rng.choice(countries)
        cities.append(_Entity("city", name, name, {"country": country.name, "river": rng.choice(rivers)}))

    def person() -> _Entity:
        first, last = names.word((2,)), names.word((2, 3))
        prof, topic = rng.choice(_PROFESSIONS)
        return _Entity("person", f"{first} {last}", f"{first} {last}", {
            "birthplace": rng.choice(cities).name, "birth_year": rng.randint(1941, 1990),
            "profession": prof, "topic": topic, "pronouns": _pronouns(rng), "last": last})

    people: list = []
    companies = []
    for _ in range(size["companies"]):
        core = names.word((2, 3))
        founded = rng.randint(1962, 2006)
        founder = person()
        founder.facts["birth_year"] = founded - rng.randint(24, 46)
        people.append(founder)
        companies.append(_Entity("company", f"{core} {rng.choice(_COMPANY_SUFFIXES)}", core, {
            "hq": rng.choice(cities).name, "founder": founder.name, "founded": founded,
            "industry": rng.choice(_INDUSTRIES)}))
    for founder, company in zip(people, companies):  # most founders still work at their company
        founder.facts["employer"] = (company if rng.random() < 0.6 else rng.choice(companies)).name

    products = []
    for _ in range(size["products"]):
        maker = rng.choice(companies)
        cat, (lo, hi), use = rng.choice(_CATEGORIES)
        name = f"{names.word((2, 3))} {rng.choice(_PRODUCT_MODELS)}"
        leader = person()
        leader.facts["employer"] = (maker if rng.random() < 0.7 else rng.choice(companies)).name
        people.append(leader)
        products.append(_Entity("product", name, name, {
            "maker": maker.name, "leader": leader.name, "weight": rng.randint(lo, hi),
            "launch_year": rng.randint(max(1990, maker.facts["founded"] + 2), 2024),
            "category": cat, "use": use}))
    for _ in range(size["people_extra"]):
        p = person()
        p.facts["employer"] = rng.choice(companies).name
        people.append(p)
    rng.shuffle(people)

    world = {"city": cities, "company": companies, "product": products, "person": people,
             "country": countries}
    world["by_name"] = {e.name: e for kind in ("city", "company", "product", "person", "country")
                        for e in world[kind]}
    for kind in ("city", "company", "product", "person"):
        for e in world[kind]:
            e.doc_id = f"{kind}-{e.name.lower().replace(' ', '-')}"
            e.text = _render(e, rng, world)
    return world


# ============================================================================== documents
def _paragraphs(rng: random.Random, lead: list, facts: list, filler: list, target_words: int) -> str:
    """Title-less body: the lead sentences open the page; the other fact sentences and filler
    sentences (added until ``target_words``) are spread over 2-4 paragraphs in random order."""
    words = sum(len(s.split()) for s in lead + facts)
    pool = list(filler)
    rng.shuffle(pool)
    chosen = []
    while pool and words < target_words:
        s = pool.pop()
        chosen.append(s)
        words += len(s.split())
    body = list(facts) + chosen
    rng.shuffle(body)
    # 2-4 paragraphs of at least two sentences each (the first one also holds the lead)
    n_par = max(1, min(rng.randint(2, 4), len(body) // 2))
    sizes = [2] * n_par
    for _ in range(len(body) - 2 * n_par):
        sizes[rng.randrange(n_par)] += 1
    pars, start = [], 0
    for size in sizes:
        pars.append(body[start:start + size])
        start += size
    pars[0] = lead + pars[0]
    return "\n\n".join(" ".join(p) for p in pars if p)


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[:1].lower() in "aeiou" else "a ") + noun_phrase


def _fill(templates: Sequence[str], **kw) -> list:
    return [t.format(**kw) for t in templates]


def _render(e: _Entity, rng: random.Random, world: dict) -> str:
    f = e.facts
    target = rng.randint(150, 255)
    if e.kind == "person":
        pr = f["pronouns"]
        name, last = e.name, f["last"]
        company = f["employer"]
        lead = [rng.choice([
            f"{name} is {_a(f['profession'])} whose work has focused on {f['topic']}.",
            f"{name} is {_a(f['profession'])} best known for work on {f['topic']}.",
        ])]
        facts = [
            rng.choice([
                f"{last} was born in {f['birthplace']} in {f['birth_year']}, and showed an early interest in {rng.choice(_INTERESTS)}.",
                f"{name} was born in the city of {f['birthplace']} in {f['birth_year']}.",
                f"Born in {f['birth_year']} in {f['birthplace']}, {last} was the youngest of three children.",
            ]),
            rng.choice([
                f"{pr['P']} currently works for {company}, where {pr['p']} leads a small team of specialists.",
                f"{last} is currently employed by {company}.",
                f"At present {last} works at {company}, having joined the company after several years in research.",
            ]),
        ]
        filler = _fill(_PERSON_FILLER, **pr)
    elif e.kind == "product":
        maker, leader = f["maker"], f["leader"]
        lead = [rng.choice([
            f"The {e.name} is {_a(f['category'])} made by {maker}, intended for {f['use']}.",
            f"The {e.name} is {_a(f['category'])} designed for {f['use']} and manufactured by {maker}.",
        ])]
        facts = [
            rng.choice([
                f"Development of the {e.name} was led by {leader}.",
                f"The team that developed the {e.name} was led by {leader}.",
                f"{leader} led the development of the {e.name} from the first sketches to production.",
            ]),
            rng.choice([
                f"The {e.name} weighs {f['weight']} kilograms.",
                f"It has a total weight of {f['weight']} kilograms.",
                f"The complete unit weighs {f['weight']} kilograms.",
            ]),
            rng.choice([
                f"The {e.name} was launched in {f['launch_year']}.",
                f"It was first released in {f['launch_year']}.",
                f"The {e.name} went on sale in {f['launch_year']}.",
            ]),
        ]
        filler = _PRODUCT_FILLER
    elif e.kind == "company":
        hq, founder = f["hq"], f["founder"]
        lead = [rng.choice([
            f"{e.name} is a maker of {f['industry']} headquartered in {hq}.",
            f"{e.name} is a manufacturer of {f['industry']}, with its headquarters in {hq}.",
        ])]
        facts = [rng.choice([
            f"The company was founded in {f['founded']} by {founder}.",
            f"{founder} founded the company in {f['founded']}, initially as a small repair business.",
            f"It was established in {f['founded']} by {founder}.",
        ])]
        filler = _COMPANY_FILLER
    elif e.kind == "city":
        lead = [rng.choice([
            f"{e.name} is a city in {f['country']}.",
            f"{e.name} is a mid-sized city in {f['country']}.",
            f"{e.name} is a historic city in {f['country']}.",
        ])]
        facts = [rng.choice([
            f"The {f['river']} River flows through the centre of the city.",
            f"The city lies on both banks of the {f['river']} River.",
            f"{e.name} is built along the {f['river']} River, which was once its main trade route.",
        ])]
        filler = _CITY_FILLER
    else:  # pragma: no cover
        raise ValueError(e.kind)
    return f"{e.name}\n\n" + _paragraphs(rng, lead, facts, filler, target)


# ============================================================================== questions
# kind -> (subject kind, question template, path of fact names). The last fact is the answer;
# the ones before it lead to the bridge entity.
ONE_HOP_KINDS: dict = {
    "person_birthplace": ("person", "In which city was {x} born?", ["birthplace"]),
    "person_birth_year": ("person", "In what year was {x} born?", ["birth_year"]),
    "person_profession": ("person", "What is the profession of {x}?", ["profession"]),
    "person_employer": ("person", "Which company does {x} work for?", ["employer"]),
    "product_weight": ("product", "How many kilograms does the {x} weigh?", ["weight"]),
    "product_launch_year": ("product", "In what year was the {x} launched?", ["launch_year"]),
    "product_maker": ("product", "Which company makes the {x}?", ["maker"]),
    "product_leader": ("product", "Who led the development of the {x}?", ["leader"]),
    "company_hq": ("company", "In which city is {x} headquartered?", ["hq"]),
    "company_founder": ("company", "Who founded {x}?", ["founder"]),
    "company_founded": ("company", "In what year was {x} founded?", ["founded"]),
    "city_country": ("city", "In which country is {x}?", ["country"]),
    "city_river": ("city", "What is the name of the river that flows through {x}?", ["river"]),
}
# Two-hop questions name the relation but not the bridge entity, and say what the second hop asks
# about ("... a company. Who founded that company?"): a 0.5B model given the compact form ("Who
# founded the company that makes X?") mostly stopped at the first hop and answered the bridge.
TWO_HOP_KINDS: dict = {
    "product_leader_birthplace": ("product", "The development of the {x} was led by a person. In which city was that person born?", ["leader", "birthplace"]),
    "product_leader_birth_year": ("product", "The development of the {x} was led by a person. In what year was that person born?", ["leader", "birth_year"]),
    "product_leader_profession": ("product", "The development of the {x} was led by a person. What is the profession of that person?", ["leader", "profession"]),
    "product_maker_hq": ("product", "The {x} is made by a company. In which city is that company headquartered?", ["maker", "hq"]),
    "product_maker_founder": ("product", "The {x} is made by a company. Who founded that company?", ["maker", "founder"]),
    "product_maker_founded": ("product", "The {x} is made by a company. In what year was that company founded?", ["maker", "founded"]),
    "person_employer_hq": ("person", "{x} works for a company. In which city is that company headquartered?", ["employer", "hq"]),
    "person_employer_founder": ("person", "{x} works for a company. Who founded that company?", ["employer", "founder"]),
    "person_birthplace_country": ("person", "{x} was born in a city. In which country is that city?", ["birthplace", "country"]),
    "person_birthplace_river": ("person", "{x} was born in a city. What is the name of the river that flows through that city?", ["birthplace", "river"]),
    "company_hq_country": ("company", "{x} is headquartered in a city. In which country is that city?", ["hq", "country"]),
    "company_hq_river": ("company", "{x} is headquartered in a city. What is the name of the river that flows through that city?", ["hq", "river"]),
    "company_founder_birthplace": ("company", "{x} was founded by a person. In which city was that person born?", ["founder", "birthplace"]),
    "company_founder_birth_year": ("company", "{x} was founded by a person. In what year was that person born?", ["founder", "birth_year"]),
}
# facts whose values are entity names (a tuple: iteration order must not depend on hashing)
_ENTITY_FACTS = ("birthplace", "employer", "maker", "leader", "hq", "founder")


def _gold(world: dict, value: Any, fact: str) -> str:
    """The gold answer of a fact value: a company's distinctive word, the number, the name."""
    if fact in _ENTITY_FACTS or fact == "country":
        return world["by_name"][value].key
    return str(value)


def _mentions(text: str, phrase: str) -> bool:
    return f" {_normalized(phrase)} " in f" {_normalized(text)} "


@functools.lru_cache(maxsize=8192)
def _normalized(text: str) -> str:
    return normalize_answer(text)


def _candidates(world: dict) -> tuple[list, list]:
    """Every valid (kind, subject, needed entities, gold, bridge) per hop count."""
    out: dict = {1: [], 2: []}
    for hops, table in ((1, ONE_HOP_KINDS), (2, TWO_HOP_KINDS)):
        for kind, (subject_kind, _, path) in table.items():
            for subject in world[subject_kind]:
                chain = [subject]
                for fact in path[:-1]:
                    chain.append(world["by_name"][chain[-1].facts[fact]])
                gold = _gold(world, chain[-1].facts[path[-1]], path[-1])
                holder = chain[-1]
                if not _mentions(holder.text, gold):  # pragma: no cover - the renderer states every fact
                    continue
                if hops == 2:
                    # the first document must name the bridge and must not give the answer away
                    if not _mentions(subject.text, holder.name) or _mentions(subject.text, gold):
                        continue
                out[hops].append((kind, subject, chain, gold))
    return out[1], out[2]


def _balanced_pick(rng: random.Random, cands: list, n: int) -> list:
    """``n`` candidates spread evenly over question kinds (round robin over shuffled kinds)."""
    by_kind: dict = {}
    for c in cands:
        by_kind.setdefault(c[0], []).append(c)
    kinds = sorted(by_kind)
    for k in kinds:
        rng.shuffle(by_kind[k])
    rng.shuffle(kinds)
    picked: list = []
    while len(picked) < n and any(by_kind[k] for k in kinds):
        for k in kinds:
            if by_kind[k] and len(picked) < n:
                picked.append(by_kind[k].pop())
    return picked


def _related(world: dict, chain: list) -> list:
    """Entities whose documents a retriever would also bring up for this question: those named in
    the needed documents, and the documents that name the question's entities."""
    names = {e.name for e in chain}
    out = []
    for e in chain:
        for fact in _ENTITY_FACTS:
            if fact in e.facts:
                out.append(world["by_name"][e.facts[fact]])
    for kind in ("product", "company", "person"):
        for e in world[kind]:
            if any(e.facts.get(fact) in names for fact in _ENTITY_FACTS):
                out.append(e)
    seen, uniq = set(names), []
    for e in out:
        if e.name not in seen and e.doc_id is not None:
            seen.add(e.name)
            uniq.append(e)
    return uniq


def _distractors(rng: random.Random, world: dict, chain: list, count: int, allowed=None) -> list:
    """``count`` distractors: up to two related entities, then entities of the chain's kinds, then
    any. ``allowed``: a predicate an entity must pass (None: every entity; the main suite)."""
    needed = {e.name for e in chain}
    chosen: list = []

    def take(pool: list, k: int) -> None:
        pool = [e for e in pool if e.name not in needed and e not in chosen and (allowed is None or allowed(e))]
        chosen.extend(rng.sample(pool, min(k, len(pool))))

    take(_related(world, chain), min(2, count))
    same = [e for kind in dict.fromkeys(x.kind for x in chain) for e in world[kind]]
    take(same, max(0, math.ceil(count * 0.6) - len(chosen)))
    everything = [e for kind in ("city", "company", "product", "person") for e in world[kind]]
    take(everything, count - len(chosen))
    return chosen


def multihop_suite(n_questions: int = 200, seed: int = 0, docs_per_query: int = 8,
                   two_hop_share: float = 0.6) -> tuple[list, list]:
    """Generate the suite: ``(docs, queries)``.

    ``docs``: one :class:`Doc` per entity (cities, companies, products, people), sorted by id.
    ``queries``: ``n_questions`` :class:`Query` objects (ids ``mh0000``...), at least
    ``two_hop_share`` of them two-hop, each with ``docs_per_query`` ``doc_ids`` in retrieval order,
    a short gold ``answer``, ``topic`` = the document holding the answer and
    ``meta = {"hops", "needed", "kind", "subject", "bridge"}`` (``needed``: the documents the
    answer requires, first hop first; ``bridge``: the entity the second hop is about, or None).
    The same arguments give byte-identical output in any process."""
    n_questions, docs_per_query = int(n_questions), int(docs_per_query)
    if n_questions < 1:
        raise ValueError("n_questions must be >= 1")
    if docs_per_query < 2:
        raise ValueError("docs_per_query must be >= 2 (two-hop questions need two documents)")
    if not 0.0 <= two_hop_share <= 1.0:
        raise ValueError("two_hop_share must be in [0, 1]")
    rng, world = _seeded_world(n_questions, seed)
    one, two = _candidates(world)
    n_two = math.ceil(n_questions * two_hop_share)
    n_one = n_questions - n_two
    if len(one) < n_one or len(two) < n_two:  # pragma: no cover - world size grows with n_questions
        raise ValueError(f"cannot generate {n_questions} questions (have {len(one)} one-hop, {len(two)} two-hop)")
    picked = [(1, c) for c in _balanced_pick(rng, one, n_one)] + [(2, c) for c in _balanced_pick(rng, two, n_two)]
    rng.shuffle(picked)

    queries = []
    for i, (hops, (kind, subject, chain, gold)) in enumerate(picked):
        docs = chain + _distractors(rng, world, chain, docs_per_query - len(chain))
        order = [e.doc_id for e in docs]
        rng.shuffle(order)
        queries.append(_query("mh", i, hops, kind, subject, chain, gold, order))
    return _docs(world), queries


def _seeded_world(n_questions: int, seed: int) -> tuple:
    """The generator after building the world, and the world, of ``(n_questions, seed)``."""
    rng = random.Random(f"kvboost-multihop:{int(seed)}")
    return rng, _build_world(rng, n_questions)


def _docs(world: dict) -> list:
    return sorted((Doc(e.doc_id, e.text) for kind in ("city", "company", "product", "person")
                   for e in world[kind]), key=lambda d: d.id)


def _entities(world: dict) -> list:
    return [e for kind in ("city", "company", "product", "person") for e in world[kind]]


def _query(set_name: str, i: int, hops: int, kind: str, subject, chain: list, gold: str, order: list,
           **meta) -> Query:
    template = (ONE_HOP_KINDS if hops == 1 else TWO_HOP_KINDS)[kind][1]
    needed = [e.doc_id for e in chain]
    return Query(id=f"{set_name}{i:04d}", question=template.format(x=subject.name), answer=gold, doc_ids=order,
                 topic=needed[-1],
                 meta={"hops": hops, "needed": needed, "kind": kind, "subject": subject.name,
                       "bridge": chain[1].name if hops == 2 else None, **meta})


def _leakage_queries(rng: random.Random, world: dict, one: list, n: int, docs_per_query: int) -> list:
    """One-hop questions without their answer document (see the module docstring)."""
    out: list = []
    for kind, subject, chain, gold in _balanced_pick(rng, one, len(one)):
        if len(out) >= n:
            break

        def allowed(e, subject=subject, gold=gold) -> bool:   # nothing given may state the answer
            return e is not subject and not _mentions(e.text, gold)

        same = [e for e in world[subject.kind] if allowed(e)]
        if not same:  # pragma: no cover - every kind has many entities
            continue
        replacement = rng.choice(same)
        others = _distractors(rng, world, [subject, replacement], docs_per_query - 1, allowed)
        docs = [replacement] + others
        if len(docs) < docs_per_query:  # pragma: no cover - the world is far larger than a prompt
            continue
        order = [e.doc_id for e in docs]
        rng.shuffle(order)
        q = _query("leak", len(out), 1, kind, subject, chain, gold, order, set="leakage",
                   answer_doc=subject.doc_id, replacement=replacement.doc_id)
        q.meta["needed"] = []      # nothing given holds the answer
        out.append(q)
    return out


def _unrelated(world: dict, chain: list, gold: str):
    """A predicate: the entity shares no entity with the question's chain (it does not name a chain
    entity, no chain document names it, it is not related by a fact link) and does not contain the
    gold answer."""
    related = {e.name for e in _related(world, chain)} | {e.name for e in chain}

    def ok(e) -> bool:
        return (e.name not in related and not _mentions(e.text, gold)
                and not any(_mentions(e.text, c.name) or _mentions(c.text, e.name) for c in chain))
    return ok


def _random_distractor_queries(rng: random.Random, world: dict, one: list, two: list, n: int,
                               docs_per_query: int, two_hop_share: float) -> list:
    """The needed documents plus random unrelated documents (see the module docstring)."""
    n_two = math.ceil(n * two_hop_share)
    picked = ([(1, c) for c in _balanced_pick(rng, one, n - n_two)]
              + [(2, c) for c in _balanced_pick(rng, two, n_two)])
    rng.shuffle(picked)
    everything = _entities(world)
    out: list = []
    for hops, (kind, subject, chain, gold) in picked:
        ok = _unrelated(world, chain, gold)
        pool = [e for e in everything if ok(e)]
        count = docs_per_query - len(chain)
        if len(pool) < count:  # pragma: no cover - the world is far larger than a prompt
            continue
        docs = list(chain) + rng.sample(pool, count)
        order = [e.doc_id for e in docs]
        rng.shuffle(order)
        out.append(_query("rand", len(out), hops, kind, subject, chain, gold, order, set="random_distractors"))
    return out


def guard_sets(n_questions: int = 200, seed: int = 0, docs_per_query: int = 8, two_hop_share: float = 0.6,
               *, leakage: int = 0, distractors: int = 0) -> dict:
    """The faithfulness guard's query sets over the world and documents of
    ``multihop_suite(n_questions, seed, docs_per_query)``: ``{"leakage": [Query], "random_distractors":
    [Query]}`` with ``leakage`` and ``distractors`` questions (0 = an empty list).

    * ``leakage`` queries (ids ``leak0000``...): one-hop; ``doc_ids`` never hold the answer document
      (``meta["answer_doc"]``, also ``topic``) nor any document containing the gold answer; one slot
      is another entity of the answer document's kind (``meta["replacement"]``); ``meta["needed"]``
      is empty.
    * ``random_distractors`` queries (ids ``rand0000``...): the needed documents plus documents
      unrelated to the question (see the module docstring), ``two_hop_share`` of them two-hop.

    Same arguments, same bytes in any process; drawn with a generator of their own, so the main
    suite's queries do not change."""
    n_questions, docs_per_query = int(n_questions), int(docs_per_query)
    leakage, distractors = int(leakage), int(distractors)
    if leakage < 0 or distractors < 0:
        raise ValueError("leakage and distractors must be >= 0")
    if docs_per_query < 2:
        raise ValueError("docs_per_query must be >= 2 (two-hop questions need two documents)")
    _, world = _seeded_world(n_questions, seed)
    one, two = _candidates(world)
    out: dict = {"leakage": [], "random_distractors": []}
    if leakage:
        rng = random.Random(f"kvboost-multihop:{int(seed)}:leakage")
        out["leakage"] = _leakage_queries(rng, world, one, leakage, docs_per_query)
    if distractors:
        rng = random.Random(f"kvboost-multihop:{int(seed)}:random-distractors")
        out["random_distractors"] = _random_distractor_queries(rng, world, one, two, distractors,
                                                               docs_per_query, two_hop_share)
    for name, want in (("leakage", leakage), ("random_distractors", distractors)):
        if len(out[name]) < want:
            raise ValueError(f"cannot generate {want} {name} questions from a world of {n_questions} "
                             f"questions (got {len(out[name])}); raise --suite-size")
    return out


# ================================================================================ metrics
def answer_correct(prediction: Optional[str], gold: Optional[str]) -> bool:
    """The normalized gold answer (SQuAD normalization) appears as whole words in the normalized
    prediction: gold ``"14"`` matches "It weighs 14 kilograms." but not "140 kg"."""
    if prediction is None or gold is None:
        return False
    return bool(contains_answer(prediction, gold))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def first_answer(text: Optional[str]) -> str:
    """The normalized first line/sentence of a generation (its answer, before any elaboration)."""
    for part in _SENTENCE_END.split(text or ""):
        norm = normalize_answer(part)
        if norm:
            return norm
    return ""


def answers_agree(prediction: Optional[str], reference: Optional[str], gold: Optional[str] = None) -> bool:
    """Whether a generation gives the same answer as a reference generation (e.g. a reuse method
    against the full prefill), for free-text outputs:

    * with a gold answer: both correct -> agree; exactly one correct -> disagree (the verdict
      differs, whatever the wording); both wrong -> agree only when their first answer sentences
      are the same (same wrong answer);
    * without one: same normalized first line/sentence (:func:`first_answer`), non-empty.
    """
    if gold is not None:
        a, b = answer_correct(prediction, gold), answer_correct(reference, gold)
        if a or b:
            return a and b
    fa, fb = first_answer(prediction), first_answer(reference)
    return bool(fa) and fa == fb


def _hops_of(row: Mapping) -> Optional[int]:
    if "hops" in row:
        return int(row["hops"])
    meta = row.get("meta") or {}
    return int(meta["hops"]) if "hops" in meta else None


def _correct_of(row: Mapping) -> float:
    if row.get("correct") is not None:
        return float(row["correct"])
    pred = row.get("prediction", row.get("text"))
    gold = row.get("gold", row.get("answer"))
    return float(answer_correct(pred, gold))


def accuracy_by_hops(rows: Iterable[Mapping]) -> dict:
    """Accuracy with a 95% confidence interval, overall and per hop count.

    Each row is a mapping with the hop count (``"hops"``, or ``"meta": {"hops": ...}``) and either
    ``"correct"`` (bool/0-1) or a prediction (``"prediction"`` or ``"text"``) and a gold answer
    (``"gold"`` or ``"answer"``). Returns ``{"overall"|"one_hop"|"two_hop": {"n", "accuracy",
    "ci95"}}`` (``accuracy`` None with no rows, ``ci95`` None with fewer than two)."""
    groups: dict = {"overall": [], "one_hop": [], "two_hop": []}
    for row in rows:
        c = _correct_of(row)
        groups["overall"].append(c)
        hops = _hops_of(row)
        if hops == 1:
            groups["one_hop"].append(c)
        elif hops == 2:
            groups["two_hop"].append(c)
    out = {}
    for name, vals in groups.items():
        mean, ci = mean_ci95(vals)
        if ci is not None:
            ci = [max(0.0, ci[0]), min(1.0, ci[1])]
        out[name] = {"n": len(vals), "accuracy": mean, "ci95": ci}
    return out


def retention_by_hops(reference: Sequence, method: Sequence, hops: Sequence) -> dict:
    """:func:`kvboost_rag_bench.metrics.retention` overall and per hop count: ``{"overall" |
    "one_hop" | "two_hop": {"k", "n", "share", "ci95", "count"}}``. ``reference`` / ``method``:
    per-question verdicts (truthy = correct), ``hops``: each question's hop count (1, 2 or None)."""
    if not len(reference) == len(method) == len(hops):
        raise ValueError("retention_by_hops: reference, method and hops must have one entry per question")
    out = {"overall": retention(reference, method)}
    for name, h in (("one_hop", 1), ("two_hop", 2)):
        idx = [i for i, x in enumerate(hops) if x is not None and int(x) == h]
        out[name] = retention([reference[i] for i in idx], [method[i] for i in idx])
    return out
