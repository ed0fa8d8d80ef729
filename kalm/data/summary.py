"""A short human-readable summary of an episode dataset (``kalm data inspect``)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from kalm.data.episodes import EpisodeDataset


def summarize(dataset: EpisodeDataset, max_tasks: int = 8) -> str:
    """Episodes, transitions, lengths, success, returns, tasks and provenance."""
    episodes = dataset.episodes
    lengths = np.array([ep.length for ep in episodes])
    returns = np.array([float(ep.rewards.sum()) for ep in episodes])
    kinds = Counter(ep.task.get("kind", "?") for ep in episodes)
    tasks = Counter(json.dumps(ep.task, sort_keys=True) for ep in episodes)
    actions = episodes[0].actions
    action_desc = "discrete" if actions.ndim == 1 else f"continuous ({actions.shape[1]}-d)"
    lines = [
        f"env: {dataset.env}",
        f"episodes: {len(episodes)}",
        f"transitions: {int(lengths.sum())}",
        f"state_dim: {episodes[0].state_dim}, actions: {action_desc}",
        f"episode length: mean {lengths.mean():.2f}, min {lengths.min()}, max {lengths.max()}",
        f"success rate (terminated): {dataset.success_rate:.3f}",
        f"truncated: {sum(ep.truncated for ep in episodes)}",
        f"return: mean {returns.mean():.3f}, min {returns.min():.3f}, max {returns.max():.3f}",
        f"task kinds: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}",
        f"distinct tasks: {len(tasks)}",
    ]
    for text, count in tasks.most_common(max_tasks):
        lines.append(f"  {count:6d}  {text}")
    if 0 < max_tasks < len(tasks):
        lines.append(f"  ... and {len(tasks) - max_tasks} more")
    lines.append(f"example instruction: {episodes[0].instruction!r}")
    lines.append(f"metadata: {json.dumps(dataset.metadata, sort_keys=True)}")
    return "\n".join(lines)
