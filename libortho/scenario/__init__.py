"""The seeded canary scenario of the evaluation protocol (canaries with their own prefixes, k insertions, retrain reference).

A public model P is fine-tuned on public text (Python documentation) mixed with private
records that carry canaries ("The Secret Sharer", Carlini et al. 2019); a *retrain reference*
is the very same fine-tune without the records.

* :func:`public_corpus` -- the public corpus, the Python documentation shipped with the
  standard library (``pydoc_data.topics``), split deterministically into ``train``
  (fine-tuning), ``calibration`` (public text for the sieve / quantizer, never a secret) and
  ``heldout`` (retain perplexity). Splits are disjoint: the text is cut into paragraphs,
  repeats of any paragraph of 60+ characters are dropped (pydoc topics overlap), paragraphs
  are grouped into ~2,000-character chunks inside each topic, and chunk i goes to ``heldout``
  if i % 10 == 3, ``calibration`` if i % 10 == 7, else ``train`` (about 80 / 10 / 10 by
  characters; every split covers all parts of the docs). ``config.corpus = "stdlib"``: the same
  splits of other public text, the long docstrings of a fixed list of standard-library modules.
* :func:`make_records` -- member and non-member :class:`~libortho.privacy.CanaryRecord` s.
  Every record has its own prefix; in the default template family ``digits`` secrets use an
  account/PIN template, other formats a deploy-key template (``config.templates``: ``prose``
  support tickets, ``code`` Python snippets; :mod:`.templates`). Members are inserted k times,
  for every k in ``config.ks``. :func:`owner_lookalikes` -- look-alikes from the owner's
  descriptions of the family's records.
* :func:`training_schedule` / :func:`public_windows` -- the data order of the fine-tune.
* :func:`finetune` -- AdamW on the weights of the linear layers inside the decoder blocks
  only (embeddings, norms, lm_head and biases stay frozen: anything changed outside the
  decomposed weights would be a leak path at alpha = 0).
* :func:`build_scenario` -- everything above, cached by a hash of the config.


Modules: :mod:`.config` (the config and its cache key), :mod:`.corpus` (public text),
:mod:`.templates` (record template families), :mod:`.canaries` (canary records), :mod:`.schedule` (data order), :mod:`.finetune` (training,
with the layout of one training step), :mod:`.build` (the cached artifacts).
"""
from __future__ import annotations

from .build import MANIFEST, Scenario, build_scenario, scenario_dir
from .canaries import RECORD_TEMPLATES, make_records, owner_lookalikes, record_ids, text_ids
from .config import SCENARIO_VERSION, ScenarioConfig
from .corpus import CORPORA, SPLITS, corpus_fingerprint, public_corpus
from .templates import TEMPLATE_FAMILIES, TemplateFamily, template_family
from .finetune import finetune, frozen_trainable_weights, trainable_weights
from .schedule import public_windows, training_schedule

__all__ = [
    "SPLITS",
    "CORPORA",
    "TEMPLATE_FAMILIES",
    "TemplateFamily",
    "template_family",
    "owner_lookalikes",
    "SCENARIO_VERSION",
    "ScenarioConfig",
    "MANIFEST",
    "Scenario",
    "public_corpus",
    "corpus_fingerprint",
    "RECORD_TEMPLATES",
    "make_records",
    "training_schedule",
    "public_windows",
    "record_ids",
    "text_ids",
    "trainable_weights",
    "frozen_trainable_weights",
    "finetune",
    "build_scenario",
    "scenario_dir",
]
