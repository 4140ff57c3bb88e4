"""The benchmark harness: scenarios (TOML), one measured run per subprocess, peers side by
side, reports as JSON lines, Markdown and a PNG chart. `edgediff bench SCENARIO.toml`."""
