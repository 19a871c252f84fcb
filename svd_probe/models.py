"""Model names: aliases, Hub repo ids and local folders, resolved to one `ModelRef`.

Everywhere a command takes MODEL it accepts an alias (`deepseek-v3`), a Hub repo id
(`org/name`) or a local folder. An existing folder wins over everything else, so a folder named
like an alias still means the folder.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from svd_probe.errors import UnknownModelError


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    repo_id: str
    note: str = ""


# Known checkpoints. Their config facts and the `models` table are in `svd_probe.known_models`.
ALIASES: dict[str, ModelAlias] = {
    a.alias: a
    for a in [
        ModelAlias("deepseek-v3", "deepseek-ai/DeepSeek-V3"),
        ModelAlias("deepseek-v3-base", "deepseek-ai/DeepSeek-V3-Base"),
        ModelAlias("deepseek-r1", "deepseek-ai/DeepSeek-R1"),
        ModelAlias("deepseek-v3.1", "deepseek-ai/DeepSeek-V3.1"),
        ModelAlias("kimi-k2", "moonshotai/Kimi-K2-Instruct"),
        ModelAlias("kimi-k2-base", "moonshotai/Kimi-K2-Base"),
        ModelAlias("kimi-k2-thinking", "moonshotai/Kimi-K2-Thinking"),
        ModelAlias("deepseek-v2", "deepseek-ai/DeepSeek-V2"),
        ModelAlias("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite"),
        ModelAlias("moonlight", "moonshotai/Moonlight-16B-A3B"),
        ModelAlias("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "gated: needs a token"),
        ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
        ModelAlias("mistral-7b", "mistralai/Mistral-7B-v0.1"),
    ]
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# A full git commit hash, as the Hub's X-Repo-Commit header and pinned revisions carry it.
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def is_commit(revision: str | None) -> bool:
    """True for a full 40-hex commit hash (a revision that needs no resolving)."""
    return revision is not None and COMMIT_RE.match(revision) is not None


@dataclass(frozen=True)
class ModelRef:
    """What a MODEL argument names."""

    name: str  # as the user typed it
    repo_id: str | None = None  # Hub repo, for aliases and repo ids
    local_path: Path | None = None  # for local folders
    alias: str | None = None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def display(self) -> str:
        # A local folder shows as its name, as a Hub repo shows as its id; the path is in the manifest.
        return self.alias or self.repo_id or (self.local_path.name if self.local_path else self.name)


def resolve_model(name: str) -> ModelRef:
    """Turn a MODEL argument into a `ModelRef`, or raise `UnknownModelError` naming the fix."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return ModelRef(name=name, local_path=path.resolve())
    key = name.lower()
    if key in ALIASES:
        return ModelRef(name=name, repo_id=ALIASES[key].repo_id, alias=key)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _REPO_ID.match(name)
    if looks_like_path:
        raise UnknownModelError(
            f"no such folder: {name}", "Pass an existing checkpoint folder, an alias, or a Hub repo id org/name."
        )
    if _REPO_ID.match(name):
        return ModelRef(name=name, repo_id=name)
    close = difflib.get_close_matches(key, list(ALIASES), n=1, cutoff=0.6)
    if close:
        raise UnknownModelError(
            f"unknown model {name!r}: did you mean {close[0]}?",
            f"Use {close[0]} (`svd-probe models` lists every alias), a Hub repo id org/name, or a local folder.",
        )
    raise UnknownModelError(
        f"unknown model {name!r}",
        "Use an alias (`svd-probe models` lists them), a Hub repo id like org/name, or a local folder.",
    )
