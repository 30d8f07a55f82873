"""MkDocs hook: show Sphinx roles in docstrings (``:func:`name```) as plain code.

The docstrings follow the Google style with Sphinx cross-reference roles, which
mkdocstrings renders literally; this drops the role and keeps the name as code.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Remove the role prefix before each inline code span."""
    return _ROLE.sub("", html)
