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
The store, the ordering logic, replay and export are drlhf/labels.py; this file is the app and its commands.
"""
from __future__ import annotations

import argparse
import math
import os
import sqlite3
import sys
import time
from pathlib import Path

from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Header, Markdown, Static

from drlhf import cli
from drlhf import comparison
from drlhf.files import make_dir
from drlhf.judges import auto_label, ink_score, load_scorer, stroke_score  # noqa: F401 - label:ink_score, label:stroke_score
from drlhf.labels import (LabelError, Store, dataset_fingerprint, dataset_meta, effective_events, export, load_tasks,
                          placement, progress, replay, session_lock)
from drlhf.ordering import ordering_text

DEFAULT_KEYS = dict(left="a", right="d", tie="t", bad="b", skip="n", undo="u")
FIXED_KEYS = ("1", "2", "i", "question_mark", "?", "q")  # zoom, instructions, help, quit
PROMPT_CHARS = 200  # longer prompts are cut on screen (the dataset keeps them whole)
RENDERERS = ("auto", "tgp", "sixel", "halfcell", "unicode")


def keys_line(keys: dict, width: int) -> str:
    """All keys on one or two lines: the long words when the window is wide enough, short ones otherwise."""
    words = [(keys["left"], "left better", "left"), (keys["right"], "right better", "right"), (keys["tie"], "tie", "tie"),
             (keys["bad"], "both bad", "bad"), (keys["skip"], "skip task", "skip"), (keys["undo"], "undo", "undo"),
             ("1/2", "zoom", "zoom"), ("i", "instructions", "info"), ("?", "help", "help"), ("q", "quit", "quit")]
    for long in (True, False):
        text = " " + "  ".join(f"[b]{k}[/b] {w if long else s}" for k, w, s in words)
        if 1 + len("  ".join(f"{k} {w if long else s}" for k, w, s in words)) <= width:
            return text
    return text


# -------- The app ------------------------------------------------------------------------------------------
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


def load_image(dataset: Path, task: dict, i: int):
    from PIL import Image
    return Image.open(dataset / task["images"][i]).convert("RGB")


class ZoomScreen(ModalScreen):
    BINDINGS = [("escape,q,1,2", "app.pop_screen", "close")]

    def __init__(self, image_widget, image, caption):
        super().__init__()
        self.image_widget, self.image, self.caption = image_widget, image, caption

    def compose(self) -> ComposeResult:
        with Vertical(id="zoom"):
            yield Static(self.caption + "  (esc closes)")
            yield self.image_widget(self.image, id="zoomed")


class TextScreen(ModalScreen):
    BINDINGS = [("escape,q,question_mark,i", "app.pop_screen", "close")]

    def __init__(self, text):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="text"):
            yield Markdown(self.text + "\n\n*esc closes*")


class LabelApp(App):
    """One annotator labeling one project: each answer is committed to the store before the next pair shows."""
    TITLE = "drlhf labeler"
    CSS = """
    #prompt { height: auto; max-height: 3; padding: 0 1; text-style: bold; }
    #done { height: auto; max-height: 2; padding: 0 1; color: $success; }
    #pair { height: 1fr; }
    .side { width: 1fr; border: round $accent; padding: 0 1; }
    .side Image { height: 1fr; width: auto; }
    #strip { height: 9; border: round $secondary; }
    .thumb { width: 12; height: 100%; }
    .thumb Image { height: 1fr; width: auto; }
    .thumb Static { height: 1; text-align: center; }
    #status { height: 1; padding: 0 1; background: $boost; }
    #keys { height: auto; background: $panel; }
    #zoom, #text { width: 90%; height: 90%; border: thick $accent; background: $surface; }
    #zoom Image { height: 1fr; width: auto; }
    """

    def __init__(self, store: Store, project: dict, annotator: str, tasks: list, dataset: Path, image_widget,
                 renderer_name: str, keys: dict):
        super().__init__()
        self.store, self.project, self.annotator, self.tasks, self.dataset = store, project, annotator, tasks, dataset
        self.image_widget, self.renderer_name, self.keys = image_widget, renderer_name, keys
        self.by_id = {t["task_id"]: t for t in tasks}
        for key, action, description, show in (
                (keys["left"], "choose('left')", "left better", True), (keys["right"], "choose('right')", "right better", True),
                (keys["tie"], "choose('tie')", "tie", True), (keys["bad"], "flag", "both bad", True),
                (keys["skip"], "skip", "skip task", True), (keys["undo"], "undo", "undo", True),
                ("1", "zoom('left')", "zoom left", False), ("2", "zoom('right')", "zoom right", False),
                ("i", "instructions", "instructions", True), ("question_mark", "help", "help", True),
                ("q", "quit", "quit", True)):
            self.bind(key, action, description=description, show=show)
        self.state = replay(self.store.events(self.project["name"], self.annotator), self.tasks, self.project)
        self.task_id, self.pair, self.shown_at = None, None, time.monotonic()
        self.session_ms, self.saved = [], len(self.store.events(self.project["name"], self.annotator))
        self.acknowledged = len(self.state.decisions)  # decisions committed to the database

    def load(self, task_id: int, i: int):
        try:
            return load_image(self.dataset, self.by_id[task_id], i)
        except OSError as e:  # deleted or damaged while the session runs
            self.fail(f"image {self.dataset / self.by_id[task_id]['images'][i]} of task {task_id} cannot be read "
                      f"({type(e).__name__}); restore it and run the same command again (every decision is saved)")
            return None

    def fail(self, text: str):  # end the session with exit code 1 and one line: what went wrong, what to do
        self.exit(return_code=1, message=f"error: {text}")

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="prompt")
        yield Static(id="done")
        with Horizontal(id="pair"):
            with Vertical(classes="side"):
                yield Static(f"[b]LEFT[/b]  ({self.keys['left']} = left is better)", id="left-label")
                yield self.image_widget(None, id="left")
            with Vertical(classes="side"):
                yield Static(f"[b]RIGHT[/b]  ({self.keys['right']} = right is better)", id="right-label")
                yield self.image_widget(None, id="right")
        yield Horizontal(id="strip")
        yield Static(id="status")
        yield Static(id="keys")  # every key, in as few words as the width needs (Textual's footer cuts them off)

    def on_mount(self):
        self.sub_title = f"{self.project['name']} · {self.annotator} · renderer: {self.renderer_name}"
        self.fit(self.size.width, self.size.height)
        self.refresh_view()
        if self.project["instructions"].strip() and not self.state.decisions:
            self.action_instructions()

    # --- what is shown -----------------------------------------------------------------------------
    def on_resize(self, event):
        self.fit(event.size.width, event.size.height)

    def fit(self, width: int, height: int):
        """The images as large as the window allows: the ordering strip takes a quarter of the height (3 to 9
        rows), each of its K thumbnails an equal share of the width; the key line shortens on narrow windows."""
        k = max(len(t["images"]) for t in self.tasks)
        self.query_one("#strip").styles.height = max(5, min(9, height // 4)) if self.task_id is not None else "1fr"
        for thumb in self.query(".thumb"):
            thumb.styles.width = max(6, min(12, (width - 2) // k))
        self.query_one("#keys", Static).update(keys_line(self.keys, width))

    def refresh_view(self):
        self.task_id = self.state.current_task(self.tasks)
        self.query_one("#pair").display = self.task_id is not None
        if self.task_id is None:  # the end: what was done and what comes next
            self.pair = None
            self.query_one("#prompt", Static).update(
                f"All {len(self.tasks)} tasks are ordered. Export with `python label.py export {self.dataset}`"
                f"{'' if self.project['name'] == 'default' else ' --project ' + self.project['name']}; "
                f"{self.keys['undo']} undoes the last answer, q quits.")
            last = self.state.decisions[-1]["task_id"] if self.state.decisions else None
            if last is not None and self.show_strip(last, f"task {last}: final ordering (best first)") is not None:
                self.query_one("#status", Static).update(self.progress())
            return
        task, sorter = self.by_id[self.task_id], self.state.sorters[self.task_id]
        a, b = sorter.next_pair()
        self.pair = placement(self.project["name"], self.annotator, self.task_id, sorter.decisions, a, b)
        cond = task.get("prompt") or (f"class {task['class_label']}" if "class_label" in task else "(unconditional)")
        cond = cond if len(cond) <= PROMPT_CHARS else cond[:PROMPT_CHARS] + "…"  # a long prompt keeps the images
        self.query_one("#prompt", Static).update(f"Task {self.task_id}: {cond}")
        shown = self.show_strip(self.task_id, "current ordering (best first; = tie, ✗ flagged bad)", self.pair)
        if shown is None:
            return  # the session is ending with the reason (fail)
        self.query_one("#left", self.image_widget).image = shown[self.pair[0]]
        self.query_one("#right", self.image_widget).image = shown[self.pair[1]]
        for side, i in (("left", self.pair[0]), ("right", self.pair[1])):
            bad = " [red]✗ bad[/red]" if i in self.state.both_bad[self.task_id] else ""
            self.query_one(f"#{side}-label", Static).update(
                f"[b]{side.upper()}[/b] #{i}{bad}  ({self.keys[side]} = {side} is better)")
        self.query_one("#status", Static).update(self.progress())
        self.shown_at = time.monotonic()

    def show_strip(self, task_id: int, title: str, pair=()) -> dict | None:
        """The task's ordering so far as thumbnails; returns its images (and the pair's), or None when one of
        them cannot be read (the session then ends)."""
        ranking = self.state.sorters[task_id].ranking()
        shown = {i: self.load(task_id, i) for i in {*pair, *(i for g in ranking for i in g)}}
        if any(image is None for image in shown.values()):
            return None
        strip = self.query_one("#strip", Horizontal)
        strip.remove_children()
        thumbs = []
        for rank, group in enumerate(ranking, 1):
            for i in group:
                tag = f"{rank}{'=' if len(group) > 1 else ''} #{i}{' ✗' if i in self.state.both_bad[task_id] else ''}"
                thumbs.append(Vertical(self.image_widget(shown[i]), Static(tag), classes="thumb"))
        strip.mount(*thumbs)
        strip.border_title = title
        self.fit(self.size.width, self.size.height)
        return shown

    def progress(self) -> str:
        done = sum(s.done for s in self.state.sorters.values())
        position = (sorted(self.by_id).index(self.task_id) + 1) if self.task_id is not None else len(self.tasks)
        per_task = [s.decisions for s in self.state.sorters.values() if s.done] or \
            [sum(math.ceil(math.log2(n + 1)) for n in range(1, len(self.tasks[0]["images"])))]
        left_tasks = len(self.tasks) - done
        pace = self.session_ms[-50:] or [e["ms"] for e in self.state.decisions[-50:] if e.get("ms")]
        eta = (f"{left_tasks * sum(per_task) / len(per_task) * sum(pace) / len(pace) / 60000:.0f} min"
               if pace else "–")
        in_task = ""
        if self.task_id is not None:
            sorter = self.state.sorters[self.task_id]
            in_task = f" · comparison {sorter.decisions + 1} of max {sorter.decisions + sorter.most_left()}"
        return f"task {position}/{len(self.tasks)}{in_task} · {done} ordered · ETA {eta} · {self.saved} answers saved"

    # --- actions: each one is committed to the log before the view changes ---------------------------
    def record(self, kind, **data) -> bool:
        """Commit one event to the store; False (and the session ends) when it could not be saved."""
        try:
            self.store.append(self.project["name"], self.annotator, kind, self.task_id, **data)
            self.saved += 1
            return True
        except sqlite3.Error as e:  # disk full, database locked for too long, file removed
            self.fail(f"could not save to {self.store.path} ({e}); the decisions saved before this one are kept: fix "
                      "the cause (free space, say) and run the same command again")
            return False

    def action_choose(self, which: str):
        if self.pair is None:
            return
        left, right = self.pair
        a, b = self.state.sorters[self.task_id].next_pair()
        winner = {"left": left, "right": right}.get(which)
        outcome = "tie" if winner is None else ("a" if winner == a else "b")
        ms = round((time.monotonic() - self.shown_at) * 1000)
        if not self.record("decision", a=a, b=b, left=left, right=right, outcome=outcome, ms=ms):
            return
        self.state.sorters[self.task_id].apply(a, b, outcome)
        self.state.decisions.append(dict(task_id=self.task_id, a=a, b=b, left=left, right=right,
                                         outcome=outcome, ms=ms))
        self.session_ms.append(ms)
        self.acknowledged = len(self.state.decisions)
        sorter = self.state.sorters[self.task_id]
        self.show_done(f"Task {self.task_id} is ordered: {ordering_text(sorter.ranking())}" if sorter.done else "")
        self.refresh_view()

    def show_done(self, text: str):
        """The line above the pair: a finished task's final ordering, shown until the next key."""
        self.query_one("#done", Static).update(text)
        self.query_one("#done").display = bool(text)

    def action_flag(self):
        if self.pair is not None:
            if not self.record("flag", left=self.pair[0], right=self.pair[1]):
                return
            self.state.both_bad[self.task_id] |= set(self.pair)
            self.show_done("")
            self.notify(f"flagged #{self.pair[0]} and #{self.pair[1]} of task {self.task_id} as both bad; now choose")
            self.refresh_view()

    def action_skip(self):
        if self.pair is not None:
            if not self.record("skip"):
                return
            self.state.skipped.append(self.task_id)
            self.show_done("")
            self.notify(f"skipped task {self.task_id}: it comes back after the others")
            self.refresh_view()

    def action_undo(self):
        undone = (effective_events(self.store.events(self.project["name"], self.annotator)) or [None])[-1]
        if undone is None:
            self.notify("nothing to undo")
            return
        self.task_id = None  # an undo is not tied to a task
        if not self.record("undo"):
            return
        self.state = replay(self.store.events(self.project["name"], self.annotator), self.tasks, self.project)
        self.acknowledged = len(self.state.decisions)
        self.show_done("")
        what = {"decision": lambda e: f"the answer #{e['a']} vs #{e['b']}", "flag": lambda e: "the both-bad flag",
                "skip": lambda e: "the skip"}[undone["kind"]](undone)
        self.notify(f"undid {what} of task {undone['task_id']}")
        self.refresh_view()

    def action_zoom(self, side: str):
        if self.pair is not None:
            i = self.pair[0 if side == "left" else 1]
            self.push_screen(ZoomScreen(self.image_widget, self.load(self.task_id, i), f"task {self.task_id}, {side} image (#{i})"))

    def action_instructions(self):
        self.push_screen(TextScreen(self.project["instructions"] or "No instructions were given for this project."))

    def action_help(self):
        self.push_screen(TextScreen(
            "# Keys\n\n| key | action |\n|---|---|\n"
            f"| {self.keys['left']} | left image is better |\n| {self.keys['right']} | right image is better |\n"
            f"| {self.keys['tie']} | tie: equally good |\n| {self.keys['bad']} | flag both images as bad (then still "
            f"choose) |\n| {self.keys['skip']} | skip this task (it comes back at the end) |\n"
            f"| {self.keys['undo']} | undo the last decision, flag or skip (repeatable, survives restarts) |\n"
            "| 1 / 2 | zoom the left / right image |\n| i | instructions |\n| q | quit (everything is saved) |\n\n"
            f"The images of a comparison are placed left/right at random. Renderer: {self.renderer_name} "
            "(force one with --renderer)."))


