"""Code shared by several stages: answer format, params, paths, rewards, models, tracking."""
