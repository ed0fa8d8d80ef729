"""Success rates of policies in the real simulator, per level and task kind, with CIs."""
