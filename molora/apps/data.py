"""Text-classification tasks: the task record, a loader for task folders, and synthetic tasks.

A *task* is a list of labelled texts plus an instruction and the label strings. Labels are kept as
strings (not just indices) because the classifier in :mod:`molora.apps.textcls` scores a text against
the embedding of each label name, so the same label string means the same thing in every task.

Folder format (as in ``shared/data/clbench``)::

    root/tasks.json              {"<task>": {"instruction": str, "labels": [str, ...], ...}, ...}
    root/<task>/train.jsonl      {"text": str, "label": str}  one object per line
    root/<task>/test.jsonl
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TextTask", "load_task_folder", "task_from_records", "make_synthetic_tasks", "SYNTHETIC_TASK_NAMES"]


@dataclasses.dataclass
class TextTask:
    """One text-classification task.

    Attributes:
        name: task name (unique within a benchmark).
        instruction: natural-language instruction prepended to every input.
        labels: the label strings; ``train``/``test`` labels are indices into this list.
        train, test: ``(text, label_index)`` pairs.
    """

    name: str
    instruction: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 labels, got {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name!r} has duplicate labels: {self.labels}")
        for split in ("train", "test"):
            for text, y in getattr(self, split):
                if not (isinstance(y, int) and 0 <= y < len(self.labels)):
                    raise ValueError(f"task {self.name!r} {split}: label index {y!r} out of range for {self.labels}")

    def with_limits(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "TextTask":
        """A copy with at most ``train``/``test`` examples, drawn uniformly without replacement.

        The draw is seeded (``random.Random(seed)``, independent per split) and keeps the original
        order of the kept examples, so a smaller limit under the same seed is not a subset by
        construction, but the result is reproducible.
        """
        return dataclasses.replace(
            self,
            labels=list(self.labels),
            train=_subsample(self.train, train, seed, "train"),
            test=_subsample(self.test, test, seed, "test"),
        )

    def label_counts(self, split: str = "train") -> dict[str, int]:
        """Number of examples per label string in ``split``."""
        counts = {lab: 0 for lab in self.labels}
        for _, y in getattr(self, split):
            counts[self.labels[y]] += 1
        return counts


def _subsample(rows: list[tuple[str, int]], limit: int | None, seed: int, split: str) -> list[tuple[str, int]]:
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit < 0:
        raise ValueError(f"{split} limit must be >= 0, got {limit}")
    # Per-split stream so the train draw does not depend on the test limit and vice versa.
    rng = random.Random(f"{seed}:{split}")
    keep = sorted(rng.sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _label_index(label: Any, labels: Sequence[str], where: str) -> int:
    if isinstance(label, bool):  # JSON true/false for tasks labelled "True"/"False"
        label = str(label)
    if isinstance(label, str):
        try:
            return labels.index(label)
        except ValueError:
            raise ValueError(f"{where}: label {label!r} is not in the task's labels {list(labels)}") from None
    if isinstance(label, int):
        # An integer label (e.g. a Hugging Face ClassLabel column) is an index into `labels`.
        if 0 <= label < len(labels):
            return label
        raise ValueError(f"{where}: label index {label} out of range for labels {list(labels)}")
    raise ValueError(f"{where}: label must be a string or an index, got {label!r}")


def task_from_records(name: str, instruction: str, labels: Sequence[str], train: Iterable[Mapping[str, Any]],
                      test: Iterable[Mapping[str, Any]]) -> TextTask:
    """Build a task from rows with ``"text"`` and ``"label"`` (a label string or an index).

    Any iterable of mappings works, including a ``datasets.Dataset``.
    """
    labels = [str(x) for x in labels]

    def rows(split: str, data: Iterable[Mapping[str, Any]]) -> list[tuple[str, int]]:
        out = []
        for i, r in enumerate(data):
            if "text" not in r or "label" not in r:
                raise ValueError(f"task {name!r} {split} row {i}: needs 'text' and 'label', got keys {sorted(r)}")
            out.append((str(r["text"]), _label_index(r["label"], labels, f"task {name!r} {split} row {i}")))
        return out

    return TextTask(name=name, instruction=str(instruction), labels=labels, train=rows("train", train), test=rows("test", test))


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the datasets library's progress bars and info logs, restoring them afterwards."""
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _load_jsonl_splits(files: dict[str, Path]) -> dict[str, Any]:
    import datasets

    # keep_in_memory plus a throw-away cache dir: nothing is written to ~/.cache, and the small
    # files parse in well under a second.
    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="molora-data-") as cache:
        dd = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()},
                                   keep_in_memory=True, cache_dir=cache)
        return {k: dd[k] for k in files}


