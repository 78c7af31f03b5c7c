"""Write ``data/prompts/tuning.jsonl``: the prompts whose continuations by the model itself are the
EE-Tuning data of ``examples/ee_tuning/smollm2_cpu.sh`` (``tools/generate_tuning_data.py``).

320 prompts, deterministic: plain-text openings and chat-formatted requests (the ChatML turns SmolLM2-Instruct
was trained on) built from 12 templates over 84 everyday topics, and every eighth prompt the start of a
program. None of them is a prompt of the decoding benchmark (``bench/prompts/general.jsonl``), whose topics
are not among these.

    python data/prompts/make_tuning_prompts.py [--out data/prompts/tuning.jsonl]
"""
import argparse
import json
import random

TOPICS = """photosynthesis; the French Revolution; black holes; machine learning; the immune system; volcanoes;
the stock market; climate change; the Roman Republic; quantum computing; honey bees; the printing press;
plate tectonics; the human heart; jazz music; the Silk Road; electric cars; vaccines; the Moon landing;
coral reefs; democracy; the internet; sleep; chess; the Renaissance; rainforests; inflation; DNA;
the solar system; ancient Egypt; recycling; earthquakes; the Industrial Revolution; antibiotics;
artificial intelligence; the ocean tides; photography; the Great Wall of China; meditation; bread baking;
the water cycle; World War I; the theory of evolution; social media; renewable energy; the brain;
gardening; the Olympic Games; mathematics; friendship; coffee; the Cold War; dinosaurs; rivers;
programming languages; the Amazon river; elections; marathons; the speed of light; glaciers; money;
volunteering; cats; the violin; deserts; the Byzantine Empire; magnetism; nutrition; robots; time zones;
public libraries; wind turbines; the Arctic; cheese making; submarines; the human eye; video games;
bridges; hurricanes; the piano; medieval castles; penguins; the periodic table; solar panels""".replace("\n", " ").split(";")
TOPICS = [t.strip() for t in TOPICS if t.strip()]
CODE = ["def fibonacci(n):", "def is_prime(n):", "import numpy as np\n\ndef normalize(x):", "class Stack:\n    def __init__(self):",
        "def binary_search(arr, target):", "# Read a CSV file and print the average of each column\nimport csv\n",
        "function debounce(fn, delay) {", "SELECT name, COUNT(*) FROM orders", "def merge_sort(items):",
        "#include <stdio.h>\n\nint main(void) {", "def reverse_words(sentence):", "async function fetchJson(url) {",
        "def count_vowels(text):", "public class HelloWorld {", "def flatten(nested):", "fn main() {\n    let v = vec![1, 2, 3];"]
TEMPLATES = ["{T} is", "Here is a short explanation of {t}:", "The most important thing to know about {t} is that",
             "Write a short paragraph about {t}.", "Explain {t} to a ten-year-old.", "What are three facts about {t}?",
             "A brief history of {t}.", "Q: Why does {t} matter?\nA:", "My favourite thing about {t} is",
             "Write a short story that involves {t}.", "Give me a list of tips related to {t}.",
             "In this essay, I will discuss {t}."]
CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"

def tuning_prompts(n=320, seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i % 8 == 7:
            out.append(rnd.choice(CODE)); continue
        t = rnd.choice(TOPICS); tpl = rnd.choice(TEMPLATES)
        text = tpl.format(t=t, T=t[0].upper() + t[1:])
        out.append(CHAT.format(q=text) if i % 2 else text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/prompts/tuning.jsonl")
    p.add_argument("--count", type=int, default=320)
    args = p.parse_args()
    with open(args.out, "w", encoding="utf-8") as f:
        for text in tuning_prompts(args.count):
            f.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
