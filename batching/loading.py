"""Loading an XTTS-v2 checkpoint through coqui-tts's own code: a local folder, or the released model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from batching import demo
from batching.errors import ModelNotLoadedError

log = logging.getLogger(__name__)

RELEASED_MODELS = {"xtts_v2": "tts_models/multilingual/multi-dataset/xtts_v2"}
CHECKPOINT_FILES = ("config.json", "model.pth", "vocab.json")


@dataclass(frozen=True)
class LoadedModel:
    model: object  # TTS.tts.models.xtts.Xtts, in eval mode on `device`
    device: object  # torch.device
    source: str  # the folder it came from
    demo: dict | None  # the demo marker (random weights), or None for a real model


def resolve_device(spec: str):
    """`cuda`, `cpu` or `auto` (CUDA when available) to a torch.device; `cuda:N` is accepted too."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelNotLoadedError("XTTS V2 model is not loaded: XTTS_DEVICE=cuda but no CUDA device is available")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise ModelNotLoadedError(f"XTTS_DEVICE must be cuda, cpu or auto, got {spec!r}")


def fetch_released(model: str) -> Path:
    """Download (or find in coqui's cache) a released model and return its folder. Used at image build time."""
    if model not in RELEASED_MODELS:
        raise ModelNotLoadedError(f"XTTS_MODEL must be one of {', '.join(RELEASED_MODELS)}, got {model!r}")
    from TTS.utils.manage import ModelManager

    manager = ModelManager(progress_bar=False)
    name = RELEASED_MODELS[model]
    if os.environ.get("COQUI_TOS_AGREED") != "1":
        # coqui would ask on stdin, which a worker does not have: say what to do instead.
        cached = Path(manager.output_prefix) / name.replace("/", "--") / "tos_agreed.txt"
        if not cached.exists():
            raise ModelNotLoadedError(
                f"XTTS V2 model is not loaded: {model} is released under the Coqui Public Model License; "
                "set COQUI_TOS_AGREED=1 to accept it, or set XTTS_MODEL_DIR to a local checkpoint folder"
            )
    try:
        model_path, config_path, _ = manager.download_model(name)
    except Exception as exc:  # network, hub or disk: all mean the same to the operator
        raise ModelNotLoadedError(
            f"XTTS V2 model is not loaded: the {model} weights are not on this machine and could not be fetched "
            f"({type(exc).__name__}: {exc}); bake them into the image or set XTTS_MODEL_DIR to a checkpoint folder"
        ) from exc
    folder = Path(config_path).parent if config_path else Path(model_path)
    return folder if folder.is_dir() else folder.parent


def load(model_dir: str | os.PathLike | None, model: str = "xtts_v2", device: str = "auto") -> LoadedModel:
    """Load a checkpoint folder (`config.json`, `model.pth`, `vocab.json`) or, without one, a released model."""
    torch_device = resolve_device(device)
    folder = Path(model_dir) if model_dir else fetch_released(model)
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelNotLoadedError(
            f"XTTS V2 model is not loaded: {folder} lacks {', '.join(missing)} "
            "(build a demo checkpoint with `python -m batching.demo DIR` or point XTTS_MODEL_DIR at a real one)"
        )

    from transformers.utils import logging as hf_logging
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    # coqui builds GPT2Config with GPT-2's token ids, which transformers warns about on every load: noise.
    hf_logging.set_verbosity_error()
    try:
        config = XttsConfig()
        config.load_json(str(folder / "config.json"))
        xtts = Xtts(config)
        xtts.load_checkpoint(config, checkpoint_dir=str(folder), eval=True)
        xtts.to(torch_device)
    except Exception as exc:
        raise ModelNotLoadedError(
            f"XTTS V2 model is not loaded: loading {folder} failed ({type(exc).__name__}: {exc})"
        ) from exc
    marker = demo.read_marker(folder)
    if marker:
        log.warning("loaded a DEMO checkpoint with RANDOM WEIGHTS from %s: it speaks noise", folder)
    else:
        log.info("loaded XTTS checkpoint from %s on %s", folder, torch_device)
    return LoadedModel(model=xtts, device=torch_device, source=str(folder), demo=marker)
