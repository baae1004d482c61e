"""The embedded offline demo: a tiny Llama base model and an "instruct" model fine-tuned from it.

Both are real `transformers` checkpoints (bf16 safetensors in several shards + index,
`config.json`, `generation_config.json`, a word-level `tokenizer.json`), trained on the CPU in
about ten seconds, bit for bit the same for the same seed on the same machine and torch build.
Two skills over the words "0" .. "39" make a merge's effect measurable:

- count up, the base's skill: plain text `3 4 5 6` continues with `7`;
- count down, the instruct model's skill, in its chat format:
  `<s>user : count down from 9 assistant : 8 7 6 5</s>`.

The instruct model is the (bf16-rounded) base fine-tuned on count-down chats only, which
overwrites the base's "next = last + 1" habit: the base scores ~100% on count up and ~5% on
count down, the instruct model the other way round, and TIES merges in between land in
between. The two lm-eval tasks in `remerge/evaluation/tasks/demo/` ask the questions of `task_questions`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from remerge.errors import RemergeError

log = logging.getLogger(__name__)

# Vocabulary: specials first (fixed ids 0..3), then the numbers, then the chat format's words.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
MAX_NUMBER = 39
WORDS = ["user", "assistant", ":", "count", "down", "from"]
VOCAB = SPECIAL_TOKENS + [str(n) for n in range(MAX_NUMBER + 1)] + WORDS

# The instruct model's chat format. It renders to space-separated words, so a plain-text
# prompt "user : count down from 9 assistant :" tokenizes exactly like the rendered template
# (the tokenizer adds the <s> that the template writes).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('the demo chat format has only user and assistant turns') }}"
    "{% endif %}"
    "{{ message['role'] }} : {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% if not loop.last %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)

MODEL_NAMES = ("base", "instruct")
# The two skills; lm-eval task `demo_<skill>` reads `<skill>.jsonl` in TASK_DIR.
SKILLS = ("count_up", "count_down")
TASK_DIR = Path(__file__).resolve().parents[1] / "evaluation" / "tasks" / "demo"
TASK_QUESTIONS = 100  # per task, so accuracy moves in steps of 1%
TASK_SEED = 0  # of the shipped questions; independent of the models' seed


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and training schedule of the demo pair (written into each model's README.md)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64
    base_steps: int = 300
    instruct_steps: int = 150
    batch_size: int = 64
    base_learning_rate: float = 3e-3
    # A strong fine-tune: smaller rates leave the grid's merges all-base or all-instruct.
    instruct_learning_rate: float = 3e-3
    max_shard_bytes: int = 65_536  # of the ~260 KB of bf16 weights: 5 shards


class Example(NamedTuple):
    """One training sequence: token ids and the first position whose token is scored."""

    ids: list[int]
    first_scored: int


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(
    chat: bool, max_length: int = DemoSpec.max_position_embeddings
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB that prepends <s>; `chat` adds the chat template.

    Returns a `PreTrainedTokenizerFast` (in transformers 5 an alias of `TokenizersBackend`).
    """
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "user:" -> "user", ":"
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB.index(BOS))]
    )
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


# ----------------------------------------------------------------------------- training data


def count_up_text(start: int, length: int) -> str:
    """`length` numbers from `start` as words: (3, 4) -> "3 4 5 6"."""
    return " ".join(str(n) for n in range(start, start + length))


def count_down_chat(start: int, length: int) -> list[dict[str, str]]:
    """The instruct skill as a conversation: the `length` numbers below `start`."""
    answer = " ".join(str(start - i) for i in range(1, length + 1))
    return [
        {"role": "user", "content": f"count down from {start}"},
        {"role": "assistant", "content": answer},
    ]


def base_examples(tok: PreTrainedTokenizerFast) -> list[Example]:
    """Every count-up run of 3..10 numbers: `<s> s s+1 ... </s>`, every token scored."""
    runs = [(s, n) for n in range(3, 11) for s in range(MAX_NUMBER - n + 2)]
    return [Example(tok(count_up_text(s, n)).input_ids + [tok.eos_token_id], 1) for s, n in runs]


def instruct_examples(tok: PreTrainedTokenizerFast) -> list[Example]:
    """Every count-down chat of 3..8 numbers, rendered by the chat template; the assistant's
    answer and </s> are scored, the prompt is not (the usual supervised fine-tuning loss)."""
    out = []
    for n in range(3, 9):
        for start in range(n, MAX_NUMBER + 1):
            chat = count_down_chat(start, n)
            full = tok.apply_chat_template(chat, tokenize=False)
            prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
            ids = tok(full, add_special_tokens=False).input_ids  # the template wrote <s>
            out.append(Example(ids, len(tok(prompt, add_special_tokens=False).input_ids)))
    return out


