"""Where each model part comes from: a local folder or the original hub repos.

A local folder has the layout of SPEC.md section 1 (each subfolder as
``save_pretrained`` writes it); a hub repo id in ``--model`` is read with the
same layout. Weights load through safetensors only.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from framepack.errors import FramepackError, UserError

VARIANTS = ("original", "f1")
TRANSFORMER_REPOS = {"original": "lllyasviel/FramePackI2V_HY", "f1": "lllyasviel/FramePack_F1_I2V_HY_20250503"}
HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
REDUX_REPO = "lllyasviel/flux_redux_bfl"
# part -> (repo, subfolder) for the default hub layout; the transformer sits
# at the root of its own repo.
HUB_PARTS = {
    "text_encoder": (HUNYUAN_REPO, "text_encoder"),
    "text_encoder_2": (HUNYUAN_REPO, "text_encoder_2"),
    "tokenizer": (HUNYUAN_REPO, "tokenizer"),
    "tokenizer_2": (HUNYUAN_REPO, "tokenizer_2"),
    "vae": (HUNYUAN_REPO, "vae"),
    "image_encoder": (REDUX_REPO, "image_encoder"),
    "feature_extractor": (REDUX_REPO, "feature_extractor"),
}
ALL_PARTS = ("transformer", *HUB_PARTS)
_WEIGHTLESS = ("tokenizer", "tokenizer_2", "feature_extractor")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    import diffusers
    import transformers

    t_level = transformers.logging.get_verbosity()
    d_level = diffusers.logging.get_verbosity()
    t_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(t_level)
        diffusers.logging.set_verbosity(d_level)
        if t_bars:
            transformers.utils.logging.enable_progress_bar()


@dataclass(frozen=True)
class ModelSource:
    variant: str
    root: Path | None = None  # local folder
    repo: str | None = None  # a hub repo with the local-folder layout

    @classmethod
    def from_arg(cls, model: str | None, variant: str) -> "ModelSource":
        if variant not in VARIANTS:
            raise UserError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        if model is None:
            return cls(variant)
        path = Path(model).expanduser()
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--model {model}: not a folder (give a model folder or a hub repo id)")
            return cls(variant, root=path.resolve())
        if _REPO_ID.match(model) and not model.startswith((".", "/", "~")):
            return cls(variant, repo=model)
        raise UserError(f"--model {model}: no such folder, and not a hub repo id (owner/name)")

    def location(self, part: str) -> tuple[str, str | None]:
        """(path or repo id, subfolder) to hand to from_pretrained."""
        if self.root is not None:
            return str(self.root), part
        if self.repo is not None:
            return self.repo, part
        if part == "transformer":
            return TRANSFORMER_REPOS[self.variant], None
        return HUB_PARTS[part]

    def describe(self) -> str:
        if self.root is not None:
            return f"local folder {self.root}"
        if self.repo is not None:
            return f"hub repo {self.repo}"
        return f"hub repos {TRANSFORMER_REPOS[self.variant]}, {HUNYUAN_REPO}, {REDUX_REPO}"

    def check_parts(self, parts: tuple[str, ...]) -> None:
        """For a local folder, say every missing part at once, before loading anything."""
        if self.root is None:
            return
        problems = []
        for part in parts:
            folder = self.root / part
            if not folder.is_dir():
                problems.append(f"{part}/ (missing)")
            elif part not in _WEIGHTLESS:
                if not (folder / "config.json").is_file():
                    problems.append(f"{part}/ (no config.json)")
                elif not any(folder.glob("*.safetensors")):
                    problems.append(f"{part}/ (no .safetensors weights)")
            elif not any(folder.iterdir()):
                problems.append(f"{part}/ (empty)")
        if problems:
            raise UserError(
                f"model folder {self.root} is incomplete: " + ", ".join(problems)
                + " (expected the layout of `framepack make-tiny-model`, see docs/models.md)"
            )

    @contextlib.contextmanager
    def loading(self, part: str) -> Iterator[None]:
        """Turn library errors while loading one part into one clear line,
        and keep the libraries' own progress bars and notices off stderr
        (the engine reports progress itself)."""
        where, sub = self.location(part)
        try:
            with quiet_libraries():
                yield
        except FramepackError:
            raise
        except Exception as exc:
            place = f"{where}" + (f" (subfolder {sub})" if sub else "")
            hint = (
                " The hub may be unreachable: pass --model DIR with a local copy, or make a test "
                "model with `framepack make-tiny-model DIR`."
                if self.root is None
                else ""
            )
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FramepackError(f"cannot load {part} from {place}: {first_line}.{hint}") from exc
