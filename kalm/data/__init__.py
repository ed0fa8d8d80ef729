"""Episode datasets: the on-disk format, expert collection, import of the original
KALM data, and summaries."""

from kalm.data.episodes import DatasetError, Episode, EpisodeDataset, load_episodes, save_episodes

__all__ = ["DatasetError", "Episode", "EpisodeDataset", "load_episodes", "save_episodes"]
