"""Terminal pairwise labeler: order the K images of each task by preference (thesis chapter 4, appendix E).

Launch:
    python label.py label datasets/digits --annotator alice          # the app (creates the default project)
    python label.py create datasets/pink --project pink --recheck    # a project with options, then `label`
    python label.py list datasets/pink                               # projects, annotators, progress
    python label.py label datasets/digits --auto builtin:ink         # rank by a scoring function, no human
    python label.py export datasets/digits --out datasets/digits     # rankings.jsonl, pairs.jsonl, report.md

Keys (appendix E; change with --keys): a left is better, d right is better, t tie, b flag both images as bad,
n skip the task, u undo (any number of steps, also after a restart), 1/2 zoom the left/right image,
i instructions, ? help, q quit.

Storage: `labels.sqlite` in the dataset folder (--db to move it): an append-only event log (decisions, flags,
skips, undos) in SQLite with WAL and synchronous=FULL. Each decision is committed before the next pair is
shown, and the app's state is rebuilt by replaying the log, so a crash loses nothing that was acknowledged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

APP_ID, SCHEMA = "drlhf-labels", 1
DEFAULT_KEYS = dict(left="a", right="d", tie="t", bad="b", skip="n", undo="u")
RENDERERS = ("auto", "tgp", "sixel", "halfcell", "unicode")


class LabelError(Exception):
    """Bad input: the message says which file or flag to fix."""


# ---------------------------------------------------------------------------------------------------------
# The dataset (contract in the README): dataset.json, tasks.jsonl, images/
# ---------------------------------------------------------------------------------------------------------
def load_tasks(dataset: Path, check_images: bool = True) -> list[dict]:
    """Tasks of a labeling dataset, validated: every task has >= 2 images that exist and can be decoded."""
    tasks_file = dataset / "tasks.jsonl"
    if not tasks_file.exists():
        raise LabelError(f"{dataset}: no tasks.jsonl; create a labeling dataset with sample.py first")
    tasks = []
    for n, line in enumerate(tasks_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
            task["task_id"], task["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LabelError(f"{tasks_file}:{n}: not a task line ({e}); see the README's file contracts") from None
        if len(task["images"]) < 2:
            raise LabelError(f"{tasks_file}:{n}: task {task['task_id']} has {len(task['images'])} image(s); a task "
                             "needs at least 2")
        tasks.append(task)
    if not tasks:
        raise LabelError(f"{tasks_file}: no tasks")
    if check_images:
        from PIL import Image, UnidentifiedImageError
        for task in tasks:
            for rel in task["images"]:
                try:
                    with Image.open(dataset / rel) as img:
                        img.verify()
                except FileNotFoundError:
                    raise LabelError(f"task {task['task_id']}: image {dataset / rel} is missing") from None
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    raise LabelError(f"task {task['task_id']}: image {dataset / rel} is unreadable ({e})") from None
    return tasks


# ---------------------------------------------------------------------------------------------------------
# The ordering of one task from pairwise answers
# ---------------------------------------------------------------------------------------------------------
class TaskSorter:
    """Orders K images from answers to "is a better than b?" ('a', 'b' or 'tie').

    Binary insertion sort over tie groups (transitivity assumed, the default): image i is inserted into the
    groups of images 0..i-1 by binary search; a tie joins the group. Worst case sum_{n=1}^{K-1} ceil(log2(n+1))
    comparisons: 8 for K = 5, 17 for K = 8. Optionally a final pass re-asks every neighbouring pair of groups
    (swap or merge on a contradiction). Without transitivity, every pair is asked and images are ranked by
    wins + ties/2 (Copeland), equal scores forming tie groups.
    """

    def __init__(self, k: int, all_pairs: bool = False, recheck: bool = False):
        self.k, self.all_pairs, self.recheck = k, all_pairs, recheck
        self.groups = [[0]]                   # best first
        self.item, self.lo, self.hi = 1, 0, 1  # image being inserted and its search interval over groups
        self.check = 0                         # position of the neighbour re-check pass
        self.pairs = list(combinations(range(k), 2))
        self.answers: dict[tuple[int, int], str] = {}
        self.decisions = 0

    def next_pair(self):
        """The next (a, b) to ask, or None when the task is ordered."""
        if self.all_pairs:
            return next((p for p in self.pairs if p not in self.answers), None)
        if self.item < self.k:
            return self.item, self.groups[(self.lo + self.hi) // 2][0]
        if self.recheck and self.check < len(self.groups) - 1:
            return self.groups[self.check + 1][0], self.groups[self.check][0]  # (lower, upper)
        return None

    @property
    def done(self) -> bool:
        return self.next_pair() is None

    def apply(self, a: int, b: int, outcome: str):
        if (a, b) != self.next_pair():
            raise ValueError(f"answer for ({a}, {b}) but the pending pair is {self.next_pair()}")
        self.decisions += 1
        if self.all_pairs:
            self.answers[(a, b)] = outcome
            return
        if self.item < self.k:
            mid = (self.lo + self.hi) // 2
            if outcome == "tie":
                self.groups[mid].append(a)
                return self._next_item()
            if outcome == "a":
                self.hi = mid
            else:
                self.lo = mid + 1
            if self.lo == self.hi:
                self.groups.insert(self.lo, [a])
                self._next_item()
            return
        p = self.check  # re-check: a = lower group, b = upper group
        if outcome == "tie":
            self.groups[p:p + 2] = [self.groups[p] + self.groups[p + 1]]
            return
        if outcome == "a":
            self.groups[p], self.groups[p + 1] = self.groups[p + 1], self.groups[p]
        self.check += 1

    def _next_item(self):
        self.item += 1
        self.lo, self.hi = 0, len(self.groups)

    def ranking(self) -> list[list[int]]:
        """Tie groups of image indices, best first (partial while the task is not done)."""
        if not self.all_pairs:
            return [sorted(g) for g in self.groups]
        score = [0.0] * self.k
        for (a, b), o in self.answers.items():
            score[a] += {"a": 1.0, "tie": 0.5, "b": 0.0}[o]
            score[b] += {"a": 0.0, "tie": 0.5, "b": 1.0}[o]
        return [[i for i in range(self.k) if score[i] == s] for s in sorted(set(score), reverse=True)]


# ---------------------------------------------------------------------------------------------------------
# Storage: an append-only event log in SQLite
# ---------------------------------------------------------------------------------------------------------
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects(name TEXT PRIMARY KEY, dataset TEXT NOT NULL, fingerprint TEXT NOT NULL,
    k INTEGER NOT NULL, all_pairs INTEGER NOT NULL, recheck INTEGER NOT NULL, instructions TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, annotator TEXT NOT NULL,
    task_id INTEGER, kind TEXT NOT NULL CHECK(kind IN ('decision', 'flag', 'skip', 'undo')), data TEXT NOT NULL,
    ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_annotator ON events(project, annotator, id);
CREATE TRIGGER IF NOT EXISTS events_append_only_u BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_d BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"""
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb", "smbfs", "smb3", "fuse.sshfs", "9p", "afs", "lustre", "gpfs")