def make_app(store, project, annotator, tasks, dataset: Path, renderer="auto", keys=None) -> LabelApp:
    image_widget, renderer_name = image_widget_class(renderer)
    return LabelApp(store, project, annotator, tasks, Path(dataset), image_widget, renderer_name,
                    {**DEFAULT_KEYS, **(keys or {})})


# -------- Command line -------------------------------------------------------------------------------------
def open_project(args, create_default=True):
    dataset = Path(args.dataset)
    tasks = load_tasks(dataset, check_images=args.command != "export")
    store = Store(Path(args.db) if args.db else dataset / "labels.sqlite", read_only=args.command != "label")
    project = store.project(args.project, missing_ok=True)
    created = project is None
    if created:
        if not create_default:
            store.project(args.project)  # raises with the list of projects
        project = create(store, dataset, tasks, args)
    if project["fingerprint"] != dataset_fingerprint(dataset):
        raise LabelError(f"project {args.project!r} in {store.path} belongs to another dataset ({project['dataset']}); "
                         f"choose another --project or --db for {dataset}")
    clash = [flag for flag, given, differs in (
        ("--all-pairs", getattr(args, "all_pairs", False), not project["all_pairs"]),
        ("--recheck", getattr(args, "recheck", False), not project["recheck"]),
        ("--k", getattr(args, "k", None), getattr(args, "k", None) != project["k"]),
        ("--instructions", getattr(args, "instructions", None), True)) if given and differs]
    if clash and not created:
        raise LabelError(f"project {project['name']!r} exists with K = {project['k']}, "
                         f"{'all pairs' if project['all_pairs'] else 'binary insertion'}"
                         f"{', re-check' if project['recheck'] else ''} and its own instructions; "
                         f"{', '.join(clash)} only apply when a project is created: drop the flag "
                         "or choose a new --project")
    return dataset, tasks, store, project