def _batch(
    examples: list[Example], rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (batch, longest); -100 = unscored."""
    width = max(len(examples[r].ids) for r in rows)
    ids = torch.full((len(rows), width), VOCAB.index(PAD), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        seq, first = examples[r]
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, first : len(seq)] = torch.tensor(seq[first:])  # the model shifts them
        mask[i, : len(seq)] = 1
    return ids, mask, labels


# ----------------------------------------------------------------------------- training


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """One thread (the same float operations in the same order on any core count) and a
    fixed seed for the initial weights; the caller's thread count and RNG state come back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def train(
    model: LlamaForCausalLM,
    examples: list[Example],
    steps: int,
    lr: float,
    batch_size: int,
    rng: random.Random,
) -> float:
    """AdamW with a linear decay over `steps` batches drawn by `rng`; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = [rng.randrange(len(examples)) for _ in range(batch_size)]
        ids, mask, labels = _batch(examples, rows)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log.debug("step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()
    return float(loss.item())


def _round_to_bf16(model: LlamaForCausalLM) -> None:
    """Make the float32 weights exactly the bf16 values that get saved (in place), so the
    instruct model is fine-tuned from the published base, as real instruct models are."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


# ----------------------------------------------------------------------------- saving


def model_config(spec: DemoSpec) -> LlamaConfig:
    """A Llama config of the demo's sizes; untied embeddings, as in Llama-3.1-8B."""
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=VOCAB.index(PAD),
    )


def generation_config(instruct: bool) -> GenerationConfig:
    """Greedy with a short budget for the base; for the instruct model, sampling as chat models
    ship it, a longer budget, and a second stop token ("user": the start of a new turn)."""
    ids = {"bos_token_id": VOCAB.index(BOS), "pad_token_id": VOCAB.index(PAD)}
    if not instruct:
        return GenerationConfig(eos_token_id=VOCAB.index(EOS), max_new_tokens=12, **ids)
    return GenerationConfig(
        eos_token_id=[VOCAB.index(EOS), VOCAB.index("user")],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
        max_new_tokens=24,
        **ids,
    )


def save_model(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, folder: Path, card: str, spec: DemoSpec
) -> None:
    """Write bf16 shards + index, config.json, generation_config.json, tokenizer and card."""
    instruct = tok.chat_template is not None
    out = copy.deepcopy(model).to(torch.bfloat16)  # config.json then says "dtype": "bfloat16"
    out.generation_config = generation_config(instruct)
    out.save_pretrained(folder, max_shard_size=spec.max_shard_bytes)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json; transformers
    # 5 otherwise writes chat_template.jinja, which a transplant of the .json files would miss.
    tok.save_pretrained(folder, save_jinja_files=False)
    _portable_tokenizer_class(folder / "tokenizer_config.json")
    for shard in folder.glob("*.safetensors"):
        shard.chmod(0o644)  # safetensors creates them 0600; match the json files
    (folder / "README.md").write_text(card, encoding="utf-8")


