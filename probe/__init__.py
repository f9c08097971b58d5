"""Stage one, part 2: heads on cached features, metrics, leaderboard."""
