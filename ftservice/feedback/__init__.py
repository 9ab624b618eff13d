"""What people's votes become: campaigns, the vote store, the leaderboard and exports."""
