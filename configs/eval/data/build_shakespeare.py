"""Build the tinyshakespeare eval sets from the held-out last 10% of the text (run once).

    lmtrain data fetch tinyshakespeare
    python configs/eval/data/build_shakespeare.py [data/tinyshakespeare.txt]

Writes next to this file (fixed seed, so the files are reproducible):
- shakespeare_speeches.jsonl: one held-out speech per line ({"text", "speaker"}) for perplexity
  sliced by speaker (the 8 most frequent speakers; the rest are "OTHER").
- shakespeare_continue.jsonl: {"prompt": "SPEAKER:\\n<first half of a line>", "reference": <rest
  of the line>, "speaker", "length": short|long} for generation metrics.
- shakespeare_next_line.jsonl: {"prompt": "SPEAKER:\\n<line>\\n", "choices": [4 lines],
  "label": index of the true next line, "speaker"} for log-likelihood multiple choice.
The split point matches `lmtrain train` with data.val_fraction=0.1, so none of it was trained on.
"""

from __future__ import annotations

import collections
import json
import random
import sys
from pathlib import Path


def speeches(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if len(lines) >= 2 and lines[0].endswith(":") and lines[0][:-1].isupper():
            out.append((lines[0][:-1], lines[1:]))
    return out


def main(path: str, val_fraction: float = 0.1) -> None:
    if not Path(path).is_file():
        sys.exit(f"{path} not found: run `lmtrain data fetch tinyshakespeare` first")
    text = Path(path).read_text(encoding="utf-8")
    held_out = text[int(len(text) * (1 - val_fraction)) :]
    held_out = held_out[held_out.index("\n\n") + 2 :]  # start at a speech boundary
    sp = speeches(held_out)
    top = {s for s, _ in collections.Counter(s for s, _ in sp).most_common(8)}
    rng = random.Random(0)
    here = Path(__file__).parent

    def write(name, rows):
        with open(here / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {here / name}: {len(rows)} rows")

    write(
        "shakespeare_speeches.jsonl",
        [
            {"text": f"{s}:\n" + "\n".join(lines) + "\n", "speaker": s if s in top else "OTHER"}
            for s, lines in sp
        ],
    )
    cont = []
    for s, lines in sp:
        words = lines[0].split()
        if len(words) >= 6:
            half = len(words) // 2
            cont.append(
                {
                    "prompt": f"{s}:\n" + " ".join(words[:half]) + " ",
                    "reference": " ".join(words[half:]),
                    "speaker": s if s in top else "OTHER",
                    "length": "long" if len(lines[0]) >= 40 else "short",
                }
            )
    rng.shuffle(cont)
    write("shakespeare_continue.jsonl", cont[:150])
    all_lines = [ln for _, lines in sp for ln in lines]
    choice = []
    for s, lines in sp:
        if len(lines) >= 2:
            wrong = rng.sample([ln for ln in all_lines if ln != lines[1]], 3)
            options = wrong + [lines[1]]
            rng.shuffle(options)
            choice.append(
                {
                    "prompt": f"{s}:\n{lines[0]}\n",
                    "choices": options,
                    "label": options.index(lines[1]),
                    "speaker": s if s in top else "OTHER",
                }
            )
    rng.shuffle(choice)
    write("shakespeare_next_line.jsonl", choice[:150])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/tinyshakespeare.txt")