def filesystem_type(path: Path) -> str:
    """The mount type holding path, from /proc/mounts (empty where unknown)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(path.resolve())
    best = max((m for m in mounts if len(m) > 2 and (path == m[1] or path.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    return best[2] if best else ""


def dataset_fingerprint(dataset: Path) -> str:
    """Identity of a dataset that survives moving its folder: the hash of its dataset.json (written once by
    sample.py), or of its resolved path when there is none."""
    meta = dataset / "dataset.json"
    data = meta.read_bytes() if meta.exists() else str(dataset.resolve()).encode()
    return hashlib.sha256(data).hexdigest()[:16]


class Store:
    """The event log. Every append is one committed transaction (synchronous=FULL) before it returns."""

    def __init__(self, db: Path, quiet: bool = False):
        self.path = Path(db)
        folder = self.path.parent
        if not folder.exists():
            raise LabelError(f"--db {db}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise LabelError(f"--db {db}: {folder} is read-only; labels could not be saved. Pass --db with a "
                             "writable path (the dataset itself is only read)")
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise LabelError(f"--db {db}: not an SQLite database; move it away or pass another --db")
        self.con = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise LabelError(f"--db {db}: a database of another program (tables: {', '.join(sorted(tables))}); "
                             "pass another --db")
        if "meta" in tables:
            meta = dict(self.con.execute("SELECT key, value FROM meta"))
            if meta.get("app") != APP_ID:
                raise LabelError(f"--db {db}: a database of another program (app {meta.get('app')!r}); pass another --db")
            if int(meta.get("schema", 0)) > SCHEMA:
                raise LabelError(f"--db {db}: written by a newer label.py (schema {meta['schema']}); update drlhf")
        fs = filesystem_type(folder)
        self.journal = "wal"
        if fs in NETWORK_FS:  # WAL needs shared memory between processes, which network file systems lack
            self.journal = "delete"
            if not quiet:
                print(f"[label] {folder} is on a network file system ({fs}): using journal_mode=DELETE instead of WAL",
                      file=sys.stderr)
        got = self.con.execute(f"PRAGMA journal_mode={self.journal.upper()}").fetchone()[0]
        if got != self.journal:
            self.journal = self.con.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if not quiet:
                print(f"[label] WAL is not available here: using journal_mode={self.journal}", file=sys.stderr)
        self.con.execute("PRAGMA synchronous=FULL")
        self.con.execute("PRAGMA foreign_keys=ON")
        self.con.executescript("BEGIN;" + SCHEMA_SQL + "COMMIT;")
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?), ('schema', ?)", (APP_ID, str(SCHEMA)))

    def create_project(self, name, dataset: Path, k, all_pairs, recheck, instructions):
        existing = self.project(name, missing_ok=True)
        if existing:
            raise LabelError(f"project {name!r} already exists in {self.path} (dataset {existing['dataset']})")
        self.con.execute("INSERT INTO projects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (name, str(dataset.resolve()), dataset_fingerprint(dataset), k, int(all_pairs), int(recheck),
                          instructions, time.time()))

    def project(self, name, missing_ok=False):
        row = self.con.execute("SELECT name, dataset, fingerprint, k, all_pairs, recheck, instructions FROM projects "
                               "WHERE name = ?", (name,)).fetchone()
        if row is None and not missing_ok:
            names = [r[0] for r in self.con.execute("SELECT name FROM projects")]
            raise LabelError(f"no project {name!r} in {self.path}; projects: {', '.join(names) or 'none'} "
                             "(create one with `label.py create`)")
        keys = ("name", "dataset", "fingerprint", "k", "all_pairs", "recheck", "instructions")
        return None if row is None else dict(zip(keys, row))

    def projects(self):
        return [r[0] for r in self.con.execute("SELECT name FROM projects ORDER BY created")]

    def annotators(self, project):
        return [r[0] for r in self.con.execute("SELECT DISTINCT annotator FROM events WHERE project = ? ORDER BY 1",
                                               (project,))]

    def append(self, project, annotator, kind, task_id=None, **data) -> int:
        """Commit one event; returns its id once it is durable."""
        cur = self.con.execute("INSERT INTO events(project, annotator, task_id, kind, data, ts) VALUES (?, ?, ?, ?, ?, ?)",
                               (project, annotator, task_id, kind, json.dumps(data), time.time()))
        return cur.lastrowid

    def append_many(self, project, annotator, events):
        """Commit several events in one transaction (the auto labeler)."""
        self.con.execute("BEGIN")
        try:
            for kind, task_id, data in events:
                self.con.execute("INSERT INTO events(project, annotator, task_id, kind, data, ts) VALUES (?, ?, ?, ?, ?, ?)",
                                 (project, annotator, task_id, kind, json.dumps(data), time.time()))
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def events(self, project, annotator):
        rows = self.con.execute("SELECT id, task_id, kind, data, ts FROM events WHERE project = ? AND annotator = ? "
                                "ORDER BY id", (project, annotator))
        return [dict(id=i, task_id=t, kind=k, ts=ts, **json.loads(d)) for i, t, k, d, ts in rows]


# ---------------------------------------------------------------------------------------------------------
# The state of one annotator, rebuilt by replaying the log
# ---------------------------------------------------------------------------------------------------------
@dataclass
class State:
    sorters: dict
    both_bad: dict
    skipped: list
    decisions: list = field(default_factory=list)  # effective decision events, in order

    def current_task(self, tasks):
        """First unfinished task in dataset order; skipped tasks come back when nothing else is left."""
        todo = [t["task_id"] for t in tasks if not self.sorters[t["task_id"]].done]
        last_skip = {t: n for n, t in enumerate(self.skipped)}
        return min(todo, key=lambda t: last_skip.get(t, -1)) if todo else None  # never skipped first, then oldest skip


def replay(events, tasks, project) -> State:
    """Fold the log into the state: an undo cancels the latest effective event (decision, flag or skip)."""
    effective = []
    for e in events:
        if e["kind"] == "undo":
            if effective:
                effective.pop()
        else:
            effective.append(e)
    state = State({t["task_id"]: TaskSorter(len(t["images"]), bool(project["all_pairs"]), bool(project["recheck"]))
                   for t in tasks}, {t["task_id"]: set() for t in tasks}, [])
    for e in effective:
        if e["kind"] == "decision":
            state.sorters[e["task_id"]].apply(e["a"], e["b"], e["outcome"])
            state.decisions.append(e)
        elif e["kind"] == "flag":
            state.both_bad[e["task_id"]] |= {e["left"], e["right"]}
        elif e["kind"] == "skip":
            state.skipped.append(e["task_id"])
    return state


def placement(project: str, annotator: str, task_id: int, n: int, a: int, b: int):
    """Left/right placement of a comparison: seeded by (project, annotator, task, decision number), so that
    it is random per comparison yet the same after a restart. Returns (left, right)."""
    h = hashlib.sha256(f"{project}/{annotator}/{task_id}/{n}".encode()).digest()[0]
    return (a, b) if h & 1 else (b, a)


# ---------------------------------------------------------------------------------------------------------
# Scoring functions for --auto (AI feedback, tests): images (B, C, H, W) in [-1, 1], prompts -> scores
# ---------------------------------------------------------------------------------------------------------
def ink_score(images, prompts=None):
    """Mean brightness: ink coverage of white-on-black digits."""
    return images.float().mean((1, 2, 3))


def stroke_score(images, prompts=None):
    """Share of bright pixels (> 0.5 on [0, 1]), a stroke-thickness proxy."""
    return ((images.float() + 1) / 2 > 0.5).float().mean((1, 2, 3))


def load_scorer(spec: str):
    builtin = {"ink": ink_score, "stroke": stroke_score}
    if spec.startswith("builtin:"):
        name = spec[8:]
        if name == "colorfulness":
            from drlhf.rewards import colorfulness_reward
            return lambda images, prompts=None: colorfulness_reward(images)
        if name not in builtin:
            raise LabelError(f"--auto {spec}: built-in scorers are builtin:ink, builtin:stroke, builtin:colorfulness")
        return builtin[name]
    if ":" not in spec:
        raise LabelError(f"--auto {spec}: give builtin:NAME or module:function")
    import importlib
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise LabelError(f"--auto {spec}: cannot import it ({e})") from None


def auto_label(store, project, annotator, tasks, dataset: Path, scorer, quiet=False):
    """Rank every unfinished task by the scorer, recording each comparison the sort asks as a decision."""
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm
    state = replay(store.events(project["name"], annotator), tasks, project)
    for task in tqdm([t for t in tasks if not state.sorters[t["task_id"]].done], desc=f"auto-labeling ({annotator})",
                     disable=quiet):
        arrays = [np.asarray(Image.open(dataset / p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in task["images"]]
        images = torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2)
        if all(np.allclose(a[..., 0], a[..., 1]) and np.allclose(a[..., 0], a[..., 2]) for a in arrays):
            images = images[:, :1]  # greyscale
        scores = torch.as_tensor(scorer(images, [task.get("prompt")] * len(arrays))).float().flatten().tolist()
        if len(scores) != len(arrays) or not all(math.isfinite(s) for s in scores):
            raise LabelError(f"--auto: the scorer returned {scores} for task {task['task_id']}; need one finite "
                             "score per image")
        sorter, events = state.sorters[task["task_id"]], []
        while (pair := sorter.next_pair()) is not None:
            a, b = pair
            outcome = "tie" if scores[a] == scores[b] else ("a" if scores[a] > scores[b] else "b")
            left, right = placement(project["name"], annotator, task["task_id"], sorter.decisions, a, b)
            events.append(("decision", task["task_id"], dict(a=a, b=b, left=left, right=right, outcome=outcome,
                                                            ms=0, auto=True)))
            sorter.apply(a, b, outcome)
        store.append_many(project["name"], annotator, events)


# ---------------------------------------------------------------------------------------------------------
# Export: rankings.jsonl, pairs.jsonl, report
# ---------------------------------------------------------------------------------------------------------
def kendall_tau_b(rank_x, rank_y) -> float:
    """Kendall's tau-b between two rankings given as ranks per item (ties allowed)."""
    conc = disc = tx = ty = 0
    for i, j in combinations(range(len(rank_x)), 2):
        dx, dy = rank_x[i] - rank_x[j], rank_y[i] - rank_y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif (dx > 0) == (dy > 0):
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else float("nan")


