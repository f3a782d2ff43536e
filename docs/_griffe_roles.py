"""A griffe extension: the docstrings' Sphinx roles (:func:`eigsh`, :class:`~curvature.Hessian`)
as Markdown code spans, so that the API pages read as the docstrings mean."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
