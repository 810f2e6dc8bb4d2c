"""Build the bundled tiny models: ``make teacher`` runs this.

    python -m kdexp.assets.build skeleton        # tokenizer + configs of tiny-teacher and tiny-student
    python -m kdexp.assets.build teacher         # skeleton, then train the teacher with `kdexp train`

The tokenizer is a byte-level BPE (1024 tokens) learned on the toy task's training text; both
tiny models share it. The teacher (LLaMA architecture, 4 layers, width 256, ~3.4M parameters)
is trained with kdexp's own loop (``method=sft``) from a fixed seed, and its weights are copied
into ``kdexp/assets/tiny-teacher``. The student config (2 layers, width 96, ~0.32M parameters,
about 10x smaller) has no weights: ``student=tiny`` initializes it from ``seed``.
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
TEACHER, STUDENT = HERE / "tiny-teacher", HERE / "tiny-student"
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


def tokenizer_corpus(n: int = 20000) -> list[str]:
    """Prompt + response texts of the toy training split (seed 0, compact template)."""
    template = TEMPLATES.get("compact")
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


def model_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       attention_dropout=0.0, **ARCH[name])


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
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "kdexp", "train", *TEACHER_RECIPE, f"hydra.run.dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    final = run_dir / "final"
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        shutil.copy2(final / name, TEACHER / name)
    results = json.loads((run_dir / "results.json").read_text())
    (TEACHER / "training.json").write_text(json.dumps({
        "recipe": "python -m kdexp.assets.build teacher  (kdexp train " + " ".join(TEACHER_RECIPE) + ")",
        "test_rougeL": round(results["rougeL"], 2), "test_exact_match": round(results["exact_match"], 2),
        "eval": "greedy, toy test split (200 prompts)", "train_time_s": results["train"]["time_s"],
    }, indent=2) + "\n")
    print(f"teacher written to {TEACHER}: test ROUGE-L {results['rougeL']:.2f}, "
          f"exact match {results['exact_match']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["skeleton", "teacher"])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/make-teacher"))
    args = parser.parse_args()
    skeleton() if args.what == "skeleton" else teacher(args.run_dir)


if __name__ == "__main__":
    main()
