"""Long-running work as durable jobs: the SQLite queue, its runner, and chat as a job kind."""
