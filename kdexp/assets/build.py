"""Build the bundled tiny models: ``make teacher`` runs this.

    python -m kdexp.assets.build skeleton        # tokenizer + configs of tiny-teacher and tiny-student
    python -m kdexp.assets.build teacher         # skeleton, then train the teacher with `kdexp train`, then specialists
    python -m kdexp.assets.build specialists     # the two specialist teachers alone, from the first (~8 minutes)
    python -m kdexp.assets.build other           # the teacher with another tokenizer, from the first (~25 minutes)
    python -m kdexp.assets.build moe             # the mixture-of-experts student's config (no weights; seconds)

The tokenizer is a byte-level BPE (1024 tokens) learned on the toy task's training text; both
tiny models share it. The teacher (LLaMA architecture, 4 layers, width 256, ~3.4M parameters)
is trained with kdexp's own loop (``method=sft``) from a fixed seed, and its weights are copied
into ``kdexp/assets/tiny-teacher``. Two specialist teachers for the several-teachers rules,
``tiny-teacher-b`` and ``tiny-teacher-c`` (``teacher=tiny-b``, ``teacher=tiny-c``), are that
teacher fine-tuned further on four of the eight families each (:data:`SPECIALISTS`): each keeps
its own families and forgets much of the others', so each is better on some families, and
``tiny-teacher`` is their raw (pre-fine-tuning) checkpoint (``teachers.rule=relative``). They are
stored in bfloat16 (half the bytes; their scores in ``training.json`` are of the stored weights).
``tiny-teacher-other`` (``teacher=tiny-other``) speaks another tokenizer, for distillation
across tokenizers: a byte-level BPE of 1536 tokens with spaces as tokens of their own, learned on
the alpaca template's text, that ends text with ``<|end|>``; it is the teacher with its vocabulary transplanted (each new token's embedding
the mean of the old embeddings of its text) and fine-tuned on the task (:func:`other`).
The student config (2 layers, width 96, ~0.32M parameters,
about 10x smaller) has no weights: ``student=tiny`` initializes it from ``seed``. Nor has
``tiny-moe`` (``student=tiny-moe``), the same student as a mixture of experts (Mixtral
architecture: 4 experts of width 128 per layer, 2 chosen per token; ~0.47M parameters, about as
many active per token as the dense student's), for MoE students and ``kdexp analyze routing``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from kdexp.data import toy
from kdexp.data.templates import TEMPLATES

HERE = Path(__file__).parent
TEACHER, STUDENT, MOE = HERE / "tiny-teacher", HERE / "tiny-student", HERE / "tiny-moe"
EOS = "<|endoftext|>"
VOCAB = 1024

ARCH = {
    "tiny-teacher": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 4},
    "tiny-student": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2},
}
# The teacher's recipe: `kdexp train` overrides. Seeded, so the same weights come out on the
# same software stack (CPU kernels may differ in the last bits across torch versions).
TEACHER_RECIPE = [
    "method=sft", "teacher=none", "logger=none", "seed=0",
    "student=tiny", "student.name_or_path=${kdexp.asset:tiny-teacher}", "student.init=random",
    "data.toy.n_train=40000", "train.max_steps=10000", "train.batch_size=32",
    "train.micro_batch_size=32", "train.lr=2e-3", "train.warmup_steps=200",
    "train.min_lr_ratio=0.05", "train.eval_every=2000", "train.save_every=2000",
    "eval=greedy", "eval.teacher=false",
]

# The specialists: the teacher fine-tuned on four families each (the world's lookups and sums;
# the list and sequence tasks).
SPECIALISTS = {"b": ["fact", "describe", "arith", "category"], "c": ["repeat", "reverse", "count", "story"]}


def specialist_recipe(families: list[str]) -> list[str]:
    return ["method=sft", "teacher=none", "logger=none", "seed=0",
            "student=tiny", "student.name_or_path=${kdexp.asset:tiny-teacher}", "student.init=pretrained",
            f"data.toy.families=[{','.join(families)}]", "data.toy.n_train=8000", "train.max_steps=600",
            "train.batch_size=32", "train.micro_batch_size=32", "train.lr=5e-4", "train.warmup_steps=30",
            "train.min_lr_ratio=0.1", "train.eval_every=0", "train.save_every=0", "eval=greedy", "eval.teacher=false"]

# The other tokenizer's teacher: the transplanted teacher fine-tuned on the whole task.
OTHER, OTHER_VOCAB, OTHER_EOS = HERE / "tiny-teacher-other", 1536, "<|end|>"
OTHER_RECIPE = ["method=sft", "teacher=none", "logger=none", "seed=0",
                "student=tiny", "student.name_or_path=${kdexp.asset:tiny-teacher-other}", "student.init=pretrained",
                "data.toy.n_train=40000", "train.max_steps=4000", "train.batch_size=32", "train.micro_batch_size=32",
                "train.lr=1e-3", "train.warmup_steps=50", "train.min_lr_ratio=0.05", "train.eval_every=0",
                "train.save_every=0", "eval=greedy", "eval.teacher=false"]


def tokenizer_corpus(n: int = 20000, template: str = "compact") -> list[str]:
    """Prompt + response texts of the toy training split (seed 0, compact template)."""
    template = TEMPLATES.get(template)
    return [template(e.instruction, e.input) + e.output
            for e in toy.make_splits(seed=0, n_train=n)["train"]]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=None, model_max_length=256,
                                   clean_up_tokenization_spaces=False)


def build_other_tokenizer():
    """A tokenizer unlike the first: 1536 tokens learned on the task's text in the alpaca
    template, spaces as tokens of their own (the first glues a space to the word after it, as
    GPT-2 does), another end-of-text token; so its tokens and the first's cross one another."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=OTHER_VOCAB, special_tokens=[OTHER_EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(template="alpaca"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=OTHER_EOS, bos_token=OTHER_EOS,
                                   pad_token=OTHER_EOS, unk_token=None, model_max_length=256,
                                   clean_up_tokenization_spaces=False)


