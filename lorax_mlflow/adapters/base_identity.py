"""Which base model an adapter was trained for, recorded beside it by `log_adapter`.

Shape checks catch an adapter for a differently shaped model, not one for a sibling of the same
shape (a base checkpoint vs. its instruct tune): its outputs would be silently wrong. An adapter
folder that carries ``lorax_adapter.json`` names its base; serving it on another base is refused
with a 400. Names are compared by their last path component, case-insensitively and without a
revision, so ``HuggingFaceTB/SmolLM2-135M`` and ``/models/SmolLM2-135M`` match each other.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from lorax_mlflow.adapters.confined import ConfinedFolder
from lorax_mlflow.errors import AdapterValidationError, LoraxError

IDENTITY_FILE = "lorax_adapter.json"


def base_key(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/").split("@", 1)[0].rstrip("/")).name.lower()


def write_base_identity(folder: Path, base_model: str) -> Path:
    path = Path(folder) / IDENTITY_FILE
    path.write_text(json.dumps({"base_model": base_model}))
    return path


def recorded_base(folder: Path, root: Path | None = None) -> str | None:
    files = ConfinedFolder(Path(folder), root)
    try:
        if not files.is_file(IDENTITY_FILE):
            return None
        base = json.loads(files.read_bytes(IDENTITY_FILE, 1 << 20).decode("utf-8")).get("base_model")
    except LoraxError as exc:
        raise AdapterValidationError(f"{IDENTITY_FILE}: {exc.message}") from exc
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterValidationError(f"{IDENTITY_FILE} is not valid JSON ({exc})") from exc
    return base if isinstance(base, str) and base else None


def check_base_model(folder: Path, adapter_name: str, served_base: str, root: Path | None = None) -> None:
    """Raise unless the adapter in `folder` was recorded for `served_base` (or records nothing)."""
    base = recorded_base(folder, root)
    if base is not None and base_key(base) != base_key(served_base):
        raise AdapterValidationError(
            f"adapter {adapter_name!r} was trained for base model {base!r}; this server serves {served_base!r}",
            code="adapter_base_mismatch",
        )