def parse_keys(spec: str) -> dict:
    """--keys left=j,right=l,... -> the full key map; one key per action, the fixed keys (1, 2, i, ?, q) kept."""
    try:
        keys = {**DEFAULT_KEYS, **dict(kv.split("=", 1) for kv in spec.split(",") if kv)}
    except ValueError:
        raise LabelError(f"--keys {spec}: expected action=key pairs, e.g. left=j,right=l") from None
    unknown = set(keys) - set(DEFAULT_KEYS)
    if unknown:
        raise LabelError(f"--keys: unknown action(s) {sorted(unknown)}; actions: {', '.join(DEFAULT_KEYS)}")
    taken = [k for k in keys.values() if k in FIXED_KEYS or list(keys.values()).count(k) > 1]
    if taken:
        raise LabelError(f"--keys {spec}: key {taken[0]!r} would serve two actions (the fixed keys are "
                         f"{', '.join(FIXED_KEYS)}); give every action its own key")
    return keys


def create(store, dataset, tasks, args):
    meta = dataset_meta(dataset)
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


def list_projects(args):
    """label.py list: every project of the store, each annotator's progress (a read-only store is read as it is)."""
    dataset = Path(args.dataset)
    store = Store(Path(args.db) if args.db else dataset / "labels.sqlite", quiet=True, read_only=True)
    print("\n".join(progress(store, load_tasks(dataset, check_images=False))))


