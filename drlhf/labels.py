"""The labeling contracts and the ordering logic of one task (fields: the README's file contracts):
DATASET/dataset.json (its hash is the dataset's fingerprint), DATASET/tasks.jsonl and images/ (load_tasks);
DATASET/labels.sqlite, an append-only event log per project and annotator (Store; state = replay(log));
OUT/rankings.jsonl and pairs.jsonl (export; read back by read_rankings).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from drlhf.files import flock_or_holder, write_text
from drlhf.cli import UserError
from drlhf.ordering import TaskSorter  # noqa: F401 - part of this module's interface

APP_ID, SCHEMA = "drlhf-labels", 1


class LabelError(UserError, ValueError):
    """Bad input: the message says which file or flag to fix."""


# -------- The dataset (contract in the README): dataset.json, tasks.jsonl, images/ -------------------------
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
                             "needs at least 2 images (K >= 2)")
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


def dataset_meta(dataset: Path) -> dict:
    """A dataset's dataset.json (base model, sampler, K, the lineage of the policy that sampled it), or {} when
    there is none."""
    meta = dataset / "dataset.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def dataset_fingerprint(dataset: Path) -> str:
    """Identity of a dataset that survives moving its folder: the hash of its dataset.json (written once by
    sample.py), or of its resolved path when there is none."""
    meta = dataset / "dataset.json"
    data = meta.read_bytes() if meta.exists() else str(dataset.resolve()).encode()
    return hashlib.sha256(data).hexdigest()[:16]


# -------- Storage: an append-only event log in SQLite ------------------------------------------------------
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects(name TEXT PRIMARY KEY, dataset TEXT NOT NULL, fingerprint TEXT NOT NULL,
    k INTEGER NOT NULL, all_pairs INTEGER NOT NULL, recheck INTEGER NOT NULL, instructions TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, annotator TEXT NOT NULL,
    task_id INTEGER, kind TEXT NOT NULL CHECK(kind IN ('decision', 'flag', 'skip', 'undo')), data TEXT NOT NULL,
    ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_annotator ON events(project, annotator, id);
CREATE TRIGGER IF NOT EXISTS events_append_only_u BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_d BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'append-only'); END;
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


class Store:
    """The event log. Every append is one committed transaction (synchronous=FULL) before it returns."""

    def __init__(self, db: Path, quiet: bool = False, read_only: bool = False):
        """read_only (export, list): a database on a read-only mount is read as it is, without locks or writes."""
        self.path = Path(db)
        folder = self.path.parent
        if not folder.exists():
            raise LabelError(f"--db {db}: folder {folder} does not exist")
        if read_only and self.path.is_file() and not os.access(folder, os.W_OK):  # read a copy (with its WAL)
            copy = Path(tempfile.mkdtemp(prefix="drlhf-labels-")) / self.path.name
            for suffix in ("", "-wal"):
                if Path(f"{self.path}{suffix}").exists():
                    shutil.copyfile(f"{self.path}{suffix}", f"{copy}{suffix}")
            self.con = sqlite3.connect(copy, isolation_level=None)
            return
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


# -------- The state of one annotator, rebuilt by replaying the log -----------------------------------------
@dataclass
class State:
    sorters: dict
    both_bad: dict
    skipped: list
    decisions: list = field(default_factory=list)  # effective decision events, in order
    conflicts: list = field(default_factory=list)  # decisions that answer another pair than the pending one

    def current_task(self, tasks):
        """First unfinished task in dataset order; skipped tasks come back when nothing else is left."""
        todo = [t["task_id"] for t in tasks if not self.sorters[t["task_id"]].done]
        last_skip = {t: n for n, t in enumerate(self.skipped)}
        return min(todo, key=lambda t: last_skip.get(t, -1)) if todo else None  # never skipped first, then oldest skip


def effective_events(events: list) -> list:
    """The events that count: each undo cancels the latest effective decision, flag or skip."""
    effective = []
    for e in events:
        if e["kind"] != "undo":
            effective.append(e)
        elif effective:
            effective.pop()
    return effective


def replay(events, tasks, project) -> State:
    """Fold the log into the state: an undo cancels the latest effective event (decision, flag or skip). A
    decision for another pair than the pending one (two sessions of one annotator answered the same pair) is
    kept out and listed in state.conflicts: the first answer stands."""
    effective = effective_events(events)
    state = State({t["task_id"]: TaskSorter(len(t["images"]), bool(project["all_pairs"]), bool(project["recheck"]))
                   for t in tasks}, {t["task_id"]: set() for t in tasks}, [])
    for e in effective:
        if e["kind"] == "decision":
            if state.sorters[e["task_id"]].next_pair() != (e["a"], e["b"]):
                state.conflicts.append(e)
                continue
            state.sorters[e["task_id"]].apply(e["a"], e["b"], e["outcome"])
            state.decisions.append(e)
        elif e["kind"] == "flag":
            state.both_bad[e["task_id"]] |= {e["left"], e["right"]}
        elif e["kind"] == "skip":
            state.skipped.append(e["task_id"])
    return state


# -------- Export: rankings.jsonl, pairs.jsonl, report ------------------------------------------------------
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
        times, ties = [e["ms"] for e in state.decisions if e.get("ms")], sum(e["outcome"] == "tie" for e in state.decisions)
        pace = f"{sum(times) / len(times) / 1000:.2f} s" if times else "–"
        report.append(f"| {annotator} | {len(done)} / {len(tasks)} | {len(state.decisions)} | {ties} | {pace} | "
                      f"{len(state.conflicts)} |")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise LabelError(f"--out {out}: cannot write there (read-only); export elsewhere with --out DIR")
    for name, rows in (("rankings.jsonl", rankings), ("pairs.jsonl", pairs)):
        write_text(out / name, "".join(json.dumps(r) + "\n" for r in rows))
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
            "| annotator | tasks done | comparisons | ties | mean time per decision | conflicting answers ignored |\n"
            "|---|---|---|---|---|---|\n"
            + "\n".join(report) + "\n")
    if taus:
        text += ("\nAgreement on shared complete tasks (Kendall tau-b, mean over tasks):\n\n"
                 "| annotators | shared tasks | tau-b |\n|---|---|---|\n" + "\n".join(taus) + "\n")
    write_text(out / "report.md", text)
    return text


def read_rankings(path: Path, annotator: str | None = None) -> list[dict]:
    """rankings.jsonl (written by export), optionally of one annotator only."""
    if not path.exists():
        raise FileNotFoundError(f"--rankings {path}: no such file; run `label.py export` on the dataset first")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise LabelError(f"{path}:{n}: not a JSON line ({e}); export the rankings again with `label.py export`") from None
    if any(not isinstance(r, dict) or "task_id" not in r or "ranking" not in r for r in rows):
        raise LabelError(f"{path}: every line must be an object with task_id and ranking (label.py export writes them)")
    if annotator:
        rows = [r for r in rows if r.get("annotator") == annotator]
    if not rows:
        raise ValueError(f"--rankings {path}: no rankings{' of annotator ' + annotator if annotator else ''}")
    return rows


def placement(project: str, annotator: str, task_id: int, n: int, a: int, b: int):
    """Left/right placement of a comparison: seeded by (project, annotator, task, decision number), so that
    it is random per comparison yet the same after a restart. Returns (left, right)."""
    h = hashlib.sha256(f"{project}/{annotator}/{task_id}/{n}".encode()).digest()[0]
    return (a, b) if h & 1 else (b, a)


def session_lock(store: Store, project: str, annotator: str):
    """Refuse a second live session of one annotator on one project (two windows would answer the same pair):
    an flock on a file next to the database (drlhf.files.flock_or_holder), released by the OS when the session ends,
    even by SIGKILL. Returns the lock's open file (None where nothing can be locked: some network mounts)."""
    name = hashlib.sha256(f"{project}/{annotator}".encode()).hexdigest()[:12]
    f, holder = flock_or_holder(store.path.with_name(f".{store.path.name}.{name}.lock"))
    if holder is not None:
        raise LabelError(f"annotator {annotator!r} is already labeling project {project!r} of {store.path} ({holder}); "
                         "close that session first (a session that died holds no lock), or use another --annotator")
    return f


def progress(store, tasks) -> list[str]:
    """`label.py list`: a line per project of the store, and one per annotator with their progress."""
    lines = []
    for name in store.projects():
        project = store.project(name)
        lines.append(f"{name}: K = {project['k']}, dataset {project['dataset']}")
        for annotator in store.annotators(name):
            state = replay(store.events(name, annotator), tasks, project)
            lines.append(f"  {annotator}: {sum(s.done for s in state.sorters.values())} of {len(tasks)} tasks, "
                         f"{len(state.decisions)} comparisons" + (f" ({len(state.conflicts)} conflicting answers "
                                                                  "from two sessions ignored; the first answer stands)"
                                                                  if state.conflicts else ""))
    return lines