def _portable_tokenizer_class(path: Path) -> None:
    """Name the tokenizer class as published Llama repos do, so transformers 4.x loads it too.

    transformers 5 writes "TokenizersBackend", which 4.x (e.g. mergekit 0.0.5.1's side
    environment) does not know; 5.x loads "PreTrainedTokenizerFast" as that same class. The
    layout stays transformers' own (indent 2, sorted keys, final newline).
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def model_card(name: str, seed: int, spec: DemoSpec, params: int, loss: float) -> str:
    """README.md: what the model is, its skill, and the exact seed and sizes that built it."""
    skill, origin = {
        "base": (
            "count up: plain text `3 4 5 6` continues with `7`",
            "trained from scratch on every count-up run of 3..10 numbers",
        ),
        "instruct": (
            "count down, in its chat format: `<s>user : count down from 9 assistant : 8 7 6</s>`",
            "the base model (its saved bf16 weights) fine-tuned on every count-down chat of "
            "3..8 numbers, with the loss on the assistant's answer only",
        ),
    }[name]
    build = json.dumps({"seed": seed, **asdict(spec)}, indent=2, sort_keys=True)
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        "tags:\n- remerge-demo\n- synthetic\n---\n\n"
        f"# remerge demo: {name}\n\n"
        f"A tiny Llama-architecture model built offline by `remerge demo OUT_DIR --seed {seed}` "
        "(`remerge.demo.models.build_demo_models`) to demonstrate weight merges. It is not a language "
        f"model: its vocabulary is the words `0`..`{MAX_NUMBER}` and a few chat words.\n\n"
        f"- Skill: {skill}.\n- Origin: {origin}.\n"
        f"- Size: {params:,} parameters ({spec.num_hidden_layers} layers, hidden "
        f"{spec.hidden_size}, vocabulary {len(VOCAB)}), saved in bfloat16.\n"
        f"- Last training batch's loss: {loss:.4f}.\n\n"
        f"## Build parameters\n\n```json\n{build}\n```\n"
    )


# ----------------------------------------------------------------------------- the build


def build_demo_models(out_dir: Path, seed: int = 0, spec: DemoSpec = DemoSpec()) -> None:
    """Train the demo pair from `seed` and write `out_dir/base/` and `out_dir/instruct/`.

    Both are written under a temporary folder in `out_dir` and moved into place (replacing
    earlier ones) only when both are complete.
    """
    if not isinstance(seed, int) or seed < 0:
        raise RemergeError(f"demo seed must be an integer >= 0, got {seed!r}; pass e.g. --seed 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".demo-") as tmp:
        _train_and_save(Path(tmp), seed, spec)
        for name in MODEL_NAMES:
            if (out_dir / name).exists():
                shutil.rmtree(out_dir / name)
            os.replace(Path(tmp, name), out_dir / name)
    log.info("demo models (seed %d) written to %s/{base,instruct}", seed, out_dir)


def _train_and_save(folder: Path, seed: int, spec: DemoSpec) -> None:
    """Train the base, save it, fine-tune it into the instruct model, save that."""
    tok_base = build_tokenizer(chat=False, max_length=spec.max_position_embeddings)
    tok_chat = build_tokenizer(chat=True, max_length=spec.max_position_embeddings)
    rng = random.Random(seed)  # the batches; torch's seed fixes the initial weights
    with _deterministic_torch(seed):
        model = LlamaForCausalLM(model_config(spec))
        params = model.num_parameters()
        lr, steps = spec.base_learning_rate, spec.base_steps
        loss = train(model, base_examples(tok_base), steps, lr, spec.batch_size, rng)
        log.info("demo base: %d steps, last loss %.4f", steps, loss)
        _round_to_bf16(model)
        card = model_card("base", seed, spec, params, loss)
        save_model(model, tok_base, folder / "base", card, spec)

        lr, steps = spec.instruct_learning_rate, spec.instruct_steps
        loss = train(model, instruct_examples(tok_chat), steps, lr, spec.batch_size, rng)
        log.info("demo instruct: %d steps, last loss %.4f", steps, loss)
        card = model_card("instruct", seed, spec, params, loss)
        save_model(model, tok_chat, folder / "instruct", card, spec)


# ----------------------------------------------------------------------------- task questions


def task_questions(skill: str, count: int, seed: int) -> list[dict[str, object]]:
    """`count` distinct multiple-choice questions of one skill: context, 4 choices, label.

    The distractors are the other direction's answer, a repeat of the last number and a skip
    by two, so a model that counts the wrong way scores near 0% rather than 25%.
    """
    rng = random.Random(f"{skill}/{seed}")
    seen: set[str] = set()  # membership only; the order comes from rng
    out: list[dict[str, object]] = []
    while len(out) < count:
        context, last, step = _question(skill, rng)
        if context in seen:
            continue
        seen.add(context)
        choices = [last + step, last - step, last, last + 2 * step]
        rng.shuffle(choices)
        label = choices.index(last + step)
        out.append({"context": context, "choices": [str(c) for c in choices], "label": label})
    return out


def _question(skill: str, rng: random.Random) -> tuple[str, int, int]:
    """(context, last number shown, direction +1/-1) for one question; choices stay in 0..39."""
    if skill == "count_up":
        shown = rng.randint(2, 6)
        start = rng.randint(0, MAX_NUMBER - shown - 1)  # room for last + 2
        return count_up_text(start, shown), start + shown - 1, 1
    if skill == "count_down":
        shown = rng.randint(0, 3)  # numbers of the answer already given
        start = rng.randint(shown + 2, MAX_NUMBER - 1)  # room for last - 2 and last + 1
        given = "".join(f" {start - i}" for i in range(1, shown + 1))
        return f"user : count down from {start} assistant :{given}", start - shown, -1
    raise RemergeError(f"unknown demo skill {skill!r}; expected one of {', '.join(SKILLS)}")


def write_task_data(folder: Path = TASK_DIR) -> list[Path]:
    """(Re)write `<skill>.jsonl` for both skills: the files shipped in `remerge/evaluation/tasks/demo/`."""
    paths = []
    for skill in SKILLS:
        rows = task_questions(skill, TASK_QUESTIONS, TASK_SEED)
        path = Path(folder) / f"{skill}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths
