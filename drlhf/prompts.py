"""Conditions shared by sample.py and train_ppo.py: prompt lists (built-in sets from the thesis, prompt files)
and class lists, and the conditions of a batch of environments.

    builtin:pink                Table 6.5: the four Pink labeling prompts
    builtin:pickscore-diverse   appendix D.1: 24 diverse evaluation prompts of the PickScore experiment
    builtin:pickscore-animals   appendix D.2: 24 animal evaluation prompts of the PickScore experiment
    builtin:pickscore-eval      both appendix D lists (48 prompts)
    builtin:pink-colors         appendix C: 64 animals x 8 colours of sunglasses (Pink's generalization, Fig. 6.31)
    builtin:pink-no-sunglasses  appendix C.1: the 64 animals without sunglasses (Fig. 6.32)

Files: .txt (one prompt per line), .jsonl (a "prompt" or "caption" field), .csv (a "caption" or "prompt"
column) or .parquet (the same columns; needs pyarrow). Duplicates are dropped, first occurrence kept.

The text-encoder states of a prompt list (`prompt_table`): up to FULL_TABLE_MAX prompts are encoded at set-up into
one tensor; a longer list is a LazyPromptTable, which encodes only the prompts an epoch draws.
"""
from __future__ import annotations

import csv
import json
from collections import OrderedDict
from pathlib import Path

# A prompt table is encoded at set-up, whole, up to this many prompts, as it always was: every built-in list (at most
# 512) and any such prompt file, so those runs keep their numbers bit-for-bit. Above it the states are
# encoded as drawn: SD3's packed conditioning is 334 x 4096 float32 (~5.5 MB) a prompt, so Flow-GRPO's PickScore
# training file of 25,432 prompts would take ~139 GB encoded whole, while an epoch draws a few dozen of them.
FULL_TABLE_MAX = 1024
CACHE_BYTES = 1 << 30  # LazyPromptTable's LRU of encoded prompts: ~190 SD3 prompts, ~4,400 SD v1.5 prompts (host RAM)
ENCODE_BATCH = 16      # prompts per text-encoder call of a LazyPromptTable, always exactly this many (see there)

PINK = [f"A photograph of a {animal} wearing pink sunglasses." for animal in ("corgi", "deer", "lion", "mouse")]
PICKSCORE_DIVERSE = [
    "a photo of an astronaut riding a horse",
    "a blue sky with fluffy white clouds",
    "a serene landscape in the style of Impressionism, filled with bright yellows and deep blues, featuring a river reflecting the afternoon sun",
    "a futuristic cityscape at night, bustling with neon signs, hyperloops, and flying cars, in the vein of cyberpunk aesthetics",
    "a simple still life composition of assorted fruits on a tablecloth, reminiscent of Caravaggio’s use of chiaroscuro",
    "a dreamy representation of the Aurora Borealis, vibrant with green and purple hues, reflecting in a still, clear lake",
    "the concept of ‘chaos’ portrayed through an abstract expressionist painting, using a riot of swirling colors and brushstrokes",
    "yellow duck, colored, splash, high detailed, painting",
    "a lighthouse on a stormy night, waves crashing against the rocks",
    "a photo of a hot air balloon over a wheat field",
    "landscape photography of swiss alps, mountains, nature, high quality, summer, bloom",
    "macro photography of a red mushroom, morning dew, nature, high quality, bokeh, dslr",
    "a cherry blossom tree by a tranquil pond, pink, expressed through minimalist Japanese ink painting",
    "a grand Gothic cathedral under a stormy sky, with dramatic shadows and highlights, inspired by Romanticism",
    "a tranquil rural scene of a cottage amidst a blooming meadow under the midday sun, painted in the style of American Regionalism",
    "a photograph of a deer wearing pink sunglasses",
    "green apple, shiny surface, vivid colors",
    "an ancient Egyptian pyramid under a starry night sky.",
    "a macaw parrot with a colorful plumage perched on a branch",
    "low poly elephant figure",
    "sunset over the ocean, with a sailboat in the distance",
    "logo of a red fox",
    "photo of a nebula by the Hubble space telescope",
    "a mystical depiction of a unicorn in an enchanted forest",
]
PICKSCORE_ANIMALS = [
    "a photograph of a lion",
    "a photograph of a mouse",
    "a photograph of a corgi",
    "a photograph of a deer",
    "a photograph of a fox",
    "a photograph of an elephant",
    "a photograph of a kangaroo",
    "a photograph of a eagle",
    "a photograph of a koala",
    "a photograph of a turtle",
    "a photograph of a squirrel",
    "a photograph of a hedgehog",
    "a photograph of a panda",
    "a photograph of a hummingbird",
    "a photograph of a frog",
    "a photograph of a monkey",
    "a photograph of an owl",
    "a photograph of a bee",
    "a photograph of an octopus",
    "a photograph of an otter",
    "a photograph of a raccoon",
    "a photograph of a llama",
    "a photograph of a jellyfish",
    "a photograph of a pig",
]
ANIMALS_C1 = """elephant dolphin parrot giraffe koala turtle squirrel hippopotamus rabbit hedgehog goose lemur bear sheep
cat pig tiger panda horse hummingbird penguin fox wolf monkey frog chicken duck zebra rhinoceros kangaroo crocodile
snake spider shark whale antelope butterfly eagle owl bee jellyfish lobster octopus crab moose seahorse gorilla sloth
otter walrus raccoon skunk bat armadillo beaver cow donkey camel llama goat swan flamingo lizard chameleon""".split()
COLORS_C2 = ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


PINK_COLORS = [f"A photograph of {_article(a)} wearing {c} sunglasses." for a in ANIMALS_C1 for c in COLORS_C2]
PINK_NO_SUNGLASSES = [f"A photograph of {_article(a)}." for a in ANIMALS_C1]
BUILTIN = {"pink": PINK, "pink-colors": PINK_COLORS, "pink-no-sunglasses": PINK_NO_SUNGLASSES, "pickscore-diverse": PICKSCORE_DIVERSE, "pickscore-animals": PICKSCORE_ANIMALS,
           "pickscore-eval": PICKSCORE_DIVERSE + PICKSCORE_ANIMALS}
COLUMNS = ("caption", "prompt", "text")


def read_prompts(spec: str, flag: str = "--prompts") -> list[str]:
    """Prompts from builtin:NAME or a .txt/.jsonl/.csv/.parquet file, deduplicated in order."""
    if spec.startswith("builtin:"):
        if spec[8:] not in BUILTIN:
            raise ValueError(f"{flag} {spec}: built-in lists are " + ", ".join(f"builtin:{k}" for k in BUILTIN))
        return list(BUILTIN[spec[8:]])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {spec}: no such file")
    try:
        return _read_prompt_file(path, spec, flag)
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {spec}: not a UTF-8 text file (prompts come from .txt, .jsonl, .csv or "
                         ".parquet files)") from None


