"""Keeping secrets out of MLflow: redacted config trees, flattened params, scrubbed log text.

A config may carry S3 keys, tokens or a tracking URI with a password; MLflow params, tags and
artifacts are readable by everyone with access to the experiment, so every value that leaves
for MLflow passes through here first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
SECRET_KEY = re.compile(r"key|secret|token|passw|credential|private", re.IGNORECASE)
"""Config keys whose values are never logged."""
SECRET_QUERY = re.compile(r"key|secret|token|passw|credential|sig", re.IGNORECASE)
"""URL query parameters whose values are never logged (``sig`` covers presigned URLs)."""
MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value."""


def scrub(text: str) -> str:
    """Free text (a log line, an error) with URL passwords and secret query values masked."""
    text = re.sub(r"(://[^:/@\s]+):[^@/\s]+@", rf"\1:{REDACTED}@", text)
    return re.sub(
        r"([?&][^=&\s]*(?:key|secret|token|passw|credential|sig)[^=&\s]*=)[^&\s]+",
        rf"\1{REDACTED}",
        text,
        flags=re.IGNORECASE,
    )


def scrub_url(url: str) -> str:
    """A URL with its password and secret query values masked; other text goes to :func:`scrub`."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return scrub(url)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, REDACTED if SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(value: Any) -> Any:
    """A copy of a config tree with secret-named keys masked and URL passwords removed."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return scrub_url(value)
    return value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted ``section.key`` -> string value for every leaf, redacted, fit for MLflow params.

    Lists stay one value (as JSON), so ``shrinkage.ratios`` reads ``[0.25, 0.5, 1.0]``.
    """
    flat: dict[str, str] = {}
    for key, value in redact(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        flat[name] = clip(value if isinstance(value, str) else json.dumps(value, default=str))
    return flat


def clip(text: str, limit: int = MAX_PARAM_LENGTH) -> str:
    """``text`` cut to ``limit`` characters, marked with ``...`` when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
