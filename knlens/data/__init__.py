"""Facts and minimal pairs to study: a built-in hand-written set, and loaders for ParaRel, mParaRel and BLiMP.

The loaders read the data sets from a folder outside the package (``$KNLENS_DATA``, else
``../shared/data`` next to the repository); see :func:`default_data_dir`.

>>> from knlens.data import builtin_facts, get_fact
>>> get_fact("capital-france").target
' Paris'
>>> len(builtin_facts()) >= 40
True
"""

from __future__ import annotations

from knlens.data.blimp import BlimpPair, blimp_phenomena, load_blimp
from knlens.data.builtin import (BUILTIN_RELATIONS, BuiltinRelation, UnknownFactError, UnknownRelationError,
                                 builtin_facts, builtin_relations, get_fact)
from knlens.data.pararel import (DATA_ENV, NO_SPACE_LANGUAGES, default_data_dir, load_mpararel, load_pararel,
                                 mpararel_languages, mpararel_relations, pararel_relations)

__all__ = [
    "BUILTIN_RELATIONS", "BlimpPair", "BuiltinRelation", "DATA_ENV", "NO_SPACE_LANGUAGES", "UnknownFactError",
    "UnknownRelationError", "blimp_phenomena", "builtin_facts", "builtin_relations", "default_data_dir",
    "get_fact", "load_blimp", "load_mpararel", "load_pararel", "mpararel_languages", "mpararel_relations",
    "pararel_relations",
]
