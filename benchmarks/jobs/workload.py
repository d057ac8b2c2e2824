"""batch_path.py's workload: 50 short general questions x 4 ways of asking = 200 distinct chat prompts (and the same
200 texts as sentences to embed), cycled; written both as `ladle bench serve` custom-dataset JSONL and as OpenAI
batch input JSONL, so the real-time path and the batch path send the very same requests.
"""

from __future__ import annotations

from pathlib import Path

import orjson

QUESTIONS = (
    "Why is the sky blue?",
    "How do bees make honey?",
    "What causes the seasons on Earth?",
    "How does a refrigerator keep food cold?",
    "Why do cats purr?",
    "What is the difference between weather and climate?",
    "How do airplanes stay in the air?",
    "Why does bread rise when it is baked?",
    "What is photosynthesis?",
    "How does a compass work?",
    "Why do leaves change colour in autumn?",
    "What makes a rainbow appear?",
    "How do vaccines protect people from disease?",
    "Why is the ocean salty?",
    "How do volcanoes form?",
    "What is the water cycle?",
    "Why do we have leap years?",
    "How does a bicycle stay upright?",
    "What is gravity?",
    "How do plants know which way is up?",
    "Why do onions make people cry?",
    "How does the heart pump blood?",
    "What is a black hole?",
    "How do birds find their way when they migrate?",
    "Why does ice float on water?",
    "How does a battery store energy?",
    "What causes thunder and lightning?",
    "How is glass made?",
    "Why do we dream?",
    "How do fish breathe under water?",
    "What is the moon made of?",
    "How does a microwave oven heat food?",
    "Why do some animals hibernate?",
    "How are mountains formed?",
    "What is the speed of light?",
    "How does soap clean dirty hands?",
    "Why do stars twinkle?",
    "How do submarines dive and surface?",
    "What is an atom?",
    "How does the internet send a message across the world?",
    "Why do we need sleep?",
    "How do trees grow so tall?",
    "What causes the tides?",
    "How does a camera take a picture?",
    "Why is exercise good for the body?",
    "How do spiders spin webs?",
    "What is the largest desert in the world?",
    "How does paper get made from wood?",
    "Why do we get hiccups?",
    "How does a lighthouse help ships?",
)
STYLES = (
    "{q}",
    "Answer in a few sentences: {q}",
    "Explain to a ten-year-old: {q}",
    "Give three short facts that answer this question. {q}",
)


def prompts() -> list[str]:
    """200 distinct user messages: every question in every style."""
    return [style.format(q=q) for style in STYLES for q in QUESTIONS]


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    """One non-streaming chat request, as `ladle bench serve` sends it (greedy, ignore_eos: every answer is exactly
    max_tokens tokens, so the two paths' throughputs compare)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}


def embedding_body(model: str, text: str) -> dict:
    return {"model": model, "input": text}


def write_bench_dataset(path: Path) -> None:
    """The prompts as `ladle bench serve --dataset-name custom --dataset-path` JSONL."""
    path.write_bytes(b"".join(orjson.dumps({"prompt": p}) + b"\n" for p in prompts()))


def write_batch_input(path: Path, endpoint: str, model: str, lines: int, max_tokens: int = 64) -> int:
    """`lines` OpenAI batch lines cycling through the prompts; returns the file's size in bytes."""
    texts = prompts()
    rows = []
    for i in range(lines):
        text = texts[i % len(texts)]
        body = embedding_body(model, text) if endpoint == "/v1/embeddings" else chat_body(model, text, max_tokens)
        rows.append(orjson.dumps({"custom_id": f"line-{i}", "method": "POST", "url": endpoint, "body": body}))
    data = b"\n".join(rows) + b"\n"
    path.write_bytes(data)
    return len(data)