def transplant(run_dir: Path) -> None:
    """``tiny-teacher-other`` before fine-tuning: the teacher's layers, and for each token of the
    other tokenizer the mean of the teacher's embeddings of that token's text (the LM head is
    tied to them); the end-of-text tokens map to each other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    new = build_other_tokenizer()
    old = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32)
    table = model.get_input_embeddings().weight.detach()
    rows = []
    for i in range(len(new)):
        text = new.decode([i])
        ids = [old.eos_token_id] if i == new.eos_token_id else old(text, add_special_tokens=False)["input_ids"]
        rows.append(table[ids].mean(0) if ids else table.mean(0))
    model.resize_token_embeddings(len(new))
    model.get_input_embeddings().weight.data.copy_(torch.stack(rows))
    model.config.update({"bos_token_id": new.eos_token_id, "eos_token_id": new.eos_token_id,
                         "pad_token_id": new.eos_token_id})
    model.generation_config.update(bos_token_id=new.eos_token_id, eos_token_id=new.eos_token_id,
                                   pad_token_id=new.eos_token_id)
    OTHER.mkdir(exist_ok=True)
    model.save_pretrained(OTHER)
    new.save_pretrained(OTHER)
    meta = json.loads((OTHER / "tokenizer_config.json").read_text())
    meta["tokenizer_class"] = "PreTrainedTokenizerFast"
    (OTHER / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")


def other(run_dir: Path) -> None:
    """The teacher with another tokenizer: transplanted, fine-tuned with kdexp, installed in bf16."""
    run = run_dir.with_name(f"{run_dir.name}-other")
    transplant(run)
    train(run, OTHER_RECIPE)
    install(run, OTHER, "other", OTHER_RECIPE, bfloat16=True)


def model_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       attention_dropout=0.0, **ARCH[name])


def moe_config():
    """The MoE student: the dense student's attention and width, its MLP split into 4 experts of
    width 128, 2 per token (Mixtral's router; load-balancing loss weight 0.01 as Mixtral's)."""
    from transformers import MixtralConfig

    dense = ARCH["tiny-student"]
    return MixtralConfig(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attention_dropout=0.0, hidden_size=dense["hidden_size"], intermediate_size=128,
                         num_hidden_layers=dense["num_hidden_layers"], num_attention_heads=dense["num_attention_heads"],
                         num_key_value_heads=dense["num_key_value_heads"], num_local_experts=4,
                         num_experts_per_tok=2, router_aux_loss_coef=0.01, sliding_window=None)


def moe() -> None:
    """``tiny-moe``: the MoE student's config and the bundled tokenizer (no weights)."""
    MOE.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(STUDENT / name, MOE / name)
    moe_config().save_pretrained(MOE)
    print(f"MoE student config written to {MOE}")


