"""Build the assets that ``offsite demo`` ships: a tiny pretrained causal LM and a downstream text.

Pretraining corpus: the reStructuredText sources of the Python 3.11 documentation (Debian's
``python3.11-doc``, PSF license). Downstream texts, other domains: Python source code (modules of
the 3.11 standard library, PSF license; the default), books of the King James Bible (public
domain, Debian's ``bible-kjv``) and the Debian Reference (GPL-2+). All come from the package registry:

    apt-get install -y python3.11-doc libpython3.11-stdlib bible-kjv debian-reference-en
    python scripts/build_demo_assets.py code            # writes demo_assets/pycode/*.txt
    python scripts/build_demo_assets.py downstream      # writes demo_assets/kjv/*.txt
    python scripts/build_demo_assets.py debref          # writes demo_assets/debref/*.txt (needs debian-reference-en)
    python scripts/build_demo_assets.py owner           # writes demo_assets/pydoc/distill.txt
    python scripts/build_demo_assets.py pretrain --minutes 35

``pretrain`` trains a byte-level BPE tokenizer and a small Llama-family model (RMSNorm, rotary,
SwiGLU, grouped-query attention) on CPU, keeps the checkpoint with the best validation loss, and
writes it in safetensors (bf16) with its tokenizer to ``offsite_kernels/demo_assets/pydoc-llama``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "offsite_kernels" / "demo_assets"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# downstream task: the Gospels to train on, Acts to validate (whole books, verse text only)
TRAIN_BOOKS = ("Matthew", "Mark", "Luke", "John")
VALID_BOOKS = ("Acts",)
VOCAB = 4096
MODEL = dict(hidden_size=256, num_hidden_layers=8, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)


def book_text(book: str) -> str:
    """One book, one verse per line, references stripped."""
    out = subprocess.run(["bible", "-l0", f"{book}1:1-200:200"], capture_output=True, text=True, check=True).stdout
    lines = [m.group(1).strip() for m in re.finditer(r"^\s+\d+ (.+)$", out, flags=re.MULTILINE)]
    if not lines:
        raise SystemExit(f"bible printed nothing for {book}; is bible-kjv installed?")
    return "\n".join(lines) + "\n"


def cmd_downstream(args: argparse.Namespace) -> None:
    target = ASSETS / "kjv"
    target.mkdir(parents=True, exist_ok=True)
    for name, books in (("train", TRAIN_BOOKS), ("valid", VALID_BOOKS)):
        text = "".join(book_text(b) for b in books)
        (target / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}: {', '.join(books)}: {len(text):,} characters")


def cmd_owner(args: argparse.Namespace) -> None:
    """The owner's distillation text: whole documentation files from the pretraining split, ~400 KB."""
    files = sorted(Path(args.docs).rglob("*.rst.txt"))
    random.Random(0).shuffle(files)
    train_files = files[max(1, len(files) // 50) :]  # the pretraining split of read_docs
    picked, size = [], 0
    for f in sorted(train_files, key=lambda f: str(f)):
        text = f.read_text(encoding="utf-8", errors="replace")
        if "library/" in str(f) and 5_000 < len(text) < 40_000:
            picked.append(text)
            size += len(text)
        if size > 400_000:
            break
    target = ASSETS / "pydoc"
    target.mkdir(parents=True, exist_ok=True)
    (target / "distill.txt").write_text("\n\n".join(picked), encoding="utf-8")
    print(f"owner text: {len(picked)} files, {size:,} characters")


STDLIB = Path("/usr/lib/python3.11")
# the default downstream task: Python source code (the model was pretrained on prose about it)
CODE_TRAIN = (
    "argparse", "calendar", "configparser", "csv", "difflib", "fnmatch", "ftplib", "gettext", "heapq", "imaplib",
    "ipaddress", "netrc", "optparse", "pprint", "queue", "sched", "smtplib", "string", "tabnanny", "tokenize", "uuid",
    "zipfile",
)  # fmt: skip
CODE_VALID = ("textwrap", "shlex", "fractions")


def cmd_code(args: argparse.Namespace) -> None:
    """Default downstream text: whole modules of the Python 3.11 standard library (Debian
    ``libpython3.11-minimal`` / ``libpython3.11-stdlib``, PSF license), verbatim; held-out modules apart."""
    root = Path(args.stdlib)
    target = ASSETS / "pycode"
    target.mkdir(parents=True, exist_ok=True)
    for name, modules in (("train", CODE_TRAIN), ("valid", CODE_VALID)):
        missing = [m for m in modules if not (root / f"{m}.py").is_file()]
        if missing:
            raise SystemExit(f"{root} lacks {', '.join(missing)}.py; apt-get install libpython3.11-stdlib")
        text = "\n\n".join((root / f"{m}.py").read_text(encoding="utf-8") for m in modules)
        (target / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}: {len(modules)} modules: {len(text):,} characters")


DEBREF = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")


def cmd_debref(args: argparse.Namespace) -> None:
    """Second downstream text: the Debian Reference, chapters 1, 2, 4, 5 to train on and 3 held out."""
    import gzip

    with gzip.open(args.source, "rt", encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"^(Chapter\s\d+\.\s.*)$", text, flags=re.MULTILINE)  # \s: the headings use a no-break space
    chapters = {int(re.match(r"Chapter\s(\d+)", parts[i]).group(1)): parts[i] + parts[i + 1] for i in range(1, len(parts), 2)}

    def clean(t: str) -> str:
        return re.sub(r"\n{3,}", "\n\n", "\n".join(line.strip() for line in t.splitlines())).strip() + "\n"

    target = ASSETS / "debref"
    target.mkdir(parents=True, exist_ok=True)
    for name, numbers in (("train", (1, 2, 4, 5)), ("valid", (3,))):
        body = clean("".join(chapters[n] for n in numbers))
        (target / f"{name}.txt").write_text(body, encoding="utf-8")
        print(f"{name}: chapters {numbers}: {len(body):,} characters")


def read_docs(root: Path) -> tuple[str, str]:
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt under {root}; apt-get install python3.11-doc")
    random.Random(0).shuffle(files)
    n_valid = max(1, len(files) // 50)
    read = lambda fs: "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in fs)  # noqa: E731
    return read(files[n_valid:]), read(files[:n_valid])


def cmd_pretrain(args: argparse.Namespace) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_text, valid_text = read_docs(Path(args.docs))
    print(f"corpus: {len(train_text):,} train / {len(valid_text):,} valid characters")

    if args.init:  # continue training a saved model with its tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator([train_text[i : i + 100_000] for i in range(0, len(train_text), 100_000)], trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    train_ids, valid_ids = encode(train_text), encode(valid_text)
    print(f"tokens: {len(train_ids):,} train / {len(valid_ids):,} valid")
    block = args.block
    valid_blocks = valid_ids[: len(valid_ids) // block * block].view(-1, block)[:64]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        **MODEL,
    )
    model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32) if args.init else LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    est_steps = args.max_steps
    budget = args.minutes * 60

    def lr_at(step: int) -> float:
        """Linear warm-up, then cosine to 10% over progress = max(step fraction, time fraction)."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, max(step / est_steps, (time.time() - start) / budget))
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def valid_loss() -> float:
        model.eval()
        losses = [float(model(input_ids=b[None], labels=b[None]).loss) for b in valid_blocks]
        model.train()
        return sum(losses) / len(losses)

    best, step = math.inf, 0
    start = time.time()
    out = Path(args.out)
    model.train()
    while step < est_steps and time.time() - start < budget:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - block - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + block] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.eval_every == 0 or step == est_steps:
            v = valid_loss()
            rate = step * args.batch * block / (time.time() - start)
            print(f"step {step} train {loss.item():.3f} valid {v:.3f} (ppl {math.exp(v):.1f}) {rate:,.0f} tok/s", flush=True)
            if v < best:
                best = v
                save(model, tokenizer, out, step, v, args)
    print(f"best valid loss {best:.3f} (ppl {math.exp(best):.1f}) after {step} steps, {(time.time() - start) / 60:.1f} min")


def save(model, tokenizer, out: Path, step: int, valid: float, args: argparse.Namespace) -> None:
    import torch

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(
        json.dumps(
            {
                "step": step,
                "valid_loss": valid,
                "corpus": "python3.11-doc _sources",
                "args": {k: v for k, v in vars(args).items() if k != "func"},
            },
            indent=2,
        )
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("downstream").set_defaults(func=cmd_downstream)
    p = sub.add_parser("code")
    p.add_argument("--stdlib", default=str(STDLIB))
    p.set_defaults(func=cmd_code)
    p = sub.add_parser("debref")
    p.add_argument("--source", default=str(DEBREF))
    p.set_defaults(func=cmd_debref)
    p = sub.add_parser("owner")
    p.add_argument("--docs", default=str(DOCS))
    p.set_defaults(func=cmd_owner)
    p = sub.add_parser("pretrain")
    p.add_argument("--docs", default=str(DOCS))
    p.add_argument("--minutes", type=float, default=35)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue from this saved model (and its tokenizer) instead of starting afresh")
    p.add_argument("--out", default=str(ASSETS / "pydoc-llama"), help="where the best checkpoint goes")
    p.set_defaults(func=cmd_pretrain)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
