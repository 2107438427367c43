#!/usr/bin/env python3
"""Make the tiny local models that the real-vLLM tier serves (no model can be downloaded here).

    python3 scripts/make_tiny_models.py [OUT_DIR] [--only NAME] [--force] [--runner R]

Writes OUT_DIR/tiny-a and OUT_DIR/tiny-b (OUT_DIR defaults to `models/` at the repo root,
git-ignored): Hugging Face model directories that vLLM loads with `--model DIR`.

- tiny-a: Llama, hidden 128, 2 layers, 2 heads (head_dim 64: the CPU attention kernel
  rejects smaller heads), about 1.5 MB. Fast; for contract and chat tests.
- tiny-b: Llama, hidden 512, 6 layers, 8 heads, about 87 MB, about 10 ms per token on the
  CPU: it streams token by token, for chunk-timing and abort tests.

Both share a byte-level BPE tokenizer trained on a few sentences, wrapped in
`PreTrainedTokenizerFast` with a ChatML chat template. Weights are random and seeded, so a
model is the same file for the same recipe. The output head is scaled (logits of std ~4)
and its rows for special tokens are zero, so sampling practically never picks the end of
turn token: a generation runs to `max_tokens` (finish_reason "length").

Idempotent: a model whose directory holds `fleet-tiny-model.json` with the current recipe
hash is skipped ("cached"). Models are written to a temporary directory and renamed.

torch, transformers and tokenizers are needed; `--runner` picks where they come from:
  host   this Python (fails if it lacks them)
  image  the vLLM image vllm-fleet/vllm-cpu:0.32.0, which has the very versions that will
         serve the models (docker run --rm --network none, a few seconds)
  venv   a venv at .cache/models-venv with the versions pinned in
         docker/vllm-cpu.requirements.txt (torch 2.13.0+cpu from the machine's local wheels;
         about a minute the first time)
  auto   (default) host if it has them, else image if it exists, else venv.
Progress on stderr: `==> STEP: done|cached (...)  [seconds]`. Exit 0 ok, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models"
IMAGE = os.environ.get("VLLM_IMAGE", "vllm-fleet/vllm-cpu:0.32.0")
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
LOCK_FILE = REPO_ROOT / "docker" / "vllm-cpu.requirements.txt"
VENV_DIR = REPO_ROOT / ".cache" / "models-venv"
WHEELS_DIR = REPO_ROOT / ".cache" / "vllm-wheels"
VENV_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors")
MARKER = "fleet-tiny-model.json"
# Bump when the code below changes what a model directory holds.
RECIPE_VERSION = 1

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "A fleet of small language models answers questions behind one gateway.",
    "Say hello in one word. Tell me a short story about a robot and a cat.",
    "What is the capital of France? Paris is the capital of France.",
    "Count from one to ten: one two three four five six seven eight nine ten.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2026-01-01 12:00:00",
    "def main():\n    print('hello, world')\n    return 0\n",
    '{"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]}',
    "The system prompt says: you are a helpful assistant. The user asks, the assistant answers.",
    "Streaming sends one token at a time; a client may disconnect and abort the request.",
    "Sleep mode frees memory; wake up brings the model back. Switch between models quickly.",
)


@dataclass(frozen=True)
class TinySpec:
    """The recipe of one tiny Llama model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    seed: int
    max_position_embeddings: int = 2048
    vocab_target: int = 512
    logit_std: float = 4.0

    def recipe_hash(self) -> str:
        material = json.dumps({"spec": asdict(self), "version": RECIPE_VERSION,
                               "corpus": CORPUS, "template": CHAT_TEMPLATE,
                               "specials": SPECIAL_TOKENS}, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()[:16]


MODELS: dict[str, TinySpec] = {
    "tiny-a": TinySpec(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=512, seed=1),
    "tiny-b": TinySpec(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                       intermediate_size=1536, seed=2),
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_current(model_dir: Path, spec: TinySpec) -> bool:
    """True when `model_dir` holds a complete model made from `spec`'s current recipe."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == spec.recipe_hash() and (model_dir / "config.json").is_file()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------
# Building (needs torch, transformers, tokenizers)


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODELS["tiny-a"].vocab_target,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODELS["tiny-a"].max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_model(name: str, spec: TinySpec, out: Path) -> None:
    """Write model `name` to directory `out` (which must not exist)."""
    _quiet()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(spec.seed)
        head = model.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=gen) * (spec.logit_std / spec.hidden_size**0.5))
        head[special_ids] = 0.0
    model.config.architectures = ["LlamaForCausalLM"]
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {name}\n\nA randomly initialised tiny Llama made by scripts/make_tiny_models.py "
        f"for tests. It produces gibberish.\n\nRecipe: {json.dumps(asdict(spec))}\n")
    marker = {"name": name, "recipe": spec.recipe_hash(), "spec": asdict(spec),
              "vocab_size": vocab, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    for path in out.iterdir():  # safetensors writes 0600; any container user may read
        path.chmod(0o644)


def make_models(out_dir: Path, names: list[str], force: bool) -> int:
    """Build every model of `names` that is missing or stale in `out_dir` (here, in-process)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = MODELS[name]
        t0 = time.monotonic()
        target = out_dir / name
        say(f"==> model {name}: start")
        if not force and is_current(target, spec):
            say(f"==> model {name}: cached ({target}, recipe {spec.recipe_hash()}, "
                f"{dir_size(target) / 1e6:.1f} MB)  [{time.monotonic() - t0:.1f} s]")
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
        try:
            build_model(name, spec, tmp / name)
            if target.exists():
                shutil.rmtree(target)
            (tmp / name).rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"==> model {name}: done ({target}, recipe {spec.recipe_hash()}, "
            f"{dir_size(target) / 1e6:.1f} MB)  [{time.monotonic() - t0:.1f} s]")
    return 0


# ---------------------------------------------------------------------------------------
# Runners: where torch/transformers come from


def have_libraries(python: str | None = None) -> bool:
    code = "import torch, transformers, tokenizers"
    if python is None:
        try:
            exec(code, {})
        except ImportError:
            return False
        return True
    return subprocess.run([python, "-c", code], capture_output=True, timeout=300).returncode == 0


def image_exists() -> bool:
    try:
        return subprocess.run([DOCKER, "image", "inspect", IMAGE], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_in_image(out_dir: Path, passthrough: list[str]) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    script_dir = Path(__file__).resolve().parent
    cmd = [DOCKER, "run", "--rm", "--network", "none",
           "--label", "io.vllm-fleet.tool=make-tiny-models",
           "--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp",
           "-v", f"{script_dir}:/fleet-scripts:ro", "-v", f"{out_dir.resolve()}:/out",
           "--entrypoint", "python3", IMAGE,
           "/fleet-scripts/make_tiny_models.py", "/out", "--runner", "host", *passthrough]
    say(f"    running in {IMAGE}: {' '.join(cmd)}")
    return subprocess.run(cmd, timeout=1800).returncode


def venv_pins() -> list[str]:
    """`name==version` of VENV_PACKAGES as pinned in the image's lock file."""
    pins: dict[str, str] = {}
    for line in LOCK_FILE.read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "==" in head:
            name, version = head.split("==", 1)
            pins[name] = version
    missing = [p for p in VENV_PACKAGES if p not in pins]
    if missing:
        raise SystemExit(f"{LOCK_FILE} does not pin {missing}")
    return [f"{p}=={pins[p]}" for p in VENV_PACKAGES]


def ensure_venv() -> str:
    python = str(VENV_DIR / "bin" / "python")
    stamp = VENV_DIR / ".fleet-pins"
    pins = venv_pins()
    t0 = time.monotonic()
    say("==> models-venv: start")
    if stamp.is_file() and stamp.read_text().split() == pins and have_libraries(python):
        say(f"==> models-venv: cached ({VENV_DIR}: {' '.join(pins)})  "
            f"[{time.monotonic() - t0:.1f} s]")
        return python
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True, timeout=300)
    # torch==X+cpu only matches the CPU build (from pip's find-links); never a CUDA wheel.
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *pins]
    if (WHEELS_DIR / "requirements.txt").is_file():
        cmd += ["--find-links", str(WHEELS_DIR)]
    say(f"    $ {' '.join(cmd)}")
    subprocess.run(cmd, check=True, timeout=1800)
    stamp.write_text("\n".join(pins) + "\n")
    say(f"==> models-venv: done ({VENV_DIR})  [{time.monotonic() - t0:.1f} s]")
    return python


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Make the tiny local models (tiny-a, tiny-b) served by the real-vLLM tier.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT,
                        help="where to write the model directories (default: models/ at the repo root)")
    parser.add_argument("--only", action="append", choices=sorted(MODELS),
                        help="make only this model (repeatable)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--runner", choices=("auto", "host", "image", "venv"), default="auto",
                        help="where torch/transformers come from (default: auto)")
    args = parser.parse_args(argv)
    names = args.only or list(MODELS)
    out_dir: Path = args.out_dir.resolve()
    t0 = time.monotonic()

    if not args.force and all(is_current(out_dir / n, MODELS[n]) for n in names):
        for n in names:
            say(f"==> model {n}: cached ({out_dir / n}, recipe {MODELS[n].recipe_hash()}, "
                f"{dir_size(out_dir / n) / 1e6:.1f} MB)  [0.0 s]")
        say(f"==> make_tiny_models: all models up to date  [{time.monotonic() - t0:.1f} s]")
        return 0

    runner = args.runner
    if runner == "auto":
        runner = "host" if have_libraries() else ("image" if image_exists() else "venv")
        say(f"    runner: {runner} (torch/transformers from "
            f"{ {'host': 'this Python', 'image': IMAGE, 'venv': str(VENV_DIR)}[runner] })")
    passthrough = [a for n in names for a in ("--only", n)] + (["--force"] if args.force else [])
    try:
        if runner == "host":
            if not have_libraries():
                say(f"ERROR: {sys.executable} lacks torch/transformers/tokenizers; use "
                    f"--runner image (after scripts/build-vllm-image.sh) or --runner venv")
                return 1
            rc = make_models(out_dir, names, args.force)
        elif runner == "image":
            if not image_exists():
                say(f"ERROR: image {IMAGE} not found; run: bash scripts/build-vllm-image.sh "
                    f"(or use --runner venv)")
                return 1
            rc = run_in_image(out_dir, passthrough)
        else:
            python = ensure_venv()
            rc = subprocess.run([python, str(Path(__file__).resolve()), str(out_dir),
                                 "--runner", "host", *passthrough], timeout=1800).returncode
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        say(f"ERROR: {exc}")
        return 1
    if rc == 0:
        say(f"==> make_tiny_models: ok ({out_dir})  [{time.monotonic() - t0:.1f} s]")
    else:
        say(f"ERROR: making the models failed (exit {rc})")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
