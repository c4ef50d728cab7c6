"""Synth. Math-Instruct and Synth. Math-Alignment (SOLAR 10.7B, after MetaMath).

Verifiable seed problems (:func:`generate_arithmetic_problems`, :func:`read_math_seeds`) are
rephrased by an LLM as Ray Data batch inference over an actor pool of :class:`Rephraser`;
a rephrased answer is kept only when its final answer equals the seed's
(:func:`answers_match`). Seeds, backends, the checks and the output: docs/data.md,
"Synthetic math".
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa

from solar_ray.checkpoint import (
    atomic_output_dir,
    check_output,
    library_versions,
    local_inputs,
    write_json_atomic,
)
from solar_ray.data.config import SynthMathConfig, config_hash
from solar_ray.data.contract import DATA_MANIFEST, LAYOUT, shard_name, write_shard
from solar_ray.data.keys import hash64

__all__ = [
    "MathSeed",
    "Rephraser",
    "SynthMathResult",
    "answers_match",
    "build_synth_math",
    "check_rephrased",
    "extract_boxed",
    "extract_final_answer",
    "generate_arithmetic_problems",
    "normalize_answer",
    "read_math_seeds",
    "run_synth_math",
    "template_rephrase",
]

log = logging.getLogger(__name__)

SOURCE = "synth_math"
_REJECT_SCHEMA = pa.schema(
    [
        pa.field("seed_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("question", pa.string()),
        pa.field("rephrased_question", pa.string()),
        pa.field("rephrased_answer", pa.string()),
    ]
)
_SEED_FIELDS = [("seed_id", pa.string()), ("final_answer", pa.string())]
#: the sft and preference ``data`` schemas (what a mix's source reads) with the seed
_INSTRUCT_SCHEMA = pa.schema([*LAYOUT["sft"].data, *_SEED_FIELDS])
_ALIGNMENT_SCHEMA = pa.schema([*LAYOUT["preference"].data, *_SEED_FIELDS])


@dataclass(frozen=True)
class MathSeed:
    """A verifiable problem: question, worked answer, final answer."""

    seed_id: str
    question: str
    answer: str
    final_answer: str


# ---------------------------------------------------------------- offline seed generator

_NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Isla",
    "Jon",
    "Kira",
    "Liam",
    "Mia",
    "Noah",
    "Olga",
    "Priya",
)
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "books")
_GOODS = (
    ("notebook", "notebooks"),
    ("sandwich", "sandwiches"),
    ("toy car", "toy cars"),
    ("ticket", "tickets"),
    ("plant", "plants"),
)


def _p_buy_give(r: random.Random) -> tuple[str, list[str], int]:
    name, friend = r.sample(_NAMES, 2)
    item = r.choice(_ITEMS)
    a, b = r.randint(5, 60), r.randint(2, 30)
    c = r.randint(1, a + b - 1)
    ans = a + b - c
    q = f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to {friend}. How many {item} does {name} have now?"
    steps = [
        f"{name} starts with {a} {item} and buys {b} more, so {name} has {a} + {b} = {a + b} {item}.",
        f"After giving {c} to {friend}, {name} has {a + b} - {c} = {ans} {item}.",
    ]
    return q, steps, ans


def _p_change(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(_NAMES)
    one, many = r.choice(_GOODS)
    p, n = r.randint(2, 20), r.randint(2, 12)
    total = p * n
    bill = next(b for b in (20, 50, 100, 200, 500) if b >= total)
    ans = bill - total
    q = f"A shop sells each {one} for ${p}. {name} buys {n} {many} and pays with a ${bill} bill. How much change, in dollars, does {name} get?"
    steps = [
        f"The {many} cost {n} x ${p} = ${total}.",
        f"The change is ${bill} - ${total} = ${ans}.",
    ]
    return q, steps, ans


def _p_distance(r: random.Random) -> tuple[str, list[str], int]:
    v1, t1, v2, t2 = r.randint(30, 90), r.randint(1, 5), r.randint(20, 80), r.randint(1, 4)
    d1, d2 = v1 * t1, v2 * t2
    ans = d1 + d2
    q = f"A train travels at {v1} km per hour for {t1} hours and then at {v2} km per hour for {t2} hours. How many kilometres does it travel in total?"
    steps = [
        f"First it travels {v1} x {t1} = {d1} km.",
        f"Then it travels {v2} x {t2} = {d2} km.",
        f"In total it travels {d1} + {d2} = {ans} km.",
    ]
    return q, steps, ans


def _p_share(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(_NAMES)
    item = r.choice(_ITEMS)
    k, each = r.randint(2, 9), r.randint(2, 15)
    rest = r.randint(0, k - 1)
    total = k * each + rest
    keep = f", keeping the {rest} that are left over" if rest else ""
    q = f"{name} has {total} {item} and shares them equally among {k} friends{keep}. How many {item} does each friend get?"
    steps = [
        f"{total} - {rest} = {total - rest} {item} are shared.",
        f"Each friend gets {total - rest} / {k} = {each} {item}.",
    ]
    return q, steps, each


def _p_percent(r: random.Random) -> tuple[str, list[str], int]:
    n, p = 20 * r.randint(1, 20), 5 * r.randint(1, 19)
    walk = n * p // 100
    ans = n - walk
    q = f"A school has {n} students. {p}% of them walk to school. How many students do not walk to school?"
    steps = [
        f"{p}% of {n} is {n} x {p} / 100 = {walk} students.",
        f"So {n} - {walk} = {ans} students do not walk.",
    ]
    return q, steps, ans


def _p_pages(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(_NAMES)
    x, d = r.randint(5, 40), r.randint(2, 10)
    total = x * d + r.randint(10, 200)
    read = x * d
    ans = total - read
    q = f"A book has {total} pages. {name} reads {x} pages every day for {d} days. How many pages are left to read?"
    steps = [f"{name} reads {x} x {d} = {read} pages.", f"{total} - {read} = {ans} pages are left."]
    return q, steps, ans


_TEMPLATES = (_p_buy_give, _p_change, _p_distance, _p_share, _p_percent, _p_pages)


def generate_arithmetic_problems(n: int, seed: int = 0) -> list[MathSeed]:
    """``n`` arithmetic word problems with worked answers (GSM8K style, ``#### N``).

    Deterministic for a seed; every final answer is computed exactly, so it can be trusted
    as the reference the rephrased answers are checked against.
    """
    r = random.Random(seed)
    out = []
    for i in range(n):
        q, steps, ans = _TEMPLATES[r.randrange(len(_TEMPLATES))](r)
        out.append(MathSeed(f"gen-{seed}-{i}", q, "\n".join(steps) + f"\n#### {ans}", str(ans)))
    return out


# ---------------------------------------------------------------- answers

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces handled), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def normalize_answer(s: str) -> str:
    """A canonical form: exact fractions for numbers, else a compact lower-case string."""
    t = s.strip()
    t = _TEXT.sub("", t)
    for junk in (
        "\\$",
        "$",
        "\\!",
        "\\left",
        "\\right",
        "\\,",
        "\\%",
        "%",
        "^\\circ",
        "^{\\circ}",
        "dollars",
    ):
        t = t.replace(junk, "")
    t = _FRAC.sub(r"(\1)/(\2)", t)
    t = t.strip().rstrip(".").strip()
    compact = re.sub(r"\s+", "", t)
    numeric = compact.replace("(", "").replace(")", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", numeric):
        numeric = numeric.replace(",", "")
    try:
        return str(Fraction(numeric))
    except (ValueError, ZeroDivisionError):
        return compact.lower()


def answers_match(a: str, b: str) -> bool:
    """Do two final answers agree (numbers exactly, as fractions; else as compact text)?"""
    return normalize_answer(a) == normalize_answer(b)


def extract_final_answer(text: str) -> str | None:
    """The final answer a solution states: ``answer is``, ``####``, ``\\boxed{}``, last number."""
    for pattern in (_ANSWER_IS, _HASHES):
        hits = pattern.findall(text)
        if hits:
            tail = hits[-1].strip()
            boxed = extract_boxed(tail)
            if boxed is not None:
                return boxed.strip()
            first_line = tail.splitlines()[0].strip()
            num = _NUMBER.search(first_line.replace("$", ""))
            if num and not re.fullmatch(r"\\?d?frac.*", first_line):
                return num.group(0)
            return first_line.rstrip(".").strip() or None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    nums = _NUMBER.findall(text.replace("$", ""))
    return nums[-1] if nums else None


_LABEL = re.compile(
    r"^\s*(?:rephrased\s+question|question|rewritten\s+question)\s*:\s*", re.IGNORECASE
)


def check_rephrased(seed: MathSeed, question: str, answer: str) -> tuple[str | None, str]:
    """``(None, cleaned question)`` when a rephrased pair passes, else ``(reason, detail)``."""
    q = _LABEL.sub("", question or "").strip()
    a = (answer or "").strip()
    if not q:
        return "empty_rephrase", "empty question"
    if not a:
        return "empty_rephrase", "empty answer"
    got = extract_final_answer(a)
    if got is None:
        return "answer_mismatch", f"no final answer found; expected {seed.final_answer!r}"
    if not answers_match(got, seed.final_answer):
        return "answer_mismatch", f"got {got!r}, expected {seed.final_answer!r}"
    if _ANSWER_IS.search(q) or "####" in q or "\\boxed" in q:
        return "question_states_answer", "the rephrased question gives its answer away"
    return None, q


# ---------------------------------------------------------------- seed files


def read_math_seeds(
    paths: list[str], fmt: str = "auto", field: str = "synth_math.seeds.files"
) -> tuple[list[MathSeed], list[dict]]:
    """Seeds from GSM8K/MATH files, and the records refused (with reasons)."""
    from solar_ray.data.sources import expand_paths, iter_records

    seeds, rejects = [], []
    for i, pattern in enumerate(paths):
        for path in expand_paths([pattern], f"{field}.{i}"):
            for rec in iter_records(path):
                sid = f"{path}#{rec.index}"
                if rec.data is None:
                    rejects.append({"seed_id": sid, "reason": rec.reason, "detail": rec.detail})
                    continue
                d = rec.data
                kind = fmt
                if kind == "auto":
                    kind = (
                        "gsm8k"
                        if "question" in d and "answer" in d
                        else "math"
                        if "problem" in d and "solution" in d
                        else ""
                    )
                q, a = (
                    (d.get("question"), d.get("answer"))
                    if kind == "gsm8k"
                    else (d.get("problem"), d.get("solution"))
                )
                if (
                    not kind
                    or not isinstance(q, str)
                    or not isinstance(a, str)
                    or not q.strip()
                    or not a.strip()
                ):
                    rejects.append(
                        {
                            "seed_id": sid,
                            "reason": "missing_field",
                            "detail": "needs question/answer or problem/solution",
                        }
                    )
                    continue
                final = d.get("final_answer")
                if final is None or not str(final).strip():
                    if kind == "gsm8k":
                        hit = _HASHES.findall(a)
                        final = hit[-1].strip() if hit else None
                    else:
                        final = extract_boxed(a)
                if final is None or not str(final).strip():
                    rejects.append(
                        {
                            "seed_id": sid,
                            "reason": "no_final_answer",
                            "detail": f"no final answer in the {kind} solution",
                        }
                    )
                    continue
                seeds.append(MathSeed(sid, q.strip(), a.strip(), str(final).strip()))
    return seeds, rejects


# ---------------------------------------------------------------- the rephraser actor


def template_rephrase(answer: str) -> str:
    """The model-free rewrite of an answer: its ``#### N`` line becomes ``The answer is: N``."""
    lines = answer.rstrip().splitlines()
    hit = _HASHES.fullmatch(lines[-1].strip()) if lines else None
    if hit:
        return "\n".join([*lines[:-1], f"The answer is: {hit.group(1).strip()}"])
    boxed = extract_boxed(answer)
    return answer.rstrip() + (f"\nThe answer is: {boxed}" if boxed is not None else "")


def _fill(template: str, **values: str) -> str:
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template


class Rephraser:
    """A Ray Data actor holding the rephrasing model; called on batches of seeds.

    ``backend``: ``transformers`` (CPU or GPU ``generate``, left-padded batches), ``vllm``
    (``LLM.chat``) or ``template`` (no model: :func:`template_rephrase`; a dry run).
    """

    def __init__(
        self,
        model: str,
        backend: str,
        generation: dict[str, Any],
        prompts: dict[str, str],
        num_threads: int = 1,
    ) -> None:
        self.backend = backend
        self.gen = generation
        self.prompts = prompts
        if backend == "template":
            return
        from solar_ray.models import resolve_model

        model_dir = str(resolve_model(model))
        if backend == "vllm":
            from vllm import LLM, SamplingParams

            self.llm = LLM(model=model_dir, seed=generation["seed"])
            self.sampling = SamplingParams(
                max_tokens=generation["max_new_tokens"],
                temperature=generation["temperature"],
                top_p=generation["top_p"],
                seed=generation["seed"],
            )
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, num_threads))
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def _generate(self, prompts: list[str], salt: int) -> list[str]:
        chats = [[{"role": "user", "content": p}] for p in prompts]
        if self.backend == "vllm":
            outs = self.llm.chat(chats, self.sampling, use_tqdm=False)
            return [o.outputs[0].text for o in outs]
        torch = self.torch
        texts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chats
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.model.device
        )
        sample = self.gen["temperature"] > 0
        torch.manual_seed((self.gen["seed"] ^ salt) & 0x7FFFFFFF)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.gen["max_new_tokens"],
            "do_sample": sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:
            kwargs.update(temperature=self.gen["temperature"], top_p=self.gen["top_p"])
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        return self.tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rephrase a batch of seeds: adds ``rephrased_question`` and ``rephrased_answer``."""
        qs = batch.column("question").to_pylist()
        ans = batch.column("answer").to_pylist()
        if self.backend == "template":
            rq, ra = qs, [template_rephrase(a) for a in ans]
        else:
            prompts = [_fill(self.prompts["question"], question=q) for q in qs]
            prompts += [
                _fill(self.prompts["answer"], question=q, answer=a)
                for q, a in zip(qs, ans, strict=True)
            ]
            salt = hash64(batch.column("seed_id")[0].as_py()) if batch.num_rows else 0
            outs = self._generate(prompts, salt) if prompts else []
            rq, ra = outs[: len(qs)], outs[len(qs) :]
        return batch.append_column("rephrased_question", pa.array(rq, pa.string())).append_column(
            "rephrased_answer", pa.array(ra, pa.string())
        )


# ---------------------------------------------------------------- the stage


@dataclass
class SynthMathResult:
    """What the synthetic math stage produced (or found already built)."""

    out: Path | None
    num_seeds: int
    num_kept: int
    dropped: dict[str, int]
    manifest: dict[str, Any]
    instruct: pa.Table | None = None
    alignment: pa.Table | None = None
    rejects: pa.Table | None = None
    reused: bool = False
    seeds: list[MathSeed] = field(default_factory=list)


def _pick_backend(requested: str) -> str:
    if requested == "vllm":
        from solar_ray.errors import require

        require("vllm", "synth_math.backend: vllm", extra="vllm")  # fail on the driver, not in an actor
    if requested != "auto":
        return requested
    import ray

    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return "vllm" if has_gpu and importlib.util.find_spec("vllm") is not None else "transformers"


def build_synth_math(cfg: SynthMathConfig) -> SynthMathResult:
    """Generate/read the seeds, rephrase them with Ray Data, check the answers (no writing)."""
    import ray.data

    from solar_ray.data._ray import ordered_context

    seeds = (
        generate_arithmetic_problems(cfg.seeds.generate, cfg.seeds.seed)
        if cfg.seeds.generate
        else []
    )
    file_seeds, seed_rejects = read_math_seeds(cfg.seeds.files, cfg.seeds.format)
    seeds += file_seeds
    if cfg.seeds.max_seeds is not None:
        seeds = seeds[: cfg.seeds.max_seeds]
    rp = cfg.rephraser
    backend = _pick_backend(rp.backend)
    if backend != "template":
        from solar_ray.models import resolve_model

        resolve_model(rp.model)  # fail fast on the driver, and convert a GGUF once
    num_gpus = (
        rp.num_gpus_per_actor
        if rp.num_gpus_per_actor is not None
        else (1.0 if backend == "vllm" else 0.0)
    )
    rows: list[dict] = []
    if seeds:
        num_blocks = max(1, min(-(-len(seeds) // rp.batch_size), 4 * rp.num_actors))
        with ordered_context():
            ds = ray.data.from_items([asdict(s) for s in seeds], override_num_blocks=num_blocks)
            out = ds.map_batches(
                Rephraser,
                fn_constructor_kwargs={
                    "model": rp.model,
                    "backend": backend,
                    "generation": {
                        "max_new_tokens": rp.max_new_tokens,
                        "temperature": rp.temperature,
                        "top_p": rp.top_p,
                        "seed": rp.seed,
                    },
                    "prompts": {"question": rp.question_prompt, "answer": rp.answer_prompt},
                    "num_threads": int(max(1, rp.num_cpus_per_actor)),
                },
                batch_size=rp.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=rp.num_actors),
                num_cpus=rp.num_cpus_per_actor,
                num_gpus=num_gpus,
            )
            rows = out.take_all()
    by_id = {s.seed_id: s for s in seeds}
    instruct, alignment, rejects = (
        [],
        [],
        [
            dict(r, question=None, rephrased_question=None, rephrased_answer=None)
            for r in seed_rejects
        ],
    )
    order = {s.seed_id: i for i, s in enumerate(seeds)}
    for r in sorted(rows, key=lambda r: order[r["seed_id"]]):
        seed = by_id[r["seed_id"]]
        reason, detail = check_rephrased(seed, r["rephrased_question"], r["rephrased_answer"])
        if reason is not None:
            rejects.append(
                {
                    "seed_id": seed.seed_id,
                    "reason": reason,
                    "detail": detail,
                    "question": seed.question,
                    "rephrased_question": r["rephrased_question"],
                    "rephrased_answer": r["rephrased_answer"],
                }
            )
            continue
        q, a = detail, r["rephrased_answer"].strip()
        instruct.append(
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "source": SOURCE,
                "seed_id": seed.seed_id,
                "final_answer": seed.final_answer,
            }
        )
        alignment.append(
            {
                "prompt": q,
                "chosen": a,
                "rejected": seed.answer,
                "system": "",
                "source": SOURCE,
                "seed_id": seed.seed_id,
                "final_answer": seed.final_answer,
            }
        )
    dropped: dict[str, int] = {}
    for r in rejects:
        dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
    manifest = {
        "format": "solar-ray-synth-math/1",
        "stage": "synth_math",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        "backend": backend,
        "num_seeds": len(seeds),
        "num_rephrased": len(rows),
        "num_kept": len(instruct),
        "dropped": dict(sorted(dropped.items())),
        "splits": {"instruct": len(instruct), "alignment": len(alignment), "rejects": len(rejects)},
        "versions": library_versions(),
    }
    return SynthMathResult(
        out=None,
        num_seeds=len(seeds),
        num_kept=len(instruct),
        dropped=manifest["dropped"],
        manifest=manifest,
        instruct=pa.Table.from_pylist(instruct, schema=_INSTRUCT_SCHEMA),
        alignment=pa.Table.from_pylist(alignment, schema=_ALIGNMENT_SCHEMA),
        rejects=pa.Table.from_pylist(rejects, schema=_REJECT_SCHEMA),
        seeds=seeds,
    )


def run_synth_math(
    cfg: SynthMathConfig, out_dir: str | Path, force: bool = False
) -> SynthMathResult:
    """Build the synthetic math sets into ``out_dir`` unless it holds this config's build.

    Writes ``instruct/``, ``alignment/``, ``rejects/`` and ``manifest.json`` (last,
    atomically). An existing build with the same config hash is reused (the LLM pass is
    the expensive part).
    """
    import json

    out = Path(out_dir).absolute()
    manifest_path = out / DATA_MANIFEST
    if manifest_path.is_file() and not force:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("config_hash") == config_hash(cfg):
            log.info("synth_math: reusing %s (same config)", out)
            return SynthMathResult(
                out, old["num_seeds"], old["num_kept"], old["dropped"], old, reused=True
            )
    inputs = local_inputs(*cfg.seeds.files, cfg.rephraser.model)
    check_output(out, True, inputs)  # before the expensive pass, not after it
    result = build_synth_math(cfg)
    with atomic_output_dir(out, overwrite=True, inputs=inputs) as tmp:
        for split, table in (
            ("instruct", result.instruct),
            ("alignment", result.alignment),
            ("rejects", result.rejects),
        ):
            write_shard(table, Path(tmp) / split, shard_name(0))
        result.manifest["path"] = str(out)
        write_json_atomic(Path(tmp) / DATA_MANIFEST, result.manifest)
    result.out = out
    log.info(
        "synth_math: %d seeds -> %d kept, dropped %s",
        result.num_seeds,
        result.num_kept,
        result.dropped,
    )
    return result
