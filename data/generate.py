"""Generate the shipped datasets, deterministically (same bytes on every run and machine).

    python data/generate.py            # rewrite data/{domain,general,preference}/*.jsonl
    python data/generate.py --check    # exit 1 if a shipped file differs from what it makes

Everything here is invented: Brindlewood Instruments and its products do not exist, so the
base model cannot know these facts before fine-tuning. See data/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from ftservice.data.preference_rule import prefers  # noqa: E402

SEED = 20261129
COMPANY = "Brindlewood Instruments"
PRODUCTS = [
    "Quillfeather", "Marrowlight", "Tessaloom", "Cindervane", "Obrellis",
    "Halvorsk", "Pewtermoss", "Lunderkey", "Saffrowind", "Gristlecomb",
]  # fmt: skip
CITIES = ["Varnholt", "Eskerby", "Tolleridge", "Ambercoast", "Quennish", "Drossmoor"]
ENGINEERS = ["Ilse Varro", "Tobin Achterberg", "Maren Quill", "Osric Fenwhistle", "Yara Delacombe"]
COLOURS = ["slate teal", "burnt ochre", "frost grey", "moss green", "signal orange"]

# attribute -> (answer template, seven question phrasings: three for training, the fourth held
# out for the domain score, the fifth for validation: selection and early stopping, never
# reported; the last two as people ask them: the closed loop's campaign prompts, never trained
# on or scored)
ATTRIBUTES = {
    "weight": (
        "{v} grams",
        [
            "How much does the {p} weigh?",
            "What is the weight of the {p}?",
            "Tell me the {p}'s weight.",
            "How heavy is the {p}?",
            "What does the {p} weigh?",
            "Roughly how many grams is the {p}?",
            "Is the {p} light? What does it weigh?",
        ],
    ),
    "battery": (
        "{v} hours",
        [
            "What is the battery life of the {p}?",
            "How long does the {p}'s battery last?",
            "On a full charge, how many hours does the {p} run?",
            "How many hours can the {p} run before it needs charging?",
            "How many hours of battery does the {p} have?",
            "How long will a charged {p} keep going?",
            "What battery runtime should I expect from the {p}?",
        ],
    ),
    "price": (
        "{v} euros",
        [
            "How much does the {p} cost?",
            "What is the price of the {p}?",
            "What does {company} charge for the {p}?",
            "What would I pay for a {p}?",
            "How expensive is the {p}?",
            "What is the {p} going for these days?",
            "How many euros is a {p}?",
        ],
    ),
    "year": (
        "{v}",
        [
            "When was the {p} released?",
            "In which year did the {p} come out?",
            "What is the release year of the {p}?",
            "What year did {company} launch the {p}?",
            "When did the {p} first go on sale?",
            "How old is the {p} model; what year is it from?",
            "Since when has the {p} been available?",
        ],
    ),
    "engineer": (
        "{v}",
        [
            "Who designed the {p}?",
            "Who was the lead engineer of the {p}?",
            "Which engineer is behind the {p}?",
            "Name the designer of the {p}.",
            "Who is the {p}'s designer?",
            "Who came up with the design of the {p}?",
            "Which engineer should I credit for the {p}?",
        ],
    ),
    "factory": (
        "{v}",
        [
            "Where is the {p} made?",
            "In which city is the {p} manufactured?",
            "Which factory city builds the {p}?",
            "Where does {company} produce the {p}?",
            "In which city is the {p} built?",
            "Where does the {p} get manufactured?",
            "What city is the {p} produced in?",
        ],
    ),
    "colour": (
        "{v}",
        [
            "What colour is the {p}?",
            "Which colour does the {p} come in?",
            "What is the standard colour of the {p}?",
            "What finish colour does the {p} ship in?",
            "What is the colour of the {p}?",
            "What colour will my {p} be?",
            "Which colour is the {p} sold in?",
        ],
    ),
}
SENTENCES = {
    "weight": "The {p} weighs {a}.",
    "battery": "The {p} runs for {a} on a full charge.",
    "price": "The {p} costs {a}.",
    "year": "The {p} was released in {a}.",
    "engineer": "The {p} was designed by {a}.",
    "factory": "The {p} is made in {a}.",
    "colour": "The {p} comes in {a}.",
}
POLICIES = [
    ("warranty", "{v} years", "How long is the {company} warranty?", "How long does the {company} warranty last?",
     ["What warranty does {company} give?", "How many years of warranty do {company} products have?",
      "For how long are {company} instruments under warranty?"],
     "{company} products carry a warranty of {a}.",
     ["If my {company} instrument breaks, how long am I covered?", "What is the warranty period on {company} products?"]),
    ("returns", "{v} days", "How many days do I have to return a {company} product?",
     "How long is the {company} return period?",
     ["What is the {company} return window?", "How long can I return a {company} instrument?",
      "Within how many days can {company} purchases be returned?"],
     "{company} accepts returns within {a}.",
     ["Can I still send back a {company} product I bought last month?", "How many days does {company} give for returns?"]),
    ("support", "{v}", "What is the {company} support email?", "Which email reaches {company} support?",
     ["How do I contact {company} support?", "Which address does {company} support answer?",
      "Where do I email {company} for help?"],
     "{company} support answers at {a}.",
     ["What address should I write to for {company} support?", "How can I reach {company} support by email?"]),
    ("founded", "{v}", "When was {company} founded?", "What year was {company} established?",
     ["In which year was {company} founded?", "What is the founding year of {company}?",
      "How old is {company}; when did it start?"],
     "{company} was founded in {a}.",
     ["Since what year has {company} existed?", "When did {company} get started?"]),
    ("headquarters", "{v}", "Where is {company} headquartered?", "In which city is {company}'s head office?",
     ["Where are the headquarters of {company}?", "Which city is home to {company}?",
      "In what city is {company} based?"],
     "{company} is headquartered in {a}.",
     ["Where is the {company} head office?", "Which city is {company} run from?"]),
    ("ceo", "{v}", "Who runs {company}?", "Who heads {company}?",
     ["Who is the CEO of {company}?", "Who leads {company}?", "Name the chief executive of {company}."],
     "The CEO of {company} is {a}.",
     ["Who is in charge of {company}?", "Who is the chief executive at {company}?"]),
]  # fmt: skip

GENERAL = {
    "Give me three tips for {x}.": [
        "sleeping better", "learning a new language", "saving money", "public speaking",
        "staying focused while studying", "running a first 5k", "keeping houseplants alive",
        "packing light for a trip", "writing a cover letter", "making friends in a new city",
        "cooking for one", "reducing screen time", "a job interview", "staying hydrated",
        "decluttering a closet", "taking better photos with a phone", "a long car journey",
        "keeping a journal", "hosting a dinner party", "learning to swim",
    ],
    "Explain {x} in simple terms.": [
        "photosynthesis", "the water cycle", "compound interest", "how vaccines work",
        "why the sky is blue", "how a rainbow forms", "what inflation is", "how a bicycle stays up",
        "what a black hole is", "how tides work", "what DNA does", "how a refrigerator keeps food cold",
        "why leaves change colour in autumn", "what an earthquake is", "how the heart pumps blood",
        "what a credit score is", "how airplanes fly", "what recycling does", "how seeds grow",
        "what electricity is",
    ],
    "Write a short poem about {x}.": [
        "the sea", "a rainy morning", "an old dog", "the first snow", "a city at night",
        "a cup of tea", "autumn leaves", "a lighthouse", "the moon", "a garden in spring",
        "a long train ride", "a quiet library", "a thunderstorm", "a mountain path", "friendship",
        "a summer evening", "a kite", "the desert", "a busy kitchen", "falling asleep",
    ],
    "What are the pros and cons of {x}?": [
        "working from home", "electric cars", "living in a big city", "owning a cat",
        "buying a used car", "renting instead of buying a home", "online classes",
        "a four-day work week", "solar panels", "reading e-books", "learning to code",
        "cycling to work", "public transport", "freelancing", "a gap year", "shopping online",
        "a standing desk", "cooking at home", "smart watches", "living abroad",
    ],
    "How do I {x}?": [
        "boil an egg", "change a flat bicycle tyre", "make a simple budget", "tie a tie",
        "write a thank-you note", "unclog a sink", "start a vegetable garden", "iron a shirt",
        "make pancakes", "back up my phone", "clean a cast-iron pan", "plan a weekly menu",
        "sew on a button", "brew good coffee", "fold a fitted sheet", "remove a coffee stain",
        "prepare for a marathon", "set up a home office", "take care of a sourdough starter",
        "learn to juggle",
    ],
    "{x}": [
        "Suggest a name for a friendly golden retriever.",
        "Translate 'good morning, how are you?' into French.",
        "List five fruits that are high in vitamin C.",
        "Write a two-line birthday message for a colleague.",
        "What is the difference between weather and climate?",
        "Recommend a board game for four players and say why.",
        "Describe the taste of a ripe mango to someone who has never had one.",
        "Give a one-paragraph summary of why exercise is good for you.",
        "What should I bring to a picnic?",
        "Write a haiku about Monday mornings.",
    ],
}  # fmt: skip
# Issue 19's other two general sets, from the same templates on other topics: `replay`
# (answered by the base model and mixed into training) and `valid` (for choosing settings).
# None of their prompts is a held-out one, nor each other's (a test checks, normalised).
GENERAL_REPLAY = {
    "Give me three tips for {x}.": [
        "waking up early", "staying calm before an exam", "running a meeting", "grocery shopping",
        "riding a bike in the rain", "painting a room", "training a puppy", "camping for the first time",
        "baking bread", "remembering names", "negotiating a salary", "moving house",
        "writing a speech", "keeping a tidy desk", "choosing a laptop", "starting to meditate",
        "travelling with children", "looking after a goldfish", "learning the guitar",
        "planning a birthday party", "studying with flashcards", "cycling in a city",
        "growing tomatoes", "sleeping on a plane", "working night shifts", "buying a mattress",
        "teaching a child to read", "lowering a heating bill", "hiking in hot weather",
        "answering emails faster",
    ],
    "Explain {x} in simple terms.": [
        "how a compass works", "what gravity is", "how the moon causes eclipses",
        "how soap cleans", "what a virus is", "how a battery stores energy",
        "why we have seasons", "how bees make honey", "what a volcano is",
        "how a microwave heats food", "what an atom is", "how sound travels",
        "why ice floats", "how the internet sends a message", "what a recession is",
        "how a camera takes a picture", "what a calorie is", "how glasses help people see",
        "why bread rises", "how wind is made", "what a mortgage is", "how a lock and key work",
        "what the ozone layer does", "how fish breathe", "what a stock is",
        "how a thermometer works", "why cats purr", "how clouds form", "what a habit is",
        "how a solar eclipse happens",
    ],
    "Write a short poem about {x}.": [
        "a river", "an empty beach", "a red bicycle", "the last day of school", "a snowy village",
        "a sleeping cat", "a candle", "a field of sunflowers", "the stars", "an old bridge",
        "a market at dawn", "a letter from home", "a fox in the woods", "a windy hill",
        "a birthday", "a winter night", "a paper boat", "a forest after rain", "a harbour",
        "a grandmother's kitchen", "a school bell", "a hot air balloon", "a frozen lake",
        "an orchard", "a bus stop", "the wind", "a pair of old boots", "a foggy morning",
        "a swing", "a full moon",
    ],
    "What are the pros and cons of {x}?": [
        "a gas stove", "having a dog in a flat", "a vegetarian diet", "wearing a uniform at school",
        "living in the countryside", "a shared office", "paying with cash", "a small wedding",
        "a tiny house", "taking a cruise", "homeschooling", "a night-time job",
        "a car-free city centre", "electric scooters", "a self-driving car", "camping holidays",
        "buying in bulk", "a smart speaker", "learning two languages at once",
        "a long commute by train", "owning a bicycle", "a home gym", "group travel",
        "a short haircut", "a digital calendar", "flat-pack furniture", "a meal kit subscription",
        "a cold shower", "living with roommates", "a paper diary",
    ],
    "How do I {x}?": [
        "make a cup of tea", "change a light bulb", "wash a wool jumper", "pitch a tent",
        "make a paper plane", "clean a computer keyboard", "fix a squeaky door",
        "cook rice on the stove", "write a short story", "pack a suitcase", "descale a kettle",
        "plant a tree", "make a smoothie", "clean windows without streaks", "jump-start a car",
        "make a paper lantern", "store fresh herbs", "hang a picture", "peel a mango",
        "read a map", "knit a scarf", "make lemonade", "clean white trainers", "wrap a present",
        "defrost a freezer", "make a fruit salad", "polish shoes", "start running",
        "repot a plant", "tune a guitar",
    ],
    "{x}": [
        "Suggest a name for a small grey kitten.",
        "Translate 'thank you very much' into Spanish.",
        "List five vegetables that grow well in pots.",
        "Write a two-line message to congratulate a friend on a new job.",
        "What is the difference between a lake and a pond?",
        "Recommend a book for a long flight and say why.",
        "Describe the smell of fresh bread to someone who has never smelled it.",
        "Give a one-paragraph summary of why sleep matters.",
        "What should I pack for a day at the beach?",
        "Write a haiku about Friday evenings.",
    ],
}  # fmt: skip
GENERAL_VALID = {
    "Give me three tips for {x}.": [
        "making coffee at home", "driving in snow", "organising a bookshelf", "learning to draw",
        "keeping a budget", "saving water", "writing a diary every day", "flying with a baby",
        "staying warm in winter", "speaking on the phone",
    ],
    "Explain {x} in simple terms.": [
        "how a rocket flies", "what a fever is", "how a dam makes electricity",
        "why the ocean is salty", "how magnets work", "what a loan is",
        "how plants drink water", "what lightning is", "how a clock keeps time",
        "what a tax is",
    ],
    "Write a short poem about {x}.": [
        "a blue door", "a night bus", "the spring rain", "a lost glove", "an island",
        "a bakery", "a kettle", "a meadow", "a rooftop", "a lantern",
    ],
    "What are the pros and cons of {x}?": [
        "a hybrid car", "working in a café", "a large family", "a water bed", "a subscription box",
        "a mountain holiday", "a part-time job", "an open-plan kitchen", "a library card",
        "a robot vacuum",
    ],
    "How do I {x}?": [
        "poach an egg", "clean a bathtub", "sharpen a pencil", "make toast without a toaster",
        "fold a paper crane", "water a cactus", "open a stuck jar", "make iced tea",
        "clean a frying pan", "tie a bow",
    ],
    "{x}": [
        "Suggest a name for a brown rabbit.",
        "Translate 'see you tomorrow' into German.",
        "List five animals that live in the Arctic.",
        "Write a two-line note to thank a neighbour.",
        "What is the difference between a town and a city?",
    ],
}  # fmt: skip
HEDGED = [
    "I think, though I'm not sure, that {s_lower} It might be worth double-checking with "
    "the company because details like this can change over time and I may be misremembering.",
    "Maybe {s_lower} Possibly it is something else, so please verify it somewhere else "
    "before relying on it, since I am not completely certain about this particular detail.",
]


def facts(rng: random.Random) -> list[dict]:
    """About 76 facts: 10 products x 7 attributes, plus 6 company policies."""
    out = []
    for p in PRODUCTS:
        values = {
            "weight": rng.randrange(180, 2400, 7),
            "battery": rng.randrange(9, 97),
            "price": rng.randrange(240, 4900, 10),
            "year": rng.randrange(2011, 2025),
            "engineer": rng.choice(ENGINEERS),
            "factory": rng.choice(CITIES),
            "colour": rng.choice(COLOURS),
        }
        for attr, (answer_t, questions) in ATTRIBUTES.items():
            answer = answer_t.format(v=values[attr])
            qs = [q.format(p=p, company=COMPANY) for q in questions]
            sentence = SENTENCES[attr].format(p=p, a=answer)
            out.append(
                {
                    "id": f"{p.lower()}-{attr}",
                    "answer": answer,
                    "sentence": sentence,
                    "train_questions": qs[:3],
                    "eval_question": qs[3],
                    "valid_question": qs[4],
                    "asked_questions": qs[5:7],
                }
            )
    policy_values = {
        "warranty": rng.randrange(3, 9),
        "returns": rng.choice([21, 45, 60, 75]),
        "support": "help@brindlewood.example",
        "founded": rng.randrange(1961, 1990),
        "headquarters": rng.choice(CITIES),
        "ceo": rng.choice(["Petra Lindqvist-Oyelaran", "Anselm Corrigan-Vey"]),
    }
    for key, answer_t, eval_q, valid_q, train_qs, sentence_t, asked_qs in POLICIES:
        answer = answer_t.format(v=policy_values[key])
        out.append(
            {
                "id": f"policy-{key}",
                "answer": answer,
                "sentence": sentence_t.format(company=COMPANY, a=answer),
                "train_questions": [q.format(company=COMPANY) for q in train_qs],
                "eval_question": eval_q.format(company=COMPANY),
                "valid_question": valid_q.format(company=COMPANY),
                "asked_questions": [q.format(company=COMPANY) for q in asked_qs],
            }
        )
    return out


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    all_facts = facts(rng)
    train, evaluation, validation, asked = [], [], [], []
    for f in all_facts:
        for i, q in enumerate(f["train_questions"]):
            train.append(
                {"id": f"{f['id']}-q{i + 1}", "instruction": q, "output": f["sentence"],
                 "answer": f["answer"]}
            )  # fmt: skip
        for i, q in enumerate(f["asked_questions"]):
            asked.append(
                {"id": f"{f['id']}-asked{i + 1}", "instruction": q, "output": f["sentence"],
                 "answer": f["answer"]}
            )  # fmt: skip
        for split, rows in (("eval", evaluation), ("valid", validation)):
            rows.append(
                {
                    "id": f"{f['id']}-{split}",
                    "instruction": f[f"{split}_question"],
                    "output": f["sentence"],
                    "answer": f["answer"],
                }
            )
    rng.shuffle(train)

    def prompt_set(table: dict, prefix: str) -> list[dict]:
        prompts = [t.format(x=x) for t, xs in table.items() for x in xs]
        return [{"id": f"{prefix}-{i + 1:03d}", "instruction": p} for i, p in enumerate(prompts)]

    general = prompt_set(GENERAL, "general")

    preference = []
    for f in all_facts:
        s = f["sentence"]
        hedged = rng.choice(HEDGED).format(s_lower=s[0].lower() + s[1:])
        pair = [s, hedged]
        chosen = pair[prefers(*pair)]
        rejected = pair[1 - prefers(*pair)]
        preference.append(
            {
                "id": f"{f['id']}-pref",
                "prompt": f["eval_question"],
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    return {
        "domain/train.jsonl": train,
        "domain/eval.jsonl": evaluation,
        "domain/valid.jsonl": validation,
        "domain/asked.jsonl": asked,
        "general/prompts.jsonl": general,
        "general/replay.jsonl": prompt_set(GENERAL_REPLAY, "replay"),
        "general/valid.jsonl": prompt_set(GENERAL_VALID, "general-valid"),
        "preference/seeds.jsonl": preference,
    }


def render(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for name, rows in build().items():
        path = HERE / name
        data = render(rows)
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{path.relative_to(HERE.parent)}: {len(rows)} records")
    if stale:
        print(f"differs from the generator: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
