"""Chat and completions: the continuous-batching scheduler, sampling defaults, structured
output, tool calls, image inputs."""