def skeleton() -> None:
    """Tokenizer and config.json of both tiny models (no weights)."""
    tokenizer = build_tokenizer()
    for folder in (TEACHER, STUDENT):
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(folder)
        # Name a class that transformers 4.x knows too (5.x writes its own backend's name).
        meta = json.loads((folder / "tokenizer_config.json").read_text())
        meta["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        model_config(folder.name).save_pretrained(folder)
    print(f"tokenizer ({len(tokenizer)} tokens) and configs written to {TEACHER} and {STUDENT}")


def teacher(run_dir: Path) -> None:
    """Train the tiny teacher with kdexp itself and copy its weights into the package."""
    skeleton()
    train(run_dir, TEACHER_RECIPE)
    install(run_dir, TEACHER, "teacher", TEACHER_RECIPE)
    specialists(run_dir)
    other(run_dir)


def specialists(run_dir: Path) -> None:
    """Fine-tune the bundled teacher on each of SPECIALISTS' family sets into ``tiny-teacher-X``."""
    for letter, families in SPECIALISTS.items():
        run, recipe = run_dir.with_name(f"{run_dir.name}-{letter}"), specialist_recipe(families)
        train(run, recipe)
        folder = HERE / f"tiny-teacher-{letter}"
        folder.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(TEACHER / name, folder / name)
        install(run, folder, "specialists", recipe, bfloat16=True)


def train(run_dir: Path, recipe: list[str]) -> None:
    """``kdexp train RECIPE`` into a fresh ``run_dir``."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "kdexp", "train", *recipe, f"hydra.run.dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def install(run_dir: Path, folder: Path, what: str, recipe: list[str], bfloat16: bool = False) -> None:
    """Copy a run's final weights into a bundled model's folder, with its recipe and its scores
    on the whole toy test split, overall and by family (evaluated here: a fine-tuning run's own
    test split holds its families only)."""
    final = run_dir / "final"
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        shutil.copy2(final / name, folder / name)
    if bfloat16:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        save_file({k: v.bfloat16() for k, v in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    scored = run_dir.with_name(run_dir.name + "-eval")
    subprocess.run([sys.executable, "-m", "kdexp", "eval", f"model={folder}", "eval=greedy", "logger=none",
                    f"hydra.run.dir={scored}"], check=True)
    results = json.loads((scored / "results.json").read_text())
    trained = json.loads((run_dir / "results.json").read_text())
    (folder / "training.json").write_text(json.dumps({
        "recipe": f"python -m kdexp.assets.build {what}  (kdexp train " + " ".join(recipe) + ")",
        "test_rougeL": round(results["rougeL"], 2), "test_exact_match": round(results["exact_match"], 2),
        "by_family": {f: {k: round(v, 2) for k, v in m.items()} for f, m in results["by_family"].items()},
        "eval": "greedy, toy test split (200 prompts)", "train_time_s": trained["train"]["time_s"],
    }, indent=2) + "\n")
    print(f"{what} written to {folder}: test ROUGE-L {results['rougeL']:.2f}, "
          f"exact match {results['exact_match']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["skeleton", "teacher", "specialists", "other", "moe"])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/make-teacher"))
    args = parser.parse_args()
    {"skeleton": lambda _: skeleton(), "teacher": teacher, "specialists": specialists,
     "other": other, "moe": lambda _: moe()}[args.what](args.run_dir)


if __name__ == "__main__":
    main()
