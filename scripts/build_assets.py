"""Generate the bundled datasets (with --tokenizer also the tokenizer) under dist_tune/assets/, seeded, offline.

Usage: python scripts/build_assets.py [--seed 1234] [--tokenizer]

The shipped tokenizer was trained (--tokenizer) on an earlier instructions.jsonl of all ten tasks; the data files
are rebuilt without touching it.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS = Path(__file__).resolve().parent.parent / "dist_tune" / "assets"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 2048

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "green", "house", "music", "ocean",
         "pencil", "garden", "window", "rabbit", "silver", "candle", "forest", "train", "yellow", "mirror",
         "winter", "orange", "castle", "dragon", "paper", "honey", "violin", "planet", "rocket")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
            "early": "late", "open": "closed", "full": "empty", "hard": "soft", "young": "old", "rich": "poor",
            "strong": "weak", "wet": "dry", "loud": "quiet", "tall": "short", "clean": "dirty", "near": "far",
            "high": "low", "thick": "thin", "first": "last", "win": "lose", "push": "pull", "day": "night",
            "good": "bad", "true": "false", "inside": "outside", "begin": "end", "buy": "sell", "give": "take"}
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
            "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
            "Portugal": "Lisbon", "Austria": "Vienna", "Hungary": "Budapest", "Finland": "Helsinki",
            "Denmark": "Copenhagen", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
            "Brazil": "Brasilia", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Australia": "Canberra",
            "Turkey": "Ankara", "Thailand": "Bangkok", "Vietnam": "Hanoi"}


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng):
    w = _words(rng, 2, 8)
    instruction = rng.choice(["Reverse the order of the words.", "Write these words in reverse order."])
    return instruction, " ".join(w), " ".join(w[::-1])


def _upper(rng):
    w = _words(rng, 1, 5)
    instruction = rng.choice(["Write the phrase in capital letters.", "Convert the phrase to uppercase."])
    return instruction, " ".join(w), " ".join(w).upper()


def _add(rng):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", "", str(a + b)
    return "Add the two numbers.", f"{a} and {b}", str(a + b)


def _sort_numbers(rng):
    nums = [rng.randint(0, 30) for _ in range(rng.randint(3, 8))]
    return "Sort the numbers from smallest to largest.", " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _sort_letters(rng):
    letters = rng.sample(LETTERS, rng.randint(3, 8))
    return "Sort these letters alphabetically.", " ".join(letters), " ".join(sorted(letters))


def _antonym(rng):
    word, opposite = rng.choice(list(ANTONYMS.items()))
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return rng.choice([f"What is the opposite of {word}?", f"Give the antonym of the word {word}."]), "", opposite


def _capital(rng):
    country, capital = rng.choice(list(CAPITALS.items()))
    if rng.random() < 0.7:
        return f"What is the capital of {country}?", "", capital
    return "Name the capital city of this country.", country, capital


def _count(rng):
    w = [rng.choice(WORDS[:8]) for _ in range(rng.randint(1, 9))]
    return "How many words are in the list?", " ".join(w), str(len(w))


def _repeat(rng):
    word, n = rng.choice(WORDS), rng.randint(1, 8)
    return f"Repeat the word {word} {n} times.", "", " ".join([word] * n)


def _first_last(rng):
    w = _words(rng, 2, 7)
    if rng.random() < 0.5:
        return "What is the first word in the list?", " ".join(w), w[0]
    return "What is the last word in the list?", " ".join(w), w[-1]


# The tasks of the chat conversations, recall (capitals, antonyms) included.
TASKS = (_reverse, _upper, _add, _sort_numbers, _sort_letters, _antonym, _capital, _count, _repeat, _first_last)


def _first_word(rng):
    w = _words(rng, 2, 6)
    return "What is the first word?", " ".join(w), w[0]


def _last_word(rng):
    w = _words(rng, 2, 6)
    return "What is the last word?", " ".join(w), w[-1]


def _count_words(rng):
    w = _words(rng, 1, 6)
    return "How many words are there?", " ".join(w), str(len(w))


def _capital_letters(rng):
    w = _words(rng, 1, 3)
    return "Write the words in capital letters.", " ".join(w), " ".join(w).upper()


def _repeat_word(rng):
    word, n = rng.choice(WORDS), rng.randint(2, 4)
    return f"Repeat the word {n} times.", word, " ".join([word] * n)


def _reverse_words(rng):
    w = _words(rng, 2, 4)
    return "Reverse the order of the words.", " ".join(w), " ".join(w[::-1])


# Answered from the prompt alone by a rule (unlike a capital or an antonym, which only memory gives), so a model
# can answer prompts it never saw; short enough that the demo's small model learns them in about a minute.
RULE_TASKS = (_first_word, _last_word, _count_words, _capital_letters, _repeat_word, _reverse_words)


def instructions(rng: random.Random, n: int) -> list[dict]:
    """n rows of RULE_TASKS, no prompt twice: rows held out of any split ask what no training row asks."""
    rows, prompts = [], set()
    while len(rows) < n:
        instruction, inp, out = rng.choice(RULE_TASKS)(rng)
        if (instruction, inp) not in prompts:
            prompts.add((instruction, inp))
            rows.append({"instruction": instruction, "input": inp, "output": out})
    return rows


NAMES = ("Tom", "Anna", "Lena", "Omar", "Mia", "Ravi", "Sara", "Ben", "Yuki", "Leo")
ANIMALS = ("dog", "cat", "bird", "horse", "fox", "rabbit", "tiger", "owl")
ADJECTIVES = ("small", "old", "quiet", "bright", "happy", "tired", "clever", "brave", "green", "little")
PLACES = ("river", "garden", "forest", "market", "house", "hill", "school", "station", "beach", "library")
VERBS = ("walked to", "ran to", "looked at", "slept near", "sang in", "waited by", "played in", "jumped over")
FRUITS = ("apples", "pears", "oranges", "plums", "lemons", "books", "pencils", "coins")
WEATHER = ("sunny", "cold", "windy", "rainy", "warm", "cloudy")


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {rng.choice(PLACES)}."
    if kind == 1:
        country = rng.choice(list(CAPITALS))
        return f"The capital of {country} is {CAPITALS[country]}."
    if kind == 2:
        name, thing, a, b = rng.choice(NAMES), rng.choice(FRUITS), rng.randint(1, 9), rng.randint(1, 9)
        return f"{name} has {a} {thing}. {name} gets {b} more. Now {name} has {a + b} {thing}."
    if kind == 3:
        word, opposite = rng.choice(list(ANTONYMS.items()))
        return f"The opposite of {word} is {opposite}."
    if kind == 4:
        return f"It was {rng.choice(WEATHER)} in the {rng.choice(PLACES)}, so {rng.choice(NAMES)} stayed there all day."
    return f"{rng.choice(NAMES)} and {rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(PLACES)} together."


def texts(rng: random.Random, n: int) -> list[dict]:
    return [{"text": " ".join(_sentence(rng) for _ in range(rng.choice((1, 2, 3, 4, 6, 8, 12, 16))))} for _ in range(n)]


PRODUCTS = ("phone", "blender", "chair", "jacket", "laptop", "book", "lamp", "kettle", "backpack", "camera")
ASPECTS = ("battery", "design", "price", "quality", "screen", "color", "size", "sound", "material", "delivery")
POSITIVE = {"adj": ("great", "excellent", "wonderful", "fantastic", "perfect", "amazing", "superb", "lovely"),
            "verb": ("love", "really like", "enjoy", "adore"),
            "close": ("I would recommend it to everyone.", "Very happy with this purchase.", "Five stars.",
                      "Worth every penny.", "I will buy it again.")}
NEGATIVE = {"adj": ("terrible", "awful", "poor", "disappointing", "horrible", "useless", "cheap", "bad"),
            "verb": ("hate", "really dislike", "regret buying", "cannot stand"),
            "close": ("I want a refund.", "Do not buy this.", "One star.", "A complete waste of money.",
                      "I am sending it back.")}
NEUTRAL = ("I bought it last month.", "It arrived on a Tuesday.", "My sister uses one too.",
           "I use it every day.", "It came in a blue box.")


def _review(rng: random.Random, words: dict) -> str:
    product, aspect = rng.choice(PRODUCTS), rng.choice(ASPECTS)
    parts = [rng.choice([f"I {rng.choice(words['verb'])} this {product}.",
                         f"This {product} is {rng.choice(words['adj'])}.",
                         f"What a {rng.choice(words['adj'])} {product}."])]
    if rng.random() < 0.6:
        parts.append(f"The {aspect} is {rng.choice(words['adj'])}.")
    if rng.random() < 0.4:
        parts.insert(rng.randint(0, len(parts)), rng.choice(NEUTRAL))
    if rng.random() < 0.5:
        parts.append(rng.choice(words["close"]))
    return " ".join(parts)


def sentiment(rng: random.Random, n: int, positive_share: float = 0.55) -> list[dict]:
    labels = ["positive"] * round(n * positive_share) + ["negative"] * (n - round(n * positive_share))
    rng.shuffle(labels)
    return [{"text": _review(rng, POSITIVE if label == "positive" else NEGATIVE), "label": label} for label in labels]


SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.",
                  "You are a careful assistant. Give only the answer.")


def _user_turn(instruction: str, inp: str) -> str:
    return f"{instruction}\n{inp}" if inp else instruction


def _follow_up(rng: random.Random, answer: str) -> tuple[str, str] | None:
    """A question about the previous answer, with its answer; None when the answer invites none."""
    if answer.isdigit():
        k = rng.randint(1, 9)
        return f"Now add {k} to that.", str(int(answer) + k)
    words = answer.split()
    if not all(w.isalpha() for w in words):
        return None
    kind = rng.randrange(3)
    if kind == 0:
        return "Now write that in capital letters.", answer.upper()
    if kind == 1 and len(words) > 1:
        return "Now reverse that.", " ".join(reversed(words))
    return "How many words is that?", str(len(words))


def chats(rng: random.Random, n: int) -> list[dict]:
    """OpenAI-style `messages`: an optional system turn, then 1-3 user/assistant pairs; later questions often
    refer to the previous answer."""
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.4 else []
        answer = None
        for _ in range(rng.randint(1, 3)):
            follow = _follow_up(rng, answer) if answer is not None and rng.random() < 0.6 else None
            if follow is None:
                instruction, inp, answer = rng.choice(TASKS)(rng)
                question = _user_turn(instruction, inp)
            else:
                question, answer = follow
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def train_tokenizer(files: list[Path], out_dir: Path) -> None:
    """Byte-level BPE with <unk>=0 <s>=1 </s>=2 <pad>=3; adds no special tokens on its own."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096, clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name both transformers 4.x and 5.x resolve
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokenizer", action="store_true",
                        help="also retrain the tokenizer on the data (changes every token id; the shipped one is kept)")
    args = parser.parse_args()
    data = ASSETS / "data"
    files = {"instructions.jsonl": instructions(random.Random(args.seed), 3000),
             "text.jsonl": texts(random.Random(args.seed + 1), 2000),
             "sentiment.jsonl": sentiment(random.Random(args.seed + 2), 1200)}
    for name, rows in files.items():
        write_jsonl(data / name, rows)
        print(f"{name}: {len(rows)} rows, {(data / name).stat().st_size / 1024:.0f} KiB")
    write_jsonl(data / "chat.jsonl", chats(random.Random(args.seed + 3), 300))  # not in the tokenizer's corpus
    print(f"chat.jsonl: 300 rows, {(data / 'chat.jsonl').stat().st_size / 1024:.0f} KiB")
    if not args.tokenizer:
        return
    train_tokenizer([data / name for name in files], ASSETS / "tokenizer")
    size = sum(p.stat().st_size for p in (ASSETS / "tokenizer").iterdir())
    print(f"tokenizer: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