def win_rate_report(args):
    """label.py winrate: a blind comparison's report from every annotator's answers (drlhf/comparison.py)."""
    dataset, tasks, store, project = open_project(args, create_default=False)
    key, r = comparison.report_from_store(dataset, store, project, tasks, make_dir(Path(args.out or dataset), "--out"),
                                          args.seed)
    print(f"[label] B ({key['model_b']}) over A ({key['model_a']}): win rate {r['win_rate_b']:.3f}, 95 % interval "
          f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}], ties {r['tie_rate']:.1%}, {r['judgments']} judgments; "
          f"report.json and winrate.png in {args.out or dataset}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dataset", help="labeling dataset folder written by sample.py (tasks.jsonl, images/)")
    common.add_argument("--project", default="default", help="project name (several may label one dataset)")
    common.add_argument("--db", help="SQLite database (default DATASET/labels.sqlite)")
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--k", type=cli.bounded(int, 2), help="images per task (default: from dataset.json)")
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
    lab.add_argument("--auto", metavar="SPEC", help="rank by builtin:ink|stroke|colorfulness or module:function (images "
                     "in [-1,1], prompts) -> one score per image, higher preferred; e.g. gold.py holding `def ink(images, "
                     "prompts): return images.mean((1, 2, 3))` and --auto gold:ink (gold.py in the working directory or on PYTHONPATH)")
    exp = sub.add_parser("export", parents=[common], help="write rankings.jsonl, pairs.jsonl and report.md")
    exp.add_argument("--out", help="output folder (default: the dataset folder)")
    exp.add_argument("--val-fraction", type=cli.bounded(float, 0, 1), default=0.2, help="validation share of tasks, [0, 1)")
    exp.add_argument("--seed", type=cli.bounded(int, 0, 2 ** 32), default=0, help="seed of the train/validation split by task")
    win = sub.add_parser("winrate", parents=[common], help="a blind comparison (sample.py --compare): B's win rate over "
                         "A with its 95 %% interval, per annotator and condition, agreement (thesis 8.1)")
    win.add_argument("--out", help="folder for report.json and winrate.png (default: the dataset folder)")
    win.add_argument("--seed", type=cli.bounded(int, 0, 2 ** 32), default=0, help="seed of the bootstrap interval")
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
        list_projects(args)
    elif args.command == "label":
        keys, scorer = parse_keys(args.keys), load_scorer(args.auto) if args.auto else None  # before any write
        if not args.auto and not all(not s.closed and s.isatty() for s in (sys.stdin, sys.stdout)):
            raise LabelError("label.py label shows its app in a terminal, and stdin or stdout is not one; run it in a "
                             "terminal (over SSH: in tmux), or rank without a human with --auto module:function")
        dataset, tasks, store, project = open_project(args)
        annotator = args.annotator or ("auto" if args.auto else os.environ.get("USER", "annotator"))
        args.lock = session_lock(store, project["name"], annotator)  # held until the process ends
        if args.auto:
            auto_label(store, project, annotator, tasks, dataset, scorer)
            print(f"[label] {args.auto} ranked every task of project {project['name']!r}")
            return
        app = make_app(store, project, annotator, tasks, dataset, args.renderer, keys)
        app.run()
        if app.return_code:
            sys.exit(app.return_code)
        state = replay(store.events(project["name"], annotator), tasks, project)
        print(f"[label] {annotator}: {len(state.decisions)} decisions saved in {store.path}, "
              f"{sum(s.done for s in state.sorters.values())} of {len(tasks)} tasks ordered; continue with "
              f"`python label.py label {dataset} --annotator {annotator}`" + (f" --project {project['name']}"
                                                                             if project["name"] != "default" else ""))
    elif args.command == "export":
        dataset, tasks, store, project = open_project(args, create_default=False)
        print(export(store, project, tasks, Path(args.out or dataset), args.val_fraction, args.seed))
    elif args.command == "winrate":
        win_rate_report(args)


if __name__ == "__main__":
    cli.run(main, expected=(sqlite3.DatabaseError,))  # bad input: one line and exit code 1
