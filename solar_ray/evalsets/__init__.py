"""The offline evaluation suite: six lm-evaluation-harness tasks in the H6 task shapes.

Every item is written for this project (:mod:`solar_ray.evalsets.items`) or generated
deterministically here from fixed seeds, so the suite runs without a network and gives the
same items on every run and machine (:func:`suite_fingerprint` identifies them). None of
it comes from the Python documentation, which the demo pretrains on.

=================  ======================  ====================================  ===============
task               H6 shape                 items                                 headline metric
=================  ======================  ====================================  ===============
``solar_sci``      ARC (MC, 25-shot)        hand-written science questions        acc_norm
``solar_cloze``    HellaSwag (MC endings)   hand-written everyday scenarios       acc_norm
``solar_mmlu``     MMLU (lettered MC)       hand-written facts + Python semantics acc
``solar_truthful`` TruthfulQA mc2           hand-written misconceptions           mc2 (acc)
``solar_wino``     Winogrande (partial)     hand-written twin sentences           acc
``solar_arith``    GSM8K (generation)       generated arithmetic word problems    exact_match
=================  ======================  ====================================  ===============

Each task is an inline lm-eval config (:func:`lm_eval_config`): ``custom_dataset`` builds
the rows in memory, so nothing is downloaded or cached, and the scoring (log-likelihood of
the choices, ``acc``/``acc_norm``, mc2, regex answer extraction) is lm-eval's own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from solar_ray.evalsets import items as _items

__all__ = [
    "OFFLINE_TASKS",
    "OfflineTask",
    "arithmetic_problems",
    "fewshot_pool_size",
    "item_texts",
    "lm_eval_config",
    "offline_items",
    "suite_fingerprint",
]

_MC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]


@dataclass(frozen=True)
class OfflineTask:
    """One task of the offline suite."""

    name: str  #: lm-eval task name and result key
    display: str  #: table column
    shape: str  #: the H6 task it mirrors
    metric: str  #: headline lm-eval metric key, e.g. ``acc_norm,none``
    num_fewshot: int


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        # fewer shots than H6's (25/10/5/0/5/5): a CPU evaluates these in minutes, not hours
        OfflineTask("solar_sci", "Sci (ARC)", "arc_challenge", "acc_norm,none", 3),
        OfflineTask("solar_cloze", "Cloze (HellaSwag)", "hellaswag", "acc_norm,none", 2),
        OfflineTask("solar_mmlu", "Know (MMLU)", "mmlu", "acc,none", 3),
        OfflineTask("solar_truthful", "Truth (TruthfulQA)", "truthfulqa_mc2", "acc,none", 0),
        OfflineTask("solar_wino", "Wino (Winogrande)", "winogrande", "acc,none", 3),
        OfflineTask("solar_arith", "Arith (GSM8K)", "gsm8k", "exact_match,flexible-extract", 2),
    )
}


# --------------------------------------------------------------------------- helpers


def _seed(name: str) -> int:
    """A stable per-name seed (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _shuffle_choices(correct_first: list[str], rng: random.Random) -> tuple[list[str], int]:
    order = list(range(len(correct_first)))
    rng.shuffle(order)
    return [correct_first[i] for i in order], order.index(0)


def _split(rows: list[dict], num_train: int, name: str) -> dict[str, list[dict]]:
    """First ``num_train`` rows are the few-shot pool; the rest, shuffled, the test set."""
    train, test = rows[:num_train], rows[num_train:]
    random.Random(_seed(name + "/order")).shuffle(test)
    for i, row in enumerate(test):
        row["id"] = f"{name}/{i}"
    for i, row in enumerate(train):
        row["id"] = f"{name}/train/{i}"
    return {"train": train, "test": test}


# --------------------------------------------------------------------------- hand-written sets


def _sci() -> dict[str, list[dict]]:
    rng = random.Random(_seed("solar_sci"))
    rows = []
    for question, answers in _items.SCIENCE:
        choices, label = _shuffle_choices(answers, rng)
        rows.append({"question": question, "choices": choices, "label": label})
    return _split(rows, 5, "solar_sci")


def _truthful() -> dict[str, list[dict]]:
    rows = []
    for question, true, false in _items.TRUTHFUL:
        rows.append(
            {"question": question, "choices": true + false, "labels": [1] * len(true) + [0] * len(false)}
        )
    return _split(rows, 0, "solar_truthful")


def _wino() -> dict[str, list[dict]]:
    rows = [
        {"sentence": s, "option1": o1, "option2": o2, "answer": a} for s, o1, o2, a in _items.WINO
    ]
    return _split(rows, 6, "solar_wino")


# --------------------------------------------------------------------------- generated sets

_WORDS = ("solar", "python", "merge", "ray", "layer", "token", "matrix", "kernel", "shard", "vector")


def _python_item(rng: random.Random, kind: int) -> tuple[str, str, list[str]]:
    """A question about a Python expression, its answer and three wrong answers."""
    if kind == 0:
        a, b = rng.randint(20, 99), rng.randint(3, 9)
        expr, v = f"{a} // {b}", a // b
        wrong = [a % b if a % b != v else v + 2, v + 1, v - 1]
    elif kind == 1:
        a, b = rng.randint(20, 99), rng.randint(3, 9)
        expr, v = f"{a} % {b}", a % b
        wrong = [a // b, v + 1, v + b]
    elif kind == 2:
        a, b = rng.randint(2, 5), rng.randint(2, 4)
        expr, v = f"{a} ** {b}", a**b
        wrong = [a * b if a * b != v else v + a, a ** (b - 1), a ** (b + 1)]
    elif kind == 3:
        w = rng.choice(_WORDS)
        expr, v = f'len("{w}")', len(w)
        wrong = [v - 1, v + 1, v + 2]
    elif kind == 4:
        lst = rng.sample(range(1, 30), 4)
        expr, v = f"sorted({lst})[0]", min(lst)
        wrong = [max(lst), *lst]
    elif kind == 5:
        n = rng.randint(4, 12)
        expr, v = f"sum(range({n}))", sum(range(n))
        wrong = [sum(range(n + 1)), n, v - 1]
    elif kind == 6:
        w = rng.choice(_WORDS)
        k = rng.randint(2, 3)
        expr = f'"{w[:2]}" * {k}'
        return expr, repr(w[:2] * k), [repr(w[:2] + str(k)), repr(w[:2] * (k + 1)), repr(w[:2])]
    else:
        lst = rng.sample(range(1, 10), 5)
        expr = f"{lst}[1:3]"
        return expr, repr(lst[1:3]), [repr(lst[1:4]), repr(lst[0:3]), repr(lst[2:3])]
    # distinct wrong answers; small offsets fill in when the candidates collide
    distinct = list(dict.fromkeys(x for x in [*wrong, v + 3, v + 4, v + 5] if x != v))
    return expr, repr(v), [repr(x) for x in distinct[:3]]


def _mmlu() -> dict[str, list[dict]]:
    rng = random.Random(_seed("solar_mmlu"))
    rows = []
    for subject, question, answers in _items.KNOWLEDGE:
        choices, label = _shuffle_choices(answers, rng)
        rows.append({"subject": subject, "question": question, "choices": choices, "label": label})
    generated = []
    for i in range(40):
        expr, right, wrong = _python_item(rng, i % 8)
        answers = [right] + list(dict.fromkeys(w for w in wrong if w != right))[:3]
        assert len(answers) == 4, (expr, answers)
        choices, label = _shuffle_choices(answers, rng)
        generated.append(
            {
                "subject": "python programming",
                "question": f"What is the value of the Python expression `{expr}`?",
                "choices": choices,
                "label": label,
            }
        )
    # few-shot pool: three facts and two Python questions
    return _split(rows[:3] + generated[:2] + rows[3:] + generated[2:], 5, "solar_mmlu")


_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jada", "Kofi", "Lena")


def _arith_problem(rng: random.Random, kind: int) -> dict[str, Any]:
    """One GSM8K-style word problem with a worked solution ending in ``#### answer``."""
    name, other = rng.sample(_NAMES, 2)
    if kind == 0:
        a, p, q = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
        question = (
            f"{name} buys {a} notebooks that cost ${p} each and a pen that costs ${q}. "
            f"How many dollars does {name} spend in total?"
        )
        steps = [f"The notebooks cost {a} * {p} = {a * p} dollars.", f"With the pen: {a * p} + {q} = {a * p + q} dollars."]
        answer = a * p + q
    elif kind == 1:
        k, each = rng.randint(2, 8), rng.randint(3, 15)
        question = (
            f"{name} has {k * each} stickers and shares them equally among {k} friends. "
            "How many stickers does each friend get?"
        )
        steps = [f"Each friend gets {k * each} / {k} = {each} stickers."]
        answer = each
    elif kind == 2:
        a, w = rng.randint(5, 30), rng.randint(3, 10)
        s = rng.randint(1, a * w - 1)
        question = (
            f"{name} saves ${a} every week. After {w} weeks, {name} spends ${s} on a gift. "
            "How many dollars are left?"
        )
        steps = [f"{name} saves {a} * {w} = {a * w} dollars.", f"After the gift: {a * w} - {s} = {a * w - s} dollars."]
        answer = a * w - s
    elif kind == 3:
        v, h = rng.randint(30, 120), rng.randint(2, 6)
        question = f"A train travels at {v} kilometers per hour for {h} hours. How many kilometers does it travel?"
        steps = [f"It travels {v} * {h} = {v * h} kilometers."]
        answer = v * h
    elif kind == 4:
        a, d, y = rng.randint(5, 40), rng.randint(2, 15), rng.randint(2, 10)
        question = (
            f"{name} is {a} years old. {other} is {d} years older than {name}. "
            f"How old will {other} be in {y} years?"
        )
        steps = [f"{other} is {a} + {d} = {a + d} years old now.", f"In {y} years: {a + d} + {y} = {a + d + y}."]
        answer = a + d + y
    elif kind == 5:
        b, k, r = rng.randint(4, 12), rng.randint(3, 9), 0
        r = rng.randint(1, b - 1)
        total = b * k + r
        question = (
            f"A baker makes {total} cookies and packs them in boxes of {b}. "
            "How many cookies are left after filling as many full boxes as possible?"
        )
        steps = [f"{k} full boxes hold {k} * {b} = {k * b} cookies.", f"Left over: {total} - {k * b} = {r}."]
        answer = r
    elif kind == 6:
        rows_, cols, dead = rng.randint(3, 9), rng.randint(4, 12), rng.randint(1, 10)
        question = (
            f"A garden has {rows_} rows of {cols} tomato plants. {dead} plants die. "
            "How many tomato plants are left?"
        )
        steps = [f"There are {rows_} * {cols} = {rows_ * cols} plants.", f"After {dead} die: {rows_ * cols} - {dead} = {rows_ * cols - dead}."]
        answer = rows_ * cols - dead
    else:
        p, d = rng.randint(5, 30), rng.randint(2, 7)
        n = p * d + rng.randint(10, 200)
        question = (
            f"{name} reads {p} pages a day from a book with {n} pages. "
            f"How many pages are left after {d} days?"
        )
        steps = [f"{name} reads {p} * {d} = {p * d} pages.", f"Left: {n} - {p * d} = {n - p * d} pages."]
        answer = n - p * d
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {answer}", "number": answer}


def arithmetic_problems(num: int, name: str) -> list[dict[str, Any]]:
    """``num`` GSM8K-format word problems (``question``, ``answer`` ending ``#### N``) from
    the offline suite's generator, seeded by ``name``: items of the suite's shape that are not
    its test items (the suite draws with ``solar_arith``), and not from the templates of the
    synthetic-math training data (:mod:`solar_ray.data.synth_math`)."""
    if name in ("solar_arith", "solar_arith/train"):
        raise ValueError(f"{name!r} draws the offline suite's own items; use another name")
    rng = random.Random(_seed(name))
    return [_arith_problem(rng, i % 8) for i in range(num)]


def _arith() -> dict[str, list[dict]]:
    train_rng, test_rng = random.Random(_seed("solar_arith/train")), random.Random(_seed("solar_arith"))
    train = [_arith_problem(train_rng, i % 8) for i in range(8)]
    test = [_arith_problem(test_rng, i % 8) for i in range(60)]
    return _split(train + test, len(train), "solar_arith")


def _cloze() -> dict[str, list[dict]]:
    rng = random.Random(_seed("solar_cloze"))
    scenarios = _items.SCENARIOS
    rows = []
    for i, (activity, ctx, ending) in enumerate(scenarios):
        # distractors: endings of other scenarios of similar length (no length cue)
        others = sorted(
            (j for j in range(len(scenarios)) if j != i),
            key=lambda j: (abs(len(scenarios[j][2].split()) - len(ending.split())), j),
        )[:8]
        picked = [scenarios[j][2] for j in rng.sample(others, 3)]
        choices, label = _shuffle_choices([ending, *picked], rng)
        rows.append({"activity_label": activity, "ctx": ctx, "endings": choices, "label": label})
    return _split(rows, 6, "solar_cloze")


_LOADERS: dict[str, Callable[[], dict[str, list[dict]]]] = {
    "solar_sci": _sci,
    "solar_cloze": _cloze,
    "solar_mmlu": _mmlu,
    "solar_truthful": _truthful,
    "solar_wino": _wino,
    "solar_arith": _arith,
}


@functools.cache
def _items_json(name: str) -> str:
    return json.dumps(_LOADERS[name](), sort_keys=True)


def fewshot_pool_size(name: str) -> int:
    """How many few-shot examples an offline task can draw (its ``train`` split)."""
    return len(offline_items(name)["train"])


def offline_items(name: str) -> dict[str, list[dict]]:
    """The ``train`` (few-shot pool) and ``test`` rows of an offline task (a fresh copy)."""
    if name not in _LOADERS:
        raise KeyError(f"unknown offline task {name!r}; known: {sorted(_LOADERS)}")
    return json.loads(_items_json(name))


def suite_fingerprint(names: list[str] | None = None) -> str:
    """sha256 of the items of the given offline tasks (all by default)."""
    h = hashlib.sha256()
    for name in sorted(names or _LOADERS):
        h.update(name.encode())
        h.update(_items_json(name).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- lm-eval glue


def _dataset(solar_task: str, **_: Any) -> Any:
    """lm-eval ``custom_dataset``: the task's rows as a ``datasets.DatasetDict``."""
    import datasets

    splits = offline_items(solar_task)
    return datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items() if v}
    )


def _sci_text(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def _choices(doc: dict) -> list[str]:
    return doc["choices"]


def _label(doc: dict) -> int:
    return doc["label"]


def _cloze_text(doc: dict) -> str:
    return f"{doc['activity_label']}: {doc['ctx']}"


def _cloze_choices(doc: dict) -> list[str]:
    return doc["endings"]


def _mmlu_text(doc: dict) -> str:
    letters = "ABCD"
    lines = [doc["question"].strip()]
    lines += [f"{letters[i]}. {c}" for i, c in enumerate(doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_choices(doc: dict) -> list[str]:
    return ["A", "B", "C", "D"]


def _truthful_text(doc: dict) -> str:
    return f"{_items.TRUTHFUL_PREAMBLE}\n\nQ: {doc['question']}\nA:"


def process_results_mc2(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """TruthfulQA mc2: the normalized probability mass on the true answers."""
    import numpy as np

    lls = np.array([ll for ll, _ in results], dtype=np.float64)
    probs = np.exp(lls - lls.max())
    probs /= probs.sum()
    return {"acc": float(probs[np.array(doc["labels"]) == 1].sum())}


def _wino_text(doc: dict) -> int:
    # an int tells lm-eval the choices are contexts sharing one continuation (partial scoring)
    return {"1": 0, "2": 1}[doc["answer"]]


def _wino_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def _wino_choices(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _arith_text(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def _arith_target(doc: dict) -> str:
    return doc["answer"]


def lm_eval_config(name: str, num_fewshot: int | None = None) -> dict[str, Any]:
    """The inline lm-eval task config of an offline task (pass it in ``tasks=[...]``)."""
    task = OFFLINE_TASKS[name]
    cfg: dict[str, Any] = {
        "task": name,
        "custom_dataset": _dataset,
        "dataset_kwargs": {"solar_task": name},
        "test_split": "test",
        "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
        "metadata": {"version": 1.0},
    }
    if name != "solar_truthful":
        cfg["fewshot_split"] = "train"
    if name == "solar_sci":
        cfg |= {"output_type": "multiple_choice", "doc_to_text": _sci_text,
                "doc_to_choice": _choices, "doc_to_target": _label, "metric_list": _MC_METRICS}  # fmt: skip
    elif name == "solar_cloze":
        cfg |= {"output_type": "multiple_choice", "doc_to_text": _cloze_text,
                "doc_to_choice": _cloze_choices, "doc_to_target": _label, "metric_list": _MC_METRICS}  # fmt: skip
    elif name == "solar_mmlu":
        cfg |= {
            "output_type": "multiple_choice",
            "description": "The following are multiple choice questions (with answers).\n\n",
            "doc_to_text": _mmlu_text, "doc_to_choice": _mmlu_choices, "doc_to_target": _label,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }  # fmt: skip
    elif name == "solar_truthful":
        cfg |= {
            "output_type": "multiple_choice", "doc_to_text": _truthful_text,
            "doc_to_choice": _choices, "doc_to_target": 0,
            "process_results": process_results_mc2,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }  # fmt: skip
    elif name == "solar_wino":
        cfg |= {
            "output_type": "multiple_choice", "doc_to_text": _wino_text,
            "doc_to_choice": _wino_choices, "doc_to_target": _wino_target,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }  # fmt: skip
    else:  # solar_arith: GSM8K's prompt, stop strings and answer extraction
        cfg |= {
            "output_type": "generate_until",
            "doc_to_text": _arith_text,
            "doc_to_target": _arith_target,
            "generation_kwargs": {
                "until": ["Question:", "\n\n", "</s>", "<|im_end|>"],
                "do_sample": False,
                "temperature": 0.0,
                "max_gen_toks": 64,  # the longest worked answer is 42 tokens
            },
            "metric_list": [
                {
                    "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                    "ignore_case": True, "ignore_punctuation": False,
                    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
                }
            ],
            "filter_list": [
                {"name": "strict-match", "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [
                    {"function": "regex", "group_select": -1,
                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"}]},
            ],
        }  # fmt: skip
    return cfg


def item_texts(name: str) -> list[tuple[str, str]]:
    """``(id, text)`` of every test item of an offline task, answer included.

    This is the text a contamination check looks for in training data and scores with
    Min-K% Prob: the question (or context) followed by its correct answer.
    """
    out = []
    for doc in offline_items(name)["test"]:
        if name == "solar_cloze":
            text = f"{doc['ctx']} {doc['endings'][doc['label']]}"
        elif name == "solar_wino":
            opt = doc["option1"] if doc["answer"] == "1" else doc["option2"]
            text = doc["sentence"].replace("_", opt)
        elif name == "solar_truthful":
            text = f"{doc['question']} {doc['choices'][0]}"
        elif name == "solar_arith":
            text = f"{doc['question']} {doc['answer']}"
        else:
            text = f"{doc['question']} {doc['choices'][doc['label']]}"
        out.append((doc["id"], text))
    return out
