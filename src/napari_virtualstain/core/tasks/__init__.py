"""Tasks: small pipelines over the shared sampler, each returning a result dataclass (arrays + provenance)."""