def export(store, project, tasks, out: Path, val_fraction: float, seed: int) -> str:
    """Write rankings.jsonl (complete tasks) and pairs.jsonl (every effective decision); return the report."""
    ids = sorted(t["task_id"] for t in tasks)
    random.Random(seed).shuffle(ids)
    n_val = round(len(ids) * val_fraction)
    split = {t: ("val" if n < n_val else "train") for n, t in enumerate(ids)}
    by_id = {t["task_id"]: t for t in tasks}
    rankings, pairs, report = [], [], []
    ranks = {}  # (annotator, task) -> rank per image
    for annotator in store.annotators(project["name"]):
        state = replay(store.events(project["name"], annotator), tasks, project)
        done = [t for t in ids if state.sorters[t].done]
        for t in sorted(done):
            ranking = state.sorters[t].ranking()
            rankings.append(dict(task_id=t, ranking=ranking, both_bad=sorted(state.both_bad[t]), split=split[t],
                                 annotator=annotator, project=project["name"], dataset=project["fingerprint"]))
            ranks[annotator, t] = {i: g for g, group in enumerate(ranking) for i in group}
        for e in state.decisions:
            label = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}[e["outcome"]]
            images = by_id[e["task_id"]]["images"]
            pairs.append(dict(task_id=e["task_id"], annotator=annotator, index_0=e["a"], index_1=e["b"],
                              image_0=images[e["a"]], image_1=images[e["b"]], label_0=label[0], label_1=label[1],
                              left=e["left"], split=split[e["task_id"]]))
        times = [e["ms"] for e in state.decisions if e.get("ms")]
        ties = sum(e["outcome"] == "tie" for e in state.decisions)
        pace = f"{sum(times) / len(times) / 1000:.2f} s" if times else "–"
        report.append(f"| {annotator} | {len(done)} / {len(tasks)} | {len(state.decisions)} | {ties} | {pace} |")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("rankings.jsonl", rankings), ("pairs.jsonl", pairs)):
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out / name)
    annotators = store.annotators(project["name"])
    taus = []
    for x, y in combinations(annotators, 2):
        shared = [t for t in ids if (x, t) in ranks and (y, t) in ranks]
        vals = [kendall_tau_b([ranks[x, t][i] for i in range(len(ranks[x, t]))],
                              [ranks[y, t][i] for i in range(len(ranks[y, t]))]) for t in shared]
        vals = [v for v in vals if not math.isnan(v)]
        taus.append(f"| {x} / {y} | {len(shared)} | {(sum(vals) / len(vals) if vals else float('nan')):.3f} |")
    text = (f"# Labels of project {project['name']}\n\n{len(rankings)} complete rankings, {len(pairs)} compared pairs; "
            f"split by task with seed {seed}: {n_val} validation tasks of {len(tasks)}.\n\n"
            "| annotator | tasks done | comparisons | ties | mean time per decision |\n|---|---|---|---|---|\n"
            + "\n".join(report) + "\n")
    if taus:
        text += ("\nAgreement on shared complete tasks (Kendall tau-b, mean over tasks):\n\n"
                 "| annotators | shared tasks | tau-b |\n|---|---|---|\n" + "\n".join(taus) + "\n")
    (out / "report.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------
def image_widget_class(renderer: str):
    """Pick the textual-image widget before the app starts (it queries the terminal). Returns (class, name)."""
    from textual_image import widget as tw
    from textual_image.renderable import HalfcellImage, SixelImage, TGPImage, UnicodeImage
    chosen = {"tgp": tw.TGPImage, "sixel": tw.SixelImage, "halfcell": tw.HalfcellImage,
              "unicode": tw.UnicodeImage}.get(renderer)
    if chosen is not None:
        return chosen, renderer
    names = {TGPImage: "tgp (Kitty graphics)", SixelImage: "sixel", HalfcellImage: "halfcell (Unicode half blocks)",
             UnicodeImage: "unicode"}
    from textual_image.renderable import Image as auto
    return tw.Image, names.get(auto, "auto")


def make_app(store, project, annotator, tasks, dataset: Path, renderer="auto", keys=None):
    from PIL import Image as PILImage
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Horizontal, Vertical, VerticalScroll
    from textual.screen import ModalScreen
    from textual.widgets import Footer, Header, Markdown, Static

    ImageWidget, renderer_name = image_widget_class(renderer)
    keys = {**DEFAULT_KEYS, **(keys or {})}
    by_id = {t["task_id"]: t for t in tasks}

    def load(task_id, i):
        return PILImage.open(dataset / by_id[task_id]["images"][i]).convert("RGB")

    class ZoomScreen(ModalScreen):
        BINDINGS = [("escape,q,1,2", "app.pop_screen", "close")]

        def __init__(self, image, caption):
            super().__init__()
            self.image, self.caption = image, caption

        def compose(self) -> ComposeResult:
            with Vertical(id="zoom"):
                yield Static(self.caption + "  (esc closes)")
                yield ImageWidget(self.image, id="zoomed")

    class TextScreen(ModalScreen):
        BINDINGS = [("escape,q,question_mark,i", "app.pop_screen", "close")]

        def __init__(self, text):
            super().__init__()
            self.text = text

        def compose(self) -> ComposeResult:
            with VerticalScroll(id="text"):
                yield Markdown(self.text + "\n\n*esc closes*")

    class LabelApp(App):
        TITLE = "drlhf labeler"
        CSS = """
        #prompt { height: auto; padding: 0 1; text-style: bold; }
        #pair { height: 1fr; }
        .side { width: 1fr; border: round $accent; padding: 0 1; }
        .side Image { height: 1fr; width: auto; }
        #strip { height: 9; border: round $secondary; }
        .thumb { width: 12; height: 100%; }
        .thumb Image { height: 1fr; width: auto; }
        .thumb Static { height: 1; text-align: center; }
        #status { height: 1; padding: 0 1; background: $boost; }
        #zoom, #text { width: 90%; height: 90%; border: thick $accent; background: $surface; }
        #zoom Image { height: 1fr; width: auto; }
        """
        BINDINGS = [Binding(keys["left"], "choose('left')", "left better"),
                    Binding(keys["right"], "choose('right')", "right better"),
                    Binding(keys["tie"], "choose('tie')", "tie"),
                    Binding(keys["bad"], "flag", "both bad"),
                    Binding(keys["skip"], "skip", "skip task"),
                    Binding(keys["undo"], "undo", "undo"),
                    Binding("1", "zoom('left')", "zoom left", show=False),
                    Binding("2", "zoom('right')", "zoom right", show=False),
                    Binding("i", "instructions", "instructions"),
                    Binding("question_mark", "help", "help"),
                    Binding("q", "quit", "quit")]

        def __init__(self):
            super().__init__()
            self.state = replay(store.events(project["name"], annotator), tasks, project)
            self.task_id, self.pair, self.shown_at = None, None, time.monotonic()
            self.session_ms = []
            self.acknowledged = len(self.state.decisions)  # decisions committed to the database

        def compose(self) -> ComposeResult:
            yield Header()
            yield Static(id="prompt")
            with Horizontal(id="pair"):
                with Vertical(classes="side"):
                    yield Static(f"[b]LEFT[/b]  ({keys['left']} = left is better)", id="left-label")
                    yield ImageWidget(None, id="left")
                with Vertical(classes="side"):
                    yield Static(f"[b]RIGHT[/b]  ({keys['right']} = right is better)", id="right-label")
                    yield ImageWidget(None, id="right")
            yield Horizontal(id="strip")
            yield Static(id="status")
            yield Footer()

        def on_mount(self):
            self.sub_title = f"{project['name']} · {annotator} · renderer: {renderer_name}"
            self.refresh_view()
            if project["instructions"].strip() and not self.state.decisions:
                self.action_instructions()

        # --- what is shown -----------------------------------------------------------------------------
        def refresh_view(self):
            self.task_id = self.state.current_task(tasks)
            if self.task_id is None:
                self.pair = None
                self.query_one("#prompt", Static).update("All tasks are ordered. Export with `label.py export`. "
                                                         "(u undoes, q quits)")
                self.query_one("#status", Static).update(self.progress())
                return
            task, sorter = by_id[self.task_id], self.state.sorters[self.task_id]
            a, b = sorter.next_pair()
            self.pair = placement(project["name"], annotator, self.task_id, sorter.decisions, a, b)
            cond = task.get("prompt") or (f"class {task['class_label']}" if "class_label" in task else "(unconditional)")
            self.query_one("#prompt", Static).update(f"Task {self.task_id}: {cond}")
            self.query_one("#left", ImageWidget).image = load(self.task_id, self.pair[0])
            self.query_one("#right", ImageWidget).image = load(self.task_id, self.pair[1])
            strip = self.query_one("#strip", Horizontal)
            strip.remove_children()
            thumbs = []
            for rank, group in enumerate(sorter.ranking(), 1):
                for i in group:
                    tag = f"{rank}{'=' if len(group) > 1 else ''} #{i}{' ✗' if i in self.state.both_bad[self.task_id] else ''}"
                    thumbs.append(Vertical(ImageWidget(load(self.task_id, i)), Static(tag), classes="thumb"))
            strip.mount(*thumbs)
            strip.border_title = "current ordering (best first; = tie, ✗ flagged bad)"
            self.query_one("#status", Static).update(self.progress())
            self.shown_at = time.monotonic()

        def progress(self) -> str:
            done = sum(s.done for s in self.state.sorters.values())
            position = (sorted(by_id).index(self.task_id) + 1) if self.task_id is not None else len(tasks)
            per_task = [s.decisions for s in self.state.sorters.values() if s.done] or \
                [sum(math.ceil(math.log2(n + 1)) for n in range(1, len(tasks[0]["images"])))]
            left_tasks = len(tasks) - done
            pace = self.session_ms[-50:] or [e["ms"] for e in self.state.decisions[-50:] if e.get("ms")]
            eta = (f"{left_tasks * sum(per_task) / len(per_task) * sum(pace) / len(pace) / 60000:.0f} min"
                   if pace else "–")
            return (f"task {position} of {len(tasks)} · {done} ordered · {len(self.state.decisions)} comparisons · "
                    f"ETA {eta} · saved #{self.acknowledged}")

        # --- actions: each one is committed to the log before the view changes ---------------------------
        def record(self, kind, **data):
            store.append(project["name"], annotator, kind, self.task_id, **data)

        def action_choose(self, which: str):
            if self.pair is None:
                return
            left, right = self.pair
            a, b = self.state.sorters[self.task_id].next_pair()
            winner = {"left": left, "right": right}.get(which)
            outcome = "tie" if winner is None else ("a" if winner == a else "b")
            ms = round((time.monotonic() - self.shown_at) * 1000)
            self.record("decision", a=a, b=b, left=left, right=right, outcome=outcome, ms=ms)
            self.state.sorters[self.task_id].apply(a, b, outcome)
            self.state.decisions.append(dict(task_id=self.task_id, a=a, b=b, left=left, right=right,
                                             outcome=outcome, ms=ms))
            self.session_ms.append(ms)
            self.acknowledged = len(self.state.decisions)
            self.refresh_view()

        def action_flag(self):
            if self.pair is not None:
                self.record("flag", left=self.pair[0], right=self.pair[1])
                self.state.both_bad[self.task_id] |= set(self.pair)
                self.refresh_view()

        def action_skip(self):
            if self.pair is not None:
                self.record("skip")
                self.state.skipped.append(self.task_id)
                self.refresh_view()

        def action_undo(self):
            store.append(project["name"], annotator, "undo", None)
            self.state = replay(store.events(project["name"], annotator), tasks, project)
            self.acknowledged = len(self.state.decisions)
            self.refresh_view()

        def action_zoom(self, side: str):
            if self.pair is not None:
                i = self.pair[0 if side == "left" else 1]
                self.push_screen(ZoomScreen(load(self.task_id, i), f"task {self.task_id}, {side} image (#{i})"))

        def action_instructions(self):
            self.push_screen(TextScreen(project["instructions"] or "No instructions were given for this project."))

        def action_help(self):
            self.push_screen(TextScreen(
                "# Keys\n\n| key | action |\n|---|---|\n"
                f"| {keys['left']} | left image is better |\n| {keys['right']} | right image is better |\n"
                f"| {keys['tie']} | tie: equally good |\n| {keys['bad']} | flag both images as bad (then still "
                f"choose) |\n| {keys['skip']} | skip this task (it comes back at the end) |\n"
                f"| {keys['undo']} | undo the last decision, flag or skip (repeatable, survives restarts) |\n"
                "| 1 / 2 | zoom the left / right image |\n| i | instructions |\n| q | quit (everything is saved) |\n\n"
                f"The images of a comparison are placed left/right at random. Renderer: {renderer_name} "
                "(force one with --renderer)."))

    return LabelApp()


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def open_project(args, create_default=True):
    dataset = Path(args.dataset)
    tasks = load_tasks(dataset, check_images=args.command != "export")
    store = Store(Path(args.db) if args.db else dataset / "labels.sqlite")
    project = store.project(args.project, missing_ok=True)
    if project is None:
        if not create_default:
            store.project(args.project)  # raises with the list of projects
        project = create(store, dataset, tasks, args)
    if project["fingerprint"] != dataset_fingerprint(dataset):
        raise LabelError(f"project {args.project!r} in {store.path} belongs to another dataset ({project['dataset']}); "
                         f"choose another --project or --db for {dataset}")
    return dataset, tasks, store, project


def create(store, dataset, tasks, args):
    meta = json.loads((dataset / "dataset.json").read_text()) if (dataset / "dataset.json").exists() else {}
    k = args.k or meta.get("k") or len(tasks[0]["images"])
    wrong = [t["task_id"] for t in tasks if len(t["images"]) != k]
    if wrong:
        raise LabelError(f"--k {k}: tasks {wrong[:5]}{'...' if len(wrong) > 5 else ''} have another number of images")
    instr_file = Path(args.instructions) if args.instructions else dataset / meta.get("instructions", "instructions.md")
    if args.instructions and not instr_file.is_file():
        raise LabelError(f"--instructions {args.instructions}: no such file")
    instructions = instr_file.read_text() if instr_file.is_file() else ""
    store.create_project(args.project, dataset, k, args.all_pairs, args.recheck, instructions)
    return store.project(args.project)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dataset", help="labeling dataset folder written by sample.py (tasks.jsonl, images/)")
    common.add_argument("--project", default="default", help="project name (several may label one dataset)")
    common.add_argument("--db", help="SQLite database (default DATASET/labels.sqlite)")
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--k", type=int, help="images per task (default: from dataset.json)")
    opts.add_argument("--instructions", help="Markdown instructions (default: the dataset's instructions.md)")
    opts.add_argument("--all-pairs", action="store_true", help="compare every pair instead of assuming transitivity "
                                                              "(thesis: Macaw compared all 10 pairs of K = 5)")
    opts.add_argument("--recheck", action="store_true", help="after sorting, re-ask every neighbouring pair once")
    sub.add_parser("create", parents=[common, opts], help="create a project over a dataset")
    sub.add_parser("list", parents=[common], help="list projects, annotators and progress")
    lab = sub.add_parser("label", parents=[common, opts], help="label (the app), or --auto without a human")
    lab.add_argument("--annotator", help="who labels (default: $USER, or 'auto' with --auto)")
    lab.add_argument("--renderer", default="auto", choices=RENDERERS, help="force an image renderer")
    lab.add_argument("--keys", default="", help="key overrides, e.g. left=j,right=l,tie=k,bad=b,skip=n,undo=u")
    lab.add_argument("--auto", metavar="SPEC", help="rank by builtin:ink|stroke|colorfulness or module:function "
                                                    "(images in [-1,1], prompts) -> scores, higher preferred")
    exp = sub.add_parser("export", parents=[common], help="write rankings.jsonl, pairs.jsonl and report.md")
    exp.add_argument("--out", help="output folder (default: the dataset folder)")
    exp.add_argument("--val-fraction", type=float, default=0.2, help="share of tasks in the validation split")
    exp.add_argument("--seed", type=int, default=0, help="seed of the train/validation split by task")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in sub.choices and argv[0] not in ("-h", "--help"):
        argv = ["label"] + argv  # `label.py DATASET ...` and `label.py --auto SPEC DATASET` mean `label.py label ...`
    args = p.parse_args(argv)

    if args.command == "create":
        dataset = Path(args.dataset)
        tasks = load_tasks(dataset)
        store = Store(Path(args.db) if args.db else dataset / "labels.sqlite")
        project = create(store, dataset, tasks, args)
        print(f"created project {project['name']!r}: {len(tasks)} tasks of K = {project['k']}, "
              f"{'all pairs' if project['all_pairs'] else 'binary insertion'}{', re-check' if project['recheck'] else ''}")
    elif args.command == "list":
        dataset = Path(args.dataset)
        tasks = load_tasks(dataset, check_images=False)
        store = Store(Path(args.db) if args.db else dataset / "labels.sqlite", quiet=True)
        for name in store.projects():
            project = store.project(name)
            print(f"{name}: K = {project['k']}, dataset {project['dataset']}")
            for annotator in store.annotators(name):
                state = replay(store.events(name, annotator), tasks, project)
                print(f"  {annotator}: {sum(s.done for s in state.sorters.values())} of {len(tasks)} tasks, "
                      f"{len(state.decisions)} comparisons")
    elif args.command == "label":
        dataset, tasks, store, project = open_project(args)
        if args.auto:
            auto_label(store, project, args.annotator or "auto", tasks, dataset, load_scorer(args.auto))
            print(f"[label] {args.auto} ranked every task of project {project['name']!r}")
            return
        try:
            keys = dict(kv.split("=", 1) for kv in args.keys.split(",") if kv)
        except ValueError:
            raise LabelError(f"--keys {args.keys}: expected action=key pairs, e.g. left=j,right=l") from None
        unknown = set(keys) - set(DEFAULT_KEYS)
        if unknown:
            raise LabelError(f"--keys: unknown action(s) {sorted(unknown)}; actions: {', '.join(DEFAULT_KEYS)}")
        make_app(store, project, args.annotator or os.environ.get("USER", "annotator"), tasks, dataset, args.renderer,
                 keys).run()
    elif args.command == "export":
        dataset, tasks, store, project = open_project(args, create_default=False)
        print(export(store, project, tasks, Path(args.out or dataset), args.val_fraction, args.seed))


if __name__ == "__main__":
    try:
        main()
    except (LabelError, sqlite3.DatabaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