def _read_prompt_file(path: Path, spec: str, flag: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{flag} {path}:{n}: not a JSON line ({e})") from None
        prompts = [_field(r, path, flag) for r in rows]
    elif suffix == ".csv":
        with open(path, newline="") as f:
            prompts = [_field(r, path, flag) for r in csv.DictReader(f)]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{flag} {spec}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        column = next((c for c in COLUMNS if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{flag} {spec}: no column named one of {COLUMNS} (columns: {table.column_names})")
        prompts = [str(p) for p in table.column(column).to_pylist() if p is not None]
    else:
        prompts = path.read_text().splitlines()
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if not prompts:
        raise ValueError(f"{flag} {spec}: no prompts in the file")
    return prompts


def _field(row: dict, path: Path, flag: str) -> str:
    for c in COLUMNS:
        if c in row:
            return row[c]
    raise ValueError(f"{flag} {path}: a row without one of the fields {COLUMNS}: {str(row)[:80]}")


def check_condition_flags(conditioning: str, source: str, prompts: str | None, class_labels: str | None,
                          num_classes: int = 0):
    """Before any work: --prompts only for a text model and --class-labels only for a class model (a flag the model
    cannot take is refused, never ignored), and the ones it takes read (a missing prompt file, a class the model
    does not have). `source` names the model in the message."""
    kind = {"none": "unconditional", "class": "class-conditional", "text": "text-conditional"}[conditioning]
    if prompts and conditioning != "text":
        raise ValueError(f"--prompts {prompts}: the base model {source} is {kind}, not a text model; drop --prompts")
    if class_labels and conditioning != "class":
        raise ValueError(f"--class-labels {class_labels}: the base model {source} is {kind}, not a class model; drop "
                         "--class-labels")
    if conditioning == "text":
        prompt_list(prompts)
    elif conditioning == "class":
        class_list(class_labels, num_classes)


def class_list(spec: str | None, num_classes: int) -> list[int]:
    """--class-labels "3,7" (None = every class) for a model with classes 0..num_classes-1."""
    try:
        classes = [int(c) for c in spec.split(",")] if spec else list(range(num_classes))
    except ValueError:
        raise ValueError(f"--class-labels {spec}: expected comma-separated class numbers, e.g. 3,7") from None
    if min(classes) < 0 or max(classes) >= num_classes:
        raise ValueError(f"--class-labels {spec}: the base model has classes 0..{num_classes - 1}")
    return classes


def prompt_list(spec: str | None) -> list[str]:
    """--prompts of a text model, which needs them."""
    if not spec:
        raise ValueError("--prompts is required for a text-conditional model: a .txt (one prompt per line), "
                         ".jsonl, .csv or .parquet file, or builtin:pink")
    return read_prompts(spec)


def prompt_table(spec: str | None, base) -> tuple:
    """A text model's prompt list and its text-encoder states, indexable by a LongTensor of prompt rows: up to
    FULL_TABLE_MAX prompts a tensor (N, L, D) encoded now in one pass, exactly as before the lazy table existed;
    more, a LazyPromptTable that encodes what is drawn (Flow-GRPO's 25,432 PickScore prompts would be ~139 GB
    encoded whole for SD3)."""
    prompts = prompt_list(spec)
    if len(prompts) <= FULL_TABLE_MAX:
        return prompts, base.encode_prompts(prompts)
    return prompts, LazyPromptTable(prompts, base.encode_prompts)


class LazyPromptTable:
    """The text-encoder states of a long prompt list, encoded when drawn: `table[idx]` (a LongTensor, a list of
    rows, a range or slice) is the float32 tensor (n, L, D) of those prompts, on the CPU, as a tensor table
    indexed the same way would give it up to float rounding; `table[i]` is one row (L, D); len() and iteration
    (chunk by chunk) work as on a tensor.

    Each prompt is encoded by `encode` (the family's adapter, `base.encode_prompts`) in calls of exactly `batch`
    prompts (the last one filled up with ""), so a prompt's states never depend on which prompts it was drawn with
    or on what the cache held: the same drawn prompts give the same bits whether encoded now or earlier, and a
    --resume (which starts with an empty cache) continues bit-for-bit on CPU.

    An LRU of `cache_bytes` keeps the most recently drawn prompts' states (host memory, a fixed budget whatever
    the list's length), so a prompt drawn again soon is not encoded again; a GRPO group's prompt is encoded once
    per draw in any case. `encoded` counts the prompts sent to the text encoders, fill-up excluded."""

    def __init__(self, prompts: list[str], encode, cache_bytes: int = CACHE_BYTES, batch: int = ENCODE_BATCH):
        self.prompts, self.encode, self.cache_bytes, self.batch = prompts, encode, cache_bytes, batch
        self.cache = OrderedDict()  # prompt row -> its states (L, D), least recently used first
        self.cached_bytes = 0
        self.encoded = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        for s in range(0, len(self), self.batch):
            yield from self[range(s, min(s + self.batch, len(self)))]

    def __getitem__(self, idx):
        import torch
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        shape = None  # an int or a tensor of rows: the result has its shape, then (L, D)
        if isinstance(idx, (int, torch.Tensor)):
            idx = torch.as_tensor(idx)
            if idx.is_floating_point() or idx.dtype == torch.bool:
                raise TypeError(f"a prompt table is indexed by prompt rows (integers), not {idx.dtype}")
            shape, idx = idx.shape, idx.reshape(-1).tolist()
        rows = [int(i) for i in idx]
        if any(not -len(self) <= i < len(self) for i in rows):
            raise IndexError(f"prompt rows {min(rows)}..{max(rows)} of a table of {len(self)} prompts")
        rows = [i % len(self) for i in rows]
        if not rows:  # nothing drawn: (0, L, D), the shape from one call
            out = self.encode([""] * self.batch).cpu()[:0]
            return out if shape is None else out.reshape(*shape, *out.shape[1:])
        found = {i: self.cache[i] for i in dict.fromkeys(rows) if i in self.cache}
        for i in found:
            self.cache.move_to_end(i)
        new = [i for i in dict.fromkeys(rows) if i not in found]
        for s in range(0, len(new), self.batch):
            chunk = new[s:s + self.batch]
            states = self.encode([self.prompts[i] for i in chunk] + [""] * (self.batch - len(chunk))).cpu()
            found.update((i, states[k].clone()) for k, i in enumerate(chunk))  # clone: not a view of the batch
            self.encoded += len(chunk)
        for i in new:  # into the cache after the lookup: a draw larger than the cache still finds all its rows
            self.cache[i] = found[i]
            self.cached_bytes += found[i].nbytes
        while self.cached_bytes > self.cache_bytes:
            self.cached_bytes -= self.cache.popitem(last=False)[1].nbytes
        out = torch.stack([found[i] for i in rows])
        return out if shape is None else out.reshape(*shape, *out.shape[1:])


def sample_conditions(base, class_labels: str | None, n: int, generator, prompts=None, prompt_embeds=None,
                      group_size: int = 1):
    """Conditions of n environments, drawn uniformly (thesis 5.3): (cond for the model, prompts or None).
    cond is None (unconditional), class labels (n,) or text-encoder states (n, L, D) of the drawn prompts
    (prompt_embeds: prompt_table's tensor or LazyPromptTable, indexed alike).
    group_size > 1: n / group_size conditions drawn, each given to group_size consecutive environments (GRPO)."""
    import torch
    if base.conditioning == "none":
        return None, None
    if base.conditioning == "class":
        classes = torch.tensor(class_list(class_labels, base.num_classes))
        return classes[torch.randint(len(classes), (n // group_size,), generator=generator).repeat_interleave(group_size)], None
    idx = torch.randint(len(prompts), (n // group_size,), generator=generator).repeat_interleave(group_size)
    return prompt_embeds[idx], [prompts[i] for i in idx.tolist()]