def load_task_folder(root: str | Path, names: Sequence[str] | None = None, *, train_limit: int | None = None,
                     test_limit: int | None = None, seed: int = 0) -> list[TextTask]:
    """Load tasks from a folder in the clbench format (see the module docstring).

    Args:
        root: the folder holding ``tasks.json``.
        names: tasks to load, in this order; default all tasks in ``tasks.json`` order.
        train_limit, test_limit: optional per-task caps, applied with :meth:`TextTask.with_limits`.
        seed: seed of the subsampling.

    The jsonl files are read with ``datasets.load_dataset("json", ...)``.

    Raises:
        FileNotFoundError: missing folder, ``tasks.json`` or split file (the path is named).
        ValueError: unknown task name (the available ones are listed) or a label not in the task's labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"task folder not found: {root}")
    meta_path = root / "tasks.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no tasks.json in task folder {root}")
    meta = json.loads(meta_path.read_text())
    if names is None:
        names = list(meta)
    else:
        names = list(names)
        unknown = [n for n in names if n not in meta]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in {meta_path}; available: {sorted(meta)}")
    tasks = []
    for name in names:
        info = meta[name]
        for key in ("instruction", "labels"):
            if key not in info:
                raise ValueError(f"task {name!r} in {meta_path} has no {key!r}")
        files = {split: root / name / f"{split}.jsonl" for split in ("train", "test")}
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(f"task {name!r}: missing split file {path}")
        splits = _load_jsonl_splits(files)
        task = task_from_records(name, info["instruction"], info["labels"], splits["train"], splits["test"])
        if train_limit is not None or test_limit is not None:
            task = task.with_limits(train=train_limit, test=test_limit, seed=seed)
        tasks.append(task)
    return tasks


# ---------------------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------------------

#
# Design. Each task is generated from templates: a label-specific *cue* (the part that decides the
# label) is embedded in label-neutral context (products, places, ticket numbers, filler words).
# The label names are deliberately indirect or terse (severity codes, one-word newsroom desks,
# language names for questions that never name the language, "swap" for a wrong-size review,
# a diet rule over an ingredient list), so the frozen encoder's label-name similarity is only
# partly right (zero-shot 41-66% per task) and training has to teach the mapping; the six input
# distributions (reviews, headlines, assistant requests, programming questions, support tickets,
# recipes) are far apart, so a sentence embedding tells the tasks apart (retrieval routing).
# Generation is deterministic under the seed; train and test texts never repeat.

_FILLER = ["", "", "", "ok so ", "hmm, ", "fwiw ", "honestly ", "update: ", "quick one: ", "btw "]


def _pick(rng: random.Random, xs: Sequence[str]) -> str:
    return xs[rng.randrange(len(xs))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_REVIEW_CUES = {
    "happy": ["works perfectly", "it exceeded my expectations", "I use it every day now", "great value for the money",
             "my kids love it", "sturdy and well made", "I would buy it again", "it does exactly what it says",
             "quiet, fast and easy to clean", "five stars, no complaints"],
    "swap": ["the size is too small", "I ordered blue but got green", "it fits my old model but not the new one",
                 "nice, but I need the larger version", "the wrong colour arrived", "the medium runs tight, I need a large",
                 "love the design, wrong size though", "it came in the wrong variant", "the plug is for another country",
                 "good quality but one size up would fit"],
    "broken": ["it stopped working after two days", "it arrived cracked and leaking", "cheap plastic that fell apart",
               "a complete waste of money", "the battery died on the first charge", "it smells of burnt rubber",
               "nothing like the photos, junk", "it broke the first time I used it", "the seller never answered, it is broken",
               "dangerous, it sparked when plugged in"],
}
_PRODUCTS = ["blender", "backpack", "phone case", "desk lamp", "pair of running shoes", "kettle", "rain jacket", "headset",
             "yoga mat", "coffee grinder", "toaster", "office chair", "water bottle", "keyboard", "sleeping bag"]
_WHEN = ["last week", "a month ago", "on sale", "for my birthday", "yesterday", "two weeks ago", "in the spring sale"]


def _gen_reviews(rng: random.Random, label: str) -> str:
    cue, prod, when = _pick(rng, _REVIEW_CUES[label]), _pick(rng, _PRODUCTS), _pick(rng, _WHEN)
    t = rng.randrange(4)
    if t == 0:
        return f"I bought this {prod} {when}. {_cap(cue)}."
    if t == 1:
        return f"{_cap(prod)} review: {cue}. Delivery was {_pick(rng, ['quick', 'slow', 'on time'])}."
    if t == 2:
        return f"Got the {prod} {when}; {cue}."
    return f"{_cap(_pick(rng, _FILLER))}{cue} - {prod}, ordered {when}."


_NEWS_CUES = {
    "money": ["shares of the carmaker fell 4% after weak earnings", "the central bank holds interest rates steady",
               "bond yields climb as inflation data surprises", "retail sales beat analyst forecasts",
               "merger talks between two lenders collapse", "oil prices slide on a supply glut",
               "the index closed at a record high", "a startup raises $40 million in a series B round",
               "the currency weakens against the dollar", "quarterly profits double at the chipmaker"],
    "arena": ["the striker scores twice in a derby win", "the coach is sacked after five straight defeats",
              "the champion retains her title in a five-set thriller", "the marathon record is broken in Berlin",
              "the goalkeeper is ruled out for the season", "the underdogs reach the cup final",
              "a rookie pitcher throws a no-hitter", "the team clinches the league on the final day",
              "the cyclist takes the yellow jersey", "the sprinter is banned after a failed test"],
    "lab": ["researchers sequence the genome of a rare orchid", "a telescope spots water vapour on a distant planet",
              "a new battery chemistry doubles storage", "a study links gut bacteria to mood",
              "physicists measure the neutron lifetime more precisely", "a fossil of a feathered dinosaur is found",
              "lab-grown cartilage repairs knee injuries in a trial", "ice cores reveal ancient climate swings",
              "a vaccine candidate passes its first safety trial", "engineers build a chip that mimics neurons"],
    "parliament": ["parliament passes the budget after a late-night vote", "the senator announces a bid for governor",
                "coalition talks stall over tax reform", "the minister resigns amid an expenses scandal",
                "the opposition calls for a snap election", "a new data privacy law clears committee",
                "the president vetoes the spending bill", "an ambassador is recalled after a diplomatic row",
                "voters reject the referendum on term limits", "the mayor faces a no-confidence motion"],
}
_PLACES = ["LONDON", "TOKYO", "NAIROBI", "BERLIN", "LIMA", "OTTAWA", "MUMBAI", "SYDNEY", "OSLO", "MADRID"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend"]


def _gen_news(rng: random.Random, label: str) -> str:
    cue, place, day = _pick(rng, _NEWS_CUES[label]), _pick(rng, _PLACES), _pick(rng, _DAYS)
    t = rng.randrange(4)
    if t == 0:
        return f"{place} - {_cap(cue)}, local media reported on {day}."
    if t == 1:
        return f"{_cap(cue)}, officials said on {day}."
    if t == 2:
        return f"BREAKING ({place}): {cue}."
    return f"{day} briefing: {cue}, according to a wire report from {place.title()}."


_ASSISTANT_CUES = {
    "timer": ["wake me up at six tomorrow", "remind me in twenty minutes to check the oven", "ping me at 3pm",
              "count down ten minutes for the pasta", "nudge me before the meeting starts", "set something for half past seven",
              "tell me when an hour has passed", "I need to get up early on friday"],
    "playlist": ["put on something relaxing", "I want to hear that song from the movie again", "skip this track",
                 "turn up the jazz", "play the album my sister recommended", "something upbeat for running please",
                 "shuffle my favourites", "go back to the previous song"],
    "forecast": ["do I need an umbrella tomorrow", "is it going to be windy at the beach on saturday",
                 "how cold will it get tonight", "will it snow this weekend", "should I bring sunscreen to the picnic",
                 "is the storm reaching us before noon", "what will it feel like outside later", "any chance of frost overnight"],
    "errand": ["add milk and eggs to my shopping list", "order more dog food", "book a table for two at eight",
               "buy printer ink", "get a taxi to the station", "reorder the laundry detergent",
               "pick up a birthday cake on the way", "schedule a haircut for thursday"],
}
_POLITE = ["", "please", "could you", "hey assistant,", "quick favour:", "if you can,", "right now:", "when you get a chance,"]


def _gen_assistant(rng: random.Random, label: str) -> str:
    cue, polite = _pick(rng, _ASSISTANT_CUES[label]), _pick(rng, _POLITE)
    t = rng.randrange(3)
    if t == 0:
        return f"{polite} {cue}".strip() + _pick(rng, [".", "?", "!", ""])
    if t == 1:
        return f"{_cap(_pick(rng, _FILLER))}{cue}, {_pick(rng, ['thanks', 'cheers', 'ty', 'thank you'])}"
    return f"Assistant, {cue}. {_pick(rng, ['I am in the kitchen.', 'I am driving.', 'I am at work.', ''])}".strip()


_CODE_CUES = {
    "python": ["my list comprehension with enumerate returns None", "pip install fails inside the virtualenv",
              "I get an IndentationError after the def line", "decorators with arguments confuse me",
              "a pandas groupby is very slow", "the asyncio event loop is already running",
              "my __init__.py import is circular", "a dict comprehension drops keys"],
    "rust": ["the borrow checker says the value was moved", "lifetime 'a does not live long enough",
             "cargo build fails on a crate feature", "I can't implement a trait for Vec<T>",
             "calling unwrap on a None value panicked", "should I use Box<dyn Error> or anyhow",
             "a mutable borrow occurs while immutably borrowed", "my match is not exhaustive"],
    "go": ["a goroutine leaks when the channel is never closed", "go mod tidy removes my dependency",
               "there is a nil pointer dereference in my http handler", "select with a timeout never fires",
               "the interface{} type assertion fails", "defer inside a loop keeps files open",
               "my struct does not satisfy the interface", "a WaitGroup is reused before Wait returns"],
    "java": ["a NullPointerException appears in my Spring bean", "maven cannot resolve the dependency",
             "the JVM runs out of heap space", "generics with wildcards confuse me",
             "ArrayList vs LinkedList performance surprises me", "garbage collector pauses stall my service",
             "my @Override method is never called", "a checked exception must be caught or declared"],
}
_CODE_TAILS = ["Any idea?", "What am I doing wrong?", "Thanks in advance.", "Stack trace below.", "Using the latest version.", ""]


def _gen_code(rng: random.Random, label: str) -> str:
    cue, tail = _pick(rng, _CODE_CUES[label]), _pick(rng, _CODE_TAILS)
    t = rng.randrange(3)
    if t == 0:
        return f"Question: {cue}. {tail}".strip()
    if t == 1:
        return f"Help! {_cap(cue)} in my side project. {tail}".strip()
    return f"{_cap(_pick(rng, _FILLER))}{cue} - {tail}".strip(" -")


_TICKET_CUES = {
    "sev1": ["the whole site is down", "no customer can log in", "payments are failing for everyone",
           "we are losing data on every save", "the production database is unreachable", "all outgoing emails bounce",
           "the checkout returns a 500 for all users", "our API keys were leaked publicly"],
    "sev2": ["the export takes ten minutes but finishes", "one report shows the wrong totals",
           "search is slow for some users", "the mobile app crashes on the settings screen",
           "invoices show the wrong date", "sync is delayed by about an hour",
           "a few customers see duplicate notifications", "the CSV import skips some rows"],
    "sev3": ["there is a typo on the pricing page", "could you add a dark mode", "the logo looks blurry on retina screens",
           "a tooltip is misaligned", "please rename a column in the dashboard", "feature request: keyboard shortcuts",
           "the footer links are in the wrong order", "the welcome email could be friendlier"],
}
_TICKET_SIGN = ["Regards, Sam", "Thanks, the ops team", "ASAP please!!", "urgent", "Not sure if this is known.", "Cheers", ""]


def _gen_tickets(rng: random.Random, label: str) -> str:
    # The urgency words in the signature are drawn independently of the label: noise to ignore.
    cue, sign, num = _pick(rng, _TICKET_CUES[label]), _pick(rng, _TICKET_SIGN), rng.randrange(1000, 9999)
    t = rng.randrange(3)
    if t == 0:
        return f"Ticket #{num}: {cue}. {sign}".strip()
    if t == 1:
        return f"Hi team, {cue}. {sign}".strip()
    return f"[{_pick(rng, ['web', 'mobile', 'billing', 'infra'])}] {_cap(cue)} since this morning. {sign}".strip()


_ING = {
    "neutral": ["rice", "onion", "garlic", "tomato", "pasta", "black beans", "peppers", "lentils", "mushrooms",
                "potatoes", "spinach", "tofu", "chickpeas", "coconut milk", "carrots", "olive oil", "noodles"],
    "dairy": ["paneer", "eggs", "cheddar", "butter", "greek yogurt", "cream", "mozzarella", "parmesan", "feta"],
    "meat": ["chicken thighs", "bacon", "beef mince", "anchovies", "pork belly", "salmon", "chorizo", "lamb shoulder", "prawns"],
}
_DISHES = ["stew", "curry", "bake", "stir-fry", "salad", "soup", "traybake", "risotto", "wrap", "pie"]


def _gen_recipes(rng: random.Random, label: str) -> str:
    # The label is a rule over the whole ingredient list: any meat or fish -> "meat or fish";
    # else any dairy or egg -> "veggie"; else "plant-based". The deciding ingredient sits at a random position.
    ings = rng.sample(_ING["neutral"], 3)
    if label != "plant-based":
        ings[rng.randrange(3)] = _pick(rng, _ING["dairy" if label == "veggie" else "meat"])
    dish, mins = _pick(rng, _DISHES), rng.choice([15, 20, 25, 30, 45, 60])
    t = rng.randrange(3)
    if t == 0:
        return f"Tonight's {dish}: {ings[0]}, {ings[1]} and {ings[2]}, cooked for {mins} minutes."
    if t == 1:
        return f"Ingredients - {', '.join(ings)}. Simmer the {dish} for {mins} min and serve."
    return f"Easy {dish} with {ings[0]} and {ings[1]}, topped with {ings[2]}."


_SYNTH_SPECS: list[tuple[str, str, list[str], Any]] = [
    ("reviews", "What will the customer do with the product?",
     ["happy", "swap", "broken"], _gen_reviews),
    ("news", "Which newsroom desk should handle this story?", ["money", "arena", "lab", "parliament"], _gen_news),
    ("assistant", "Which skill of the voice assistant should handle this request?",
     ["timer", "playlist", "forecast", "errand"], _gen_assistant),
    ("code", "Which community should answer this programming question?",
     ["python", "rust", "go", "java"], _gen_code),
    ("tickets", "Assign a priority to this support ticket.", ["sev1", "sev2", "sev3"], _gen_tickets),
    ("recipes", "Classify the dish by diet.", ["plant-based", "veggie", "meat or fish"], _gen_recipes),
]
SYNTHETIC_TASK_NAMES = tuple(s[0] for s in _SYNTH_SPECS)


def make_synthetic_tasks(seed: int = 0, n_train: int = 240, n_test: int = 120,
                         names: Sequence[str] | None = None) -> list[TextTask]:
    """The demo's built-in tasks, generated from templates and word lists (no download).

    Six tasks with 3-4 labels each (see ``SYNTHETIC_TASK_NAMES``): product ``reviews`` (happy /
    swap / broken), ``news`` headlines (newsroom desk: money / arena / lab / parliament),
    ``assistant`` requests (timer / playlist / forecast / errand), programming questions ``code``
    that never name the language (python / rust / go / java), support ``tickets`` (sev1 / sev2 /
    sev3, with label-independent urgency noise) and ``recipes`` (plant-based / veggie / meat or
    fish, a rule over the ingredient list). Labels are balanced (round-robin, then shuffled); texts are unique
    within and across splits. Deterministic given ``seed``.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    specs = _SYNTH_SPECS
    if names is not None:
        unknown = [n for n in names if n not in SYNTHETIC_TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown synthetic task(s) {unknown}; available: {list(SYNTHETIC_TASK_NAMES)}")
        specs = [next(s for s in _SYNTH_SPECS if s[0] == n) for n in names]
    tasks = []
    for name, instruction, labels, gen in specs:
        rng = random.Random(f"molora-synthetic:{name}:{seed}")
        seen: set[str] = set()

        def draw(n: int) -> list[tuple[str, int]]:
            ys = [i % len(labels) for i in range(n)]
            rng.shuffle(ys)
            rows = []
            for y in ys:
                for _ in range(1000):
                    text = gen(rng, labels[y])
                    if text not in seen:
                        break
                else:
                    raise ValueError(f"synthetic task {name!r}: cannot draw {n} distinct texts; lower n_train/n_test")
                seen.add(text)
                rows.append((text, y))
            return rows

        train = draw(n_train)
        test = draw(n_test)
        tasks.append(TextTask(name=name, instruction=instruction, labels=list(labels), train=train, test=test))
    return tasks
